"""tats.video on small clips made here with PyAV: each frame carries its own index as a barcode."""

import pickle
from pathlib import Path

import av
import numpy as np
import pytest

import tats.video
from tats.video import (
    VideoError,
    VideoInfo,
    probe,
    read_frames,
    seek_plan,
    stored_frames,
    timeline,
)

BITS = 8  # the barcode: BITS blocks of 16x16 pixels in the top row, white = bit set


def make_clip(
    path: Path,
    num_frames: int,
    fps: int = 30,
    codec: str = "libx264",
    gop: int = 12,
    size: tuple[int, int] = (96, 160),
    options: dict | None = None,
) -> Path:
    """Write a clip whose frame i shows i in binary, plus a moving bar."""
    height, width = size
    container = av.open(str(path), "w", options=options or {})
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = {"g": str(gop)} if codec in ("libx264", "mpeg4") else {}
    for i in range(num_frames):
        image = np.full((height, width, 3), 60, np.uint8)
        for bit in range(BITS):
            if i >> bit & 1:
                image[:16, 16 * bit : 16 * bit + 16] = 255
        image[40:, (3 * i) % width] = (255, 0, 0)
        for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def barcode(frames: np.ndarray) -> list[int]:
    """The frame indices the barcodes of decoded frames show."""
    blocks = frames[:, :16, : 16 * BITS].reshape(len(frames), 16, BITS, 16, 3)
    bits = blocks.mean(axis=(1, 3, 4)) > 157
    return [int(sum(1 << b for b in range(BITS) if row[b])) for row in bits]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clips")
    return {
        "h264": make_clip(root / "h264.mp4", 90, gop=12),
        "vp9": make_clip(root / "vp9.webm", 30, fps=12, codec="libvpx-vp9"),
        "mpeg4": make_clip(root / "mpeg4.avi", 40, fps=25, codec="mpeg4", gop=10),
    }


@pytest.mark.parametrize("backend", ["av", "decord"])
@pytest.mark.parametrize(
    ("name", "frames", "fps"), [("h264", 90, 30.0), ("vp9", 30, 12.0), ("mpeg4", 40, 25.0)]
)
def test_probe_reports_count_rate_and_size(clips, backend, name, frames, fps):
    info = probe(clips[name], backend=backend)
    assert info == VideoInfo(clips[name], frames, fps, 160, 96)
    assert info.duration == pytest.approx(frames / fps)


@pytest.mark.parametrize("backend", ["auto", "av", "decord"])
@pytest.mark.parametrize("name", ["h264", "vp9", "mpeg4"])
def test_read_frames_returns_requested_frames_in_order(clips, backend, name):
    n = probe(clips[name]).num_frames
    rng = np.random.default_rng(0)
    for indices in (
        list(range(n)),  # dense: decode through
        [n - 1, 0, 5, 5, n // 2],  # any order, repeats
        sorted(rng.choice(n, 4, replace=False).tolist()),  # sparse: seeks where it pays
        [n - 1],
        [],
    ):
        frames = read_frames(clips[name], indices, backend=backend)
        assert frames.dtype == np.uint8 and frames.shape == (len(indices), 96, 160, 3)
        assert barcode(frames) == list(indices)


def test_seek_plan_seeks_only_where_a_keyframe_skips_enough(monkeypatch):
    monkeypatch.setattr(tats.video, "SEEK_MIN_SKIP", 4)
    keys = list(range(0, 250, 10))
    assert seek_plan([3, 40, 41, 120, 121, 199, 249], keys) == [None, 40, None, 120, None, 190, 240]
    assert seek_plan([0, 5, 12], [0, 5, 12]) == [None, None, 12]  # skip 4: decode; skip 6: seek
    assert seek_plan(list(range(0, 100, 3)), keys) == [None] * 34  # dense: decode through
    assert seek_plan([5, 200], []) == [None, None]  # no keyframes known: decode through


def test_sparse_reads_seek_to_the_right_frames(tmp_path):
    # Long GOP-structured clip: keyframes every 10 frames, so far targets are reached by seeking.
    path = make_clip(tmp_path / "long.mp4", 250, gop=10)
    indices = [3, 40, 41, 120, 121, 122, 199, 249, 0, 120]
    assert barcode(read_frames(path, indices)) == indices


@pytest.mark.parametrize("backend", ["av", "decord"])
@pytest.mark.parametrize(("name", "frames"), [("h264", 90), ("vp9", 30), ("mpeg4", 40)])
def test_index_beyond_decodable_frames_is_a_video_error(clips, backend, name, frames):
    with pytest.raises(VideoError, match=rf"frame {frames} requested, {frames} frames decode"):
        read_frames(clips[name], [3, frames], backend=backend)


def test_bad_files_raise_one_clear_error(tmp_path, clips):
    data = clips["h264"].read_bytes()
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    webm = clips["vp9"].read_bytes()
    (tmp_path / "cut.webm").write_bytes(webm[: len(webm) * 3 // 4])
    cases = {
        "missing.mp4": "no such file",
        "empty.mp4": "empty file",
        "garbage.mp4": "cannot open",
        "cut.mp4": "cannot open",  # the MP4 index (moov) sits at the end and is gone
        "cut.webm": "truncated",
    }
    for name, problem in cases.items():
        for call in (lambda p: probe(p), lambda p: read_frames(p, [0])):
            with pytest.raises(VideoError, match=problem) as err:
                call(tmp_path / name)
            assert str(err.value).startswith(str(tmp_path / name))
            assert "\n" not in str(err.value)


def test_truncated_file_with_index_up_front_is_detected(tmp_path, clips):
    # faststart puts the index first: the header still promises every frame after a cut.
    path = make_clip(tmp_path / "fast.mp4", 60, options={"movflags": "faststart"})
    data = path.read_bytes()
    cut = tmp_path / "fast_cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.8)])
    with pytest.raises(VideoError, match="truncated: the container declares 60 frames"):
        probe(cut)
    with pytest.raises(VideoError, match="truncated"):
        read_frames(cut, [0])


def test_corrupt_middle_is_a_video_error(tmp_path):
    path = make_clip(tmp_path / "c.mp4", 60, options={"movflags": "faststart"})
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 2000] = np.random.default_rng(1).bytes(2000)
    path.write_bytes(bytes(data))
    try:
        frames = read_frames(path, list(range(60)))
    except VideoError as err:
        assert str(err).startswith(str(path))
    else:  # H.264 may conceal the damage; then every frame must still come back
        assert frames.shape == (60, 96, 160, 3)


def test_video_error_survives_pickling(tmp_path):
    err = VideoError(tmp_path / "x.mp4", "truncated")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, VideoError) and str(back) == str(err) and back.path == err.path


def test_timeline_resamples_to_10fps_and_keeps_webm_native():
    info = VideoInfo(Path("a.mp4"), num_frames=300, fps=30.0, width=320, height=240)
    t = timeline(info)
    assert len(t) == 100 and t[0] == 0 and t[-1] == 299
    np.testing.assert_array_equal(t, np.linspace(0, 299, 100).astype(int))
    assert len(timeline(info, fps=5.0)) == 50
    np.testing.assert_array_equal(timeline(info, fps=None), np.arange(300))
    webm = VideoInfo(Path("b.WEBM"), num_frames=37, fps=12.0, width=427, height=240)
    np.testing.assert_array_equal(timeline(webm), np.arange(37))
    resampled = timeline(webm, native_suffixes=())  # 37 frames at 12 fps -> round(30.8) = 31
    np.testing.assert_array_equal(resampled, np.linspace(0, 36, 31).astype(int))
    # 50 frames at 24.75 fps -> round(20.2) = 20 frames; a single-frame clip keeps one frame
    assert len(timeline(VideoInfo(Path("c.avi"), 50, 24.75, 8, 8))) == 20
    np.testing.assert_array_equal(timeline(VideoInfo(Path("d.mp4"), 1, 30.0, 8, 8)), [0])


def test_stored_frames_spread_over_the_time_base():
    np.testing.assert_array_equal(stored_frames(100), [0, 14, 28, 42, 56, 70, 84, 99])
    np.testing.assert_array_equal(stored_frames(3, 4), [0, 0, 1, 2])
    with pytest.raises(ValueError):
        stored_frames(0)


def test_timeline_and_read_frames_together(clips):
    info = probe(clips["h264"])
    indices = timeline(info)  # 90 frames at 30 fps -> 30 frames at 10 fps
    assert len(indices) == 30
    frames = read_frames(clips["h264"], indices[stored_frames(len(indices))])
    assert barcode(frames) == indices[stored_frames(len(indices))].tolist()
