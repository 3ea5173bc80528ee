"""The pretrained weight files tats can use: where each comes from (its official URL and
SHA-256), where tats looks for it, which of them a run needs, and their download.

    for need in needed_weights(config.tracks, config.tracker_options, config.features): ...
    fetch(CATALOG["scaled_offline.pth"].url, hub_dir() / "scaled_offline.pth", sha256)

Every file goes to the torch hub cache (`$TORCH_HOME/hub/checkpoints`), where the trackers and
backbones look for weights that no option names. A download streams into a temporary file
beside its destination, hashing as it goes, and is renamed into place only when complete and,
where a SHA-256 is known, matching it: a wrong checksum or a cut connection leaves nothing.
The SHA-256s are those the model repositories publish (Hugging Face lists each Git LFS file's);
Meta publishes none for the DINOv2 .pth files, so their downloads are kept unverified, with
their SHA-256 printed for pinning (`--sha256 NAME=HEX`).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

COTRACKER3 = "https://huggingface.co/facebook/cotracker3/resolve/main/{}"
COTRACKER2 = "https://huggingface.co/facebook/cotracker/resolve/main/{}"
DINOV2 = "https://dl.fbaipublicfiles.com/dinov2/{}/{}"
CHUNK = 1 << 20


@dataclass(frozen=True)
class WeightFile:
    """One weight file: what it is, its official URL and SHA-256 (None: not published)."""

    name: str
    model: str
    url: str
    sha256: str | None
    size: int | None = None  # bytes, where the repository states it exactly
    license: str = ""


def _dinov2(stem: str, model: str) -> WeightFile:
    base = stem.removesuffix("_reg4")
    name = f"{stem}_pretrain.pth"
    return WeightFile(name, model, DINOV2.format(base, name), None, None, "Apache-2.0")


# SHA-256 and sizes: the Git LFS details of each file on huggingface.co (facebook/cotracker3,
# facebook/cotracker: the files' pages and upload commits).
CATALOG: dict[str, WeightFile] = {
    f.name: f
    for f in (
        WeightFile(
            "scaled_offline.pth", "CoTracker3 offline (--tracker cotracker3)",
            COTRACKER3.format("scaled_offline.pth"),
            "2670d4562ed69326dda775a26e54883925cd11b6fc9b24cb7aa9f8078bce7834", 101890938,
            "CC BY-NC 4.0",
        ),
        WeightFile(
            "scaled_online.pth",
            "CoTracker3 online (--tracker cotracker3-online; cotracker3's windows for long clips)",
            COTRACKER3.format("scaled_online.pth"),
            "205d34789f19699d64b22cf93f9b697f15f28d4025240e31532e504109837218", None,
            "CC BY-NC 4.0",
        ),
        WeightFile(
            "cotracker2.pth", "CoTracker2, the TATs paper's tracker (--paper-tracker)",
            COTRACKER2.format("cotracker2.pth"),
            "362f5274376d610dc987b6daf2c2fefe63e06e1835f4ec1a10d0a15c5a4eef4f", 204396415,
            "CC BY-NC 4.0",
        ),
        WeightFile(
            "cotracker2v1.pth", "CoTracker2.1 (--tracker official --tracker-option "
            "model=cotracker2v1)", COTRACKER2.format("cotracker2v1.pth"),
            "d8d473734ca22e15041cf454c0d6828e7fe462fb27918f84b459485813ac572c", 204417112,
            "CC BY-NC 4.0",
        ),
        _dinov2("dinov2_vits14", "DINOv2 ViT-S/14 (--backbone dinov2_vits14)"),
        _dinov2("dinov2_vitb14", "DINOv2 ViT-B/14 (--backbone dinov2_vitb14)"),
        _dinov2("dinov2_vitl14", "DINOv2 ViT-L/14 (--backbone dinov2_vitl14)"),
        _dinov2("dinov2_vits14_reg4", "DINOv2 ViT-S/14, registers (--backbone dinov2_vits14_reg)"),
        _dinov2("dinov2_vitb14_reg4", "DINOv2 ViT-B/14, registers (--backbone dinov2_vitb14_reg)"),
        _dinov2("dinov2_vitl14_reg4", "DINOv2 ViT-L/14, registers (--backbone dinov2_vitl14_reg)"),
    )
}  # fmt: skip


def hub_dir() -> Path:
    """Where tats looks for weights no option names: the torch hub cache's checkpoints."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


@dataclass(frozen=True)
class Need:
    """A weight file a run needs: the file, what for, and the path an option gave (if any)."""

    file: WeightFile
    role: str
    given: Path | None = None
    optional: bool = False  # used only in some cases (say which in `role`)

    def path(self) -> Path:
        """Where the run reads it: the path given, or the torch hub cache."""
        return self.given if self.given is not None else hub_dir() / self.file.name


def backbone_file(name: str) -> WeightFile | None:
    """The weight file of a features backbone (None: `pixels`, no weights)."""
    from tats.pipeline.backbones import DINOV2_MODELS

    if name not in DINOV2_MODELS:
        return None
    return CATALOG[f"{DINOV2_MODELS[name][1]}_pretrain.pth"]


def tracker_files(tracker: str, options: dict) -> list[tuple[WeightFile, str, bool]]:
    """(file, what for, optional) of a tracker with its options (none: lk, imports)."""
    if tracker == "cotracker3":
        long = options.get("max_offline_frames", 600)
        found = [(CATALOG["scaled_offline.pth"], "tracker", False)]
        if long is not None and "online_checkpoint" not in options:
            found.append((CATALOG["scaled_online.pth"],
                          f"tracker, for clips longer than {long} frames", True))  # fmt: skip
        return found
    if tracker == "cotracker3-online":
        return [(CATALOG["scaled_online.pth"], "tracker", False)]
    if tracker == "official":
        model = options.get("model", "cotracker3")
        if model == "cotracker3":
            name = "scaled_online.pth" if options.get("online") else "scaled_offline.pth"
        else:
            name = f"{model}.pth"
        return [(CATALOG[name], "tracker (official package)", False)]
    return []


def needed_weights(
    tracks,
    tracker_options: dict,
    features,
    tracker_weights: Path | None = None,
    backbone_weights: Path | None = None,
) -> list[Need]:
    """The weight files a run with these stage configs (TracksConfig, FeaturesConfig) needs;
    the paths given by options stand in for the cache."""
    needs = [
        Need(file, role, tracker_weights if not optional else None, optional)
        for file, role, optional in tracker_files(tracks.tracker, tracker_options)
    ]
    backbone = backbone_file(features.backbone)
    if backbone is not None:
        needs.append(Need(backbone, "features backbone", backbone_weights))
    if tracks.semantic is not None:
        clustering = backbone_file(tracks.semantic.backbone)
        if clustering is not None and all(n.file != clustering for n in needs):
            needs.append(Need(clustering, "semantic queries' clustering", backbone_weights))
    return needs


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


class DownloadError(OSError):
    """A download that did not complete (connection refused or cut, an HTTP error)."""


def fetch(
    url: str, dest: str | Path, sha256: str | None, progress: bool = True, timeout: float = 60
) -> str:
    """Download `url` to `dest` through a temporary file beside it, renamed into place only
    when complete and (where `sha256` is given) matching it; returns the file's SHA-256.
    ValueError for a wrong checksum, DownloadError for a failed transfer: neither leaves a
    file behind (nor touches an existing `dest`)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    digest, received = hashlib.sha256(), 0
    try:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                length = response.headers.get("Content-Length")
                total = int(length) if length is not None else None
                with open(tmp, "wb") as out, tqdm(
                    total=total, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=dest.name, disable=not progress,
                ) as bar:  # fmt: skip
                    while block := response.read(CHUNK):
                        out.write(block)
                        digest.update(block)
                        received += len(block)
                        bar.update(len(block))
                    out.flush()
                    os.fsync(out.fileno())
        except urllib.error.HTTPError as error:
            raise DownloadError(f"{url}: HTTP {error.code} {error.reason}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
            reason = getattr(error, "reason", None) or error
            raise DownloadError(
                f"{url}: the download broke off after {received:,} bytes ({reason}); "
                "nothing was written, run it again"
            ) from None
        if total is not None and received != total:
            raise DownloadError(
                f"{url}: the download broke off after {received:,} of {total:,} bytes; "
                "nothing was written, run it again"
            )
        found = digest.hexdigest()
        if sha256 is not None and found != sha256.lower():
            raise ValueError(
                f"{url}: SHA-256 {found}, expected {sha256.lower()}: not the official file "
                f"(a damaged transfer or another file at that address); nothing was written"
            )
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
        return found
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
