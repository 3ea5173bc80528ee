"""Checkpoints: plain dicts of tensors and primitives, read with torch.load(weights_only=True).

A checkpoint holds the training config, the model config and weights, the epoch, the history,
and `data`: the provenance of the stores it was trained on (the manifest digest, and each
store's stage config and tracker or backbone identity), which `tats predict` repeats on new
videos.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

CHECKPOINT_FORMAT = "tats.train.checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a kill while saving leaves the previous file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad file
        raise ValueError(f"{path}: cannot read checkpoint: {error}") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a tats-train checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{path}: checkpoint version {state.get('version')}, this tats reads "
            f"{CHECKPOINT_VERSION}"
        )
    return state
