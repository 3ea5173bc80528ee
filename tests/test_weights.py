"""`tats weights`: what a run needs and where it is looked for; `tats weights download`
against a local HTTP server (never the internet): a good checksum, a bad one, a connection
cut halfway, each leaving the destination folder as a user needs it."""

from __future__ import annotations

import hashlib
import http.server
import threading

import pytest
from typer.testing import CliRunner

from tats.cli import app
from tats.pipeline.catalog import CATALOG, DownloadError, fetch

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, a stand-in for a weight file


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at every path; paths under /cut/ send half of it and hang up."""

    def do_GET(self):  # noqa: N802 - the http.server name
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        if self.path.startswith("/cut/"):
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(PAYLOAD)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def invoke(*args):
    return CliRunner().invoke(app, ["weights", *map(str, args)])


GOOD = hashlib.sha256(PAYLOAD).hexdigest()


def test_fetch_writes_the_file_only_when_whole_and_matching(server, tmp_path):
    dest = tmp_path / "w.pth"
    assert fetch(f"{server}/w.pth", dest, GOOD, progress=False) == GOOD
    assert dest.read_bytes() == PAYLOAD and sorted(tmp_path.iterdir()) == [dest]
    with pytest.raises(ValueError, match="SHA-256 .*, expected 0{64}"):
        fetch(f"{server}/w.pth", tmp_path / "x.pth", "0" * 64, progress=False)
    with pytest.raises(DownloadError, match="broke off after"):
        fetch(f"{server}/cut/w.pth", tmp_path / "y.pth", GOOD, progress=False)
    assert sorted(tmp_path.iterdir()) == [dest]  # no partial file, no temporary file


def test_download_with_a_good_checksum(server, tmp_path):
    result = invoke("download", "scaled_offline.pth", "--to", tmp_path, "--mirror", server,
                    "--sha256", f"scaled_offline.pth={GOOD}", "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "scaled_offline.pth").read_bytes() == PAYLOAD
    assert f"sha256 {GOOD}" in result.output
    again = invoke("download", "scaled_offline.pth", "--to", tmp_path, "--mirror", server,
                   "--sha256", f"scaled_offline.pth={GOOD}", "--no-progress")  # fmt: skip
    assert again.exit_code == 0 and "already there" in again.output


def test_download_with_a_bad_checksum_leaves_nothing(server, tmp_path):
    """The payload is not the official scaled_offline.pth: its published SHA-256 refuses it."""
    result = invoke("download", "scaled_offline.pth", "--to", tmp_path, "--mirror", server,
                    "--no-progress")  # fmt: skip
    assert result.exit_code == 2
    assert f"expected {CATALOG['scaled_offline.pth'].sha256}" in result.output
    assert "nothing was written" in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_connection_cut_halfway_leaves_nothing(server, tmp_path):
    result = invoke("download", "scaled_offline.pth", "--to", tmp_path, "--mirror",
                    f"{server}/cut", "--sha256", f"scaled_offline.pth={GOOD}", "--no-progress")
    assert result.exit_code == 3, result.output
    assert "broke off after" in result.output and "run it again" in result.output
    assert list(tmp_path.iterdir()) == []


def test_an_unpublished_checksum_is_said_with_how_to_pin_it(server, tmp_path):
    result = invoke("download", "dinov2_vitb14_pretrain.pth", "--to", tmp_path, "--mirror",
                    server, "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "could not be verified" in result.output
    assert f"--sha256 dinov2_vitb14_pretrain.pth={GOOD}" in result.output
    assert (tmp_path / "dinov2_vitb14_pretrain.pth").read_bytes() == PAYLOAD


def test_the_list_says_what_a_recipe_needs_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = invoke("--recipe", "trokens/hmdb")
    assert result.exit_code == 0, result.output
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    for name in ("scaled_offline.pth", "dinov2_vitb14_pretrain.pth"):
        assert f"MISSING: put it at {hub / name}" in result.output
        assert CATALOG[name].url in result.output
    assert CATALOG["scaled_offline.pth"].sha256 in result.output
    hub.mkdir(parents=True)
    (hub / "scaled_offline.pth").write_bytes(b"x")
    paper = invoke("--recipe", "tats/ssv2_small", "--paper-tracker")
    assert "cotracker2.pth" in paper.output and CATALOG["cotracker2.pth"].sha256 in paper.output
    assert f"present: {hub / 'scaled_offline.pth'}" in invoke("--recipe", "tats/hmdb").output
    assert "needs no weight files" in invoke("--tracker", "lk", "--backbone", "pixels").output


def test_unknown_names_and_bad_pins_exit_2(tmp_path):
    assert invoke("download", "scaled.pth", "--to", tmp_path).exit_code == 2
    bad = invoke("download", "scaled_offline.pth", "--sha256", "scaled_offline.pth=abc")
    assert bad.exit_code == 2 and "64 hex digits" in bad.output
