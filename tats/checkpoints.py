"""Checkpoints: plain dicts of tensors and primitives, read with torch.load(weights_only=True).

A checkpoint holds the training config, the model config and weights, the epoch, the history,
and `data`: the provenance of the stores it was trained on (the manifest digest, and each
store's stage config and tracker or backbone identity), which `tats predict` repeats on new
videos and which evaluation and `tats viz episode` compare with the stores they are given.

`load_checkpoint` checks the whole file before anything is computed from it: a damaged one
(a config that does not build, weights that do not fit the model, a `data` record that is not
one) is refused in one line, not found out after hours of extraction.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from tats.pipeline.weights import read_tensor_file

CHECKPOINT_FORMAT = "tats.train.checkpoint"
CHECKPOINT_VERSION = 1
# The identity field that holds the weights' digest, and the option that gives the weights.
WEIGHTS = {
    "tracker": ("checkpoint_sha256", "--tracker-weights"),
    "backbone": ("weights_sha256", "--backbone-weights"),
    "clustering backbone": ("weights_sha256", "--cluster-weights"),
}
# Each store of `data`: the identity it records, and what that identity is of.
IDENTITIES = {
    "tracks": (("tracker", "tracker"), ("clustering_backbone", "clustering backbone")),
    "features": (("backbone", "backbone"),),
}
# Stage settings that change how a store is laid out, not what it holds.
LAYOUT_SETTINGS = ("shard_size",)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a kill while saving leaves the previous file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    """The checkpoint at `path`, checked whole (`check_checkpoint`); ValueError (one line,
    naming the file and its problem) for anything that is not a sound tats-train checkpoint,
    FileNotFoundError where there is no file."""
    path = Path(path)
    state = read_tensor_file(path, "checkpoint")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a tats-train checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{path}: checkpoint version {state.get('version')}, this tats reads "
            f"{CHECKPOINT_VERSION}"
        )
    check_checkpoint(state, path)
    return state


def check_checkpoint(state: dict, path: Path) -> None:
    """Everything the checkpoint's readers use: the training config and the model config
    build, the weights load into that model and are finite, the epoch is a number, and
    `data` (where recorded) holds each store's stage config and identity."""
    from tats.model import ModelConfig, TATsModel
    from tats.train_config import config_from_dict

    damaged = f"{path}: damaged checkpoint:"
    config = state.get("config")
    if not isinstance(config, dict):
        raise ValueError(f"{damaged} no training config")
    try:
        config_from_dict(config)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{damaged} its training config: {_line(error)}") from None
    if not isinstance(state.get("model_config"), dict):
        raise ValueError(f"{damaged} no model_config")
    try:
        model_config = ModelConfig(**state["model_config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{damaged} its model_config: {_line(error)}") from None
    weights = state.get("model")
    if not isinstance(weights, dict) or not all(
        isinstance(v, torch.Tensor) for v in weights.values()
    ):
        raise ValueError(f"{damaged} no model weights (a state dict of tensors)")
    with torch.random.fork_rng(devices=[]):  # building the model draws its init
        model = TATsModel(model_config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong = [
        f"{k} {list(v.shape)} (the model's {list(expected[k].shape)})"
        for k, v in weights.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        parts = [f"{name} {', '.join(keys[:3])}" + (" ..." if len(keys) > 3 else "")
                 for name, keys in (("missing", missing), ("unexpected", unexpected),
                                    ("wrong shape", wrong)) if keys]  # fmt: skip
        raise ValueError(f"{damaged} the weights do not fit its model_config: {'; '.join(parts)}")
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:  # e.g. a dtype that does not convert
        raise ValueError(f"{damaged} its weights do not load: {_line(error)[:160]}") from None
    broken = [k for k, v in weights.items() if v.is_floating_point() and not v.isfinite().all()]
    if broken:
        raise ValueError(f"{damaged} weights {', '.join(broken[:3])} hold NaN or infinity")
    if not isinstance(state.get("epoch"), int):
        raise ValueError(f"{damaged} no epoch")
    if "data" in state:
        _check_data(state["data"], model_config.num_frames, damaged)


def _check_data(data: object, num_frames: int, damaged: str) -> None:
    if not isinstance(data, dict) or not isinstance(data.get("manifest_sha256"), str):
        raise ValueError(f"{damaged} its data is not a record of the stores it was trained on")
    for store, identities in IDENTITIES.items():
        record = data.get(store)
        if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
            raise ValueError(f"{damaged} its data does not record the {store} store's config")
        key, _ = identities[0]
        if not isinstance(record.get(key), dict):
            raise ValueError(f"{damaged} its data does not record the {store} store's {key}")
        frames = record["config"].get("frames")
        if frames != num_frames:
            raise ValueError(
                f"{damaged} its data records {frames!r} stored frames in the {store} store, "
                f"its model_config {num_frames}"
            )


def recorded_stores(state: dict, path: Path) -> dict:
    """The checkpoint's record of its training stores (`data`); ValueError where it has none."""
    recorded = state.get("data")
    if not recorded:
        raise ValueError(
            f"{path}: the checkpoint does not record the stores it was trained on (made "
            f"before tats predict); predicting needs their settings: train it with this tats"
        )
    return recorded


def check_stores_match(state: dict, tracks, features, path: Path) -> None:
    """The stores `tracks` and `features` (RowStores) must hold what the checkpoint's training
    stores held: the same stage settings (all but the shard size), the same tracker and
    backbone (weights and settings; their library versions and precision may differ, with a
    warning). The manifest may differ: a checkpoint may be evaluated on other videos.
    ValueError naming the store and the first setting that differs."""
    recorded = recorded_stores(state, path)
    for name, store in (("tracks", tracks), ("features", features)):
        record = recorded[name]
        here = store.provenance
        differences = _setting_differences(
            {k: v for k, v in here["config"].items() if k not in LAYOUT_SETTINGS},
            {k: v for k, v in record["config"].items() if k not in LAYOUT_SETTINGS},
        )
        if differences:
            raise ValueError(
                f"{store.path} was made with other {name} settings than the stores {path} was "
                f"trained on: {'; '.join(differences)}"
            )
        for key, what in IDENTITIES[name]:
            if key in here or key in record:
                check_identity(what, here.get(key) or {}, record.get(key) or {}, path,
                               where=f"of {store.path}")  # fmt: skip


def _setting_differences(here: dict, recorded: dict, prefix: str = "") -> list[str]:
    found = []
    for key in dict.fromkeys([*recorded, *here]):  # the stage config's order
        a, b = here.get(key), recorded.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _setting_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key} is {_short(a)} (trained on {_short(b)})")
    return found


def check_identity(
    what: str, here: dict, recorded: dict, checkpoint: Path, where: str = "here"
) -> None:
    """The tracker or backbone `here` (built by predict, or recorded in a store: `where` says
    which) must be the one the training stores record: the same weights (SHA-256) and
    settings. Its library versions and its precision (`--precision`; auto: bf16 where the
    device has bf16 units, else fp32) may differ, with a warning: the inputs then differ by
    rounding."""
    here = json.loads(json.dumps(here))
    key, option = WEIGHTS[what]
    built = where == "here"  # predict builds it: the user gives its weights
    if here.get(key) != recorded.get(key):
        hint = f"; give the same file with {option}" if built else ""
        raise ValueError(
            f"the {what} weights {where} (sha256 {here.get(key)}) are not those of the stores "
            f"{checkpoint} was trained on (sha256 {recorded.get(key)}){hint}"
        )
    here, recorded = _precision_apart(here), _precision_apart(recorded)
    for name in sorted(set(here) | set(recorded)):
        if here.get(name) == recorded.get(name):
            continue
        message = (
            f"the {what}'s {name} {where} is {here.get(name)!r}, the stores {checkpoint} was "
            f"trained on have {recorded.get(name)!r}"
        )
        if name not in ("implementation", "precision"):
            hint = " (set it with --tracker-option)" if what == "tracker" and built else ""
            raise ValueError(message + hint)
        warnings.warn(message, stacklevel=2)


def _precision_apart(identity: dict) -> dict:
    """CoTracker3 names its precision inside its `mode` ("...; precision=bf16; ..."): move it
    to a key of its own, so that a device change reads as the precision change it is."""
    mode = identity.get("mode")
    if not isinstance(mode, str) or "precision=" not in mode:
        return identity
    parts = mode.split("; ")
    precision = [p.partition("=")[2] for p in parts if p.startswith("precision=")]
    rest = "; ".join(p for p in parts if not p.startswith("precision="))
    return {**identity, "mode": rest, "precision": precision[0] if precision else None}


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
