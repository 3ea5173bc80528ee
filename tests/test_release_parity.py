"""Parity of tats with the releases' own code: the TATs and Trokens models, matching, losses and
gradients on one episode, every fix of the releases off (tats/fixes.py).

Needs checkouts of both releases in one folder, and the releases' `einops` and `fvcore`:

    git clone https://github.com/pulkitkumar95/tats $RELEASES/tats          # c9436ea
    git clone https://github.com/pulkitkumar95/trokens $RELEASES/trokens    # 860573d
    pip install einops fvcore
    TATS_RELEASES=$RELEASES pytest tests/test_release_parity.py -rs

Skipped otherwise, with the reason. The releases' modules are imported from their files; only
imports that their arithmetic does not use are stubbed (`STUBS`: experiment logging, JSON,
CLIP and MoCo backbones and ORViT that the TATs model file imports but does not build,
scikit-learn's clustering in Trokens' HoD file). Their DINOv2 is not built: `torch.hub.load`
returns a stand-in with the two attributes the constructor touches, and the features come in
as DINOv2's patch tokens would (`get_dino_features` returns the episode's patch grids), as
tats reads them from its features store. The matching functions (`process_patch_tokens`,
`cos_sim`, `support_query_split`) are the release's `tools/train_few_shot.py` source, run as
written; the loss lines of its `train_epoch` are restated below.

The releases' configs are the recipes' (TATs: `configs/TaTs/ssv2_longer_steps.yaml` with its
README's options; Trokens: `configs/trokens/hmdb.yaml` with `scripts/trokens.sh`), with
`dinov2_vits14` (width 384, a 16 x 16 grid) instead of ViT-B/14 for a smaller test and the
CLS head sized to the episode's training classes (the one value tats does not follow:
docs/faithful.md). The inputs are one random 3-way 1-shot episode with 2 queries per class,
8 frames, 256 points, its query frames and visibility; tats reads its mask with
`tats.episodes.point_mask`, the releases with their `get_point_query_mask` on the query frames
their loaders find (TATs' point files store them; Trokens' loader looks them up under a key its
point files do not have, so its query frames are all 0), and Trokens' HoD histograms come from
its `get_orientation_hist`.
"""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tats.episodes import point_mask
from tats.fewshot import episode_loss, hausdorff_scores
from tats.model import ModelConfig, TATsModel

RELEASES = os.environ.get("TATS_RELEASES")
if not RELEASES:
    pytest.skip(
        "TATS_RELEASES is not set (a folder holding checkouts of pulkitkumar95/tats as tats/ and "
        "pulkitkumar95/trokens as trokens/): parity with the release code was not checked",
        allow_module_level=True,
    )
for _package in ("einops", "fvcore"):
    pytest.importorskip(_package, reason=f"the releases import {_package} (pip install {_package})")

ROOT = Path(RELEASES)
COMMITS = {"tats": "c9436ea", "trokens": "860573d"}  # the releases this was checked against
STUBS = ("wandb", "simplejson", "transformers", "sklearn", "sklearn.cluster",
         "slowfast.models.ORViT", "slowfast.models.moco.builder")  # fmt: skip
TOLERANCE = 1e-5
WAY, SHOT, QUERIES, FRAMES, POINTS, TIME_BASE = 3, 1, 2, 8, 256, 40
CLASSES = 7  # the CLS head's outputs: the training classes


class _Stub(types.ModuleType):
    """An import the releases' arithmetic does not use: any name in it is None."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return None


def _module(name: str, cls=types.ModuleType, path: Path | None = None) -> types.ModuleType:
    module = cls(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=path is not None)
    if path is not None:
        module.__path__ = [str(path)]
    sys.modules[name] = module
    return module


@pytest.fixture(scope="module")
def release():
    """The releases' modules, imported from the checkouts (packages without their __init__,
    which imports every dataset and model of the release); sys.modules restored after."""
    for name in ("tats", "trokens"):
        if not (ROOT / name).is_dir():
            pytest.skip(f"{ROOT / name}: no checkout of pulkitkumar95/{name}")
    saved = dict(sys.modules)
    try:
        for top, base in (("slowfast", ROOT / "tats"), ("trokens", ROOT / "trokens")):
            for folder in [base / top, *sorted((base / top).rglob("*"))]:
                if folder.is_dir() and (folder / "__init__.py").is_file():
                    _module(".".join(folder.relative_to(base).parts), path=folder)
        for name in STUBS:
            _module(name, _Stub)
        modules = {
            name: importlib.import_module(name)
            for name in (
                "slowfast.models.pointformer", "slowfast.config.defaults",
                "slowfast.datasets.point_sampler", "trokens.models.pointformer",
                "trokens.config.defaults", "trokens.datasets.point_sampler",
                "trokens.datasets.hod", "trokens.models.losses", "slowfast.models.losses",
            )
        }  # fmt: skip
        modules["matching"] = _functions(
            ROOT / "trokens" / "tools" / "train_few_shot.py",
            ("process_patch_tokens", "cos_sim", "support_query_split"),
        )
        yield modules
    finally:
        sys.modules.clear()
        sys.modules.update(saved)


def _functions(path: Path, names: tuple[str, ...]) -> dict:
    """The named top-level functions of a release file, run from its own source."""
    from einops import rearrange

    tree = ast.parse(path.read_text())
    chosen = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    assert {n.name for n in chosen} == set(names), f"{path}: {names} not all found"
    namespace = {"torch": torch, "F": F, "np": np, "rearrange": rearrange}
    exec(compile(ast.Module(chosen, type_ignores=[]), str(path), "exec"), namespace)
    return {name: namespace[name] for name in names}


class _Dino(torch.nn.Module):
    """The releases' DINOv2 as far as their constructors touch it; features come in already."""

    num_register_tokens = 0

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(4)

    def cuda(self, device=None):
        return self


def _release_config(release, method: str):
    if method == "tats":
        cfg = release["slowfast.config.defaults"].get_cfg()
        cfg.merge_from_file(str(ROOT / "tats" / "configs" / "TaTs" / "ssv2_longer_steps.yaml"))
        cfg.merge_from_list(["MODEL.FEAT_EXTRACTOR", "dino"])  # README.md's command
    else:
        cfg = release["trokens.config.defaults"].get_cfg()
        cfg.merge_from_file(str(ROOT / "trokens" / "configs" / "trokens" / "hmdb.yaml"))
        cfg.merge_from_list([  # scripts/trokens.sh
            "POINT_INFO.SAMPLING_TYPE", "cluster_sample", "POINT_INFO.NUM_POINTS_TO_SAMPLE", POINTS,
            "MODEL.FEAT_EXTRACTOR", "dino", "MODEL.MOTION_MODULE.USE_CROSS_MOTION_MODULE", True,
            "MODEL.MOTION_MODULE.USE_HOD_MOTION_MODULE", True,
        ])  # fmt: skip
    cfg.merge_from_list([
        "MODEL.DINO_CONFIG", "dinov2_vits14", "MODEL.NUM_CLASSES", CLASSES, "NUM_GPUS", 0,
        "DATA.NUM_FRAMES", FRAMES, "FEW_SHOT.N_WAY", WAY, "FEW_SHOT.K_SHOT", SHOT,
    ])  # fmt: skip
    return cfg


def _release_model(release, method: str, monkeypatch):
    cfg = _release_config(release, method)
    module = release["slowfast.models.pointformer" if method == "tats" else
                     "trokens.models.pointformer"]  # fmt: skip
    monkeypatch.setenv("TORCH_HOME", "unused: the hub is not read")
    monkeypatch.setattr(torch.hub, "load", lambda *a, **k: _Dino())
    return module.Pointformer(cfg), cfg


# tats' parameter names -> the releases'; per block, then the model's own.
BLOCK_NAMES = {
    "temporal_norm": "temporal_norm1", "temporal_attn.qkv": "temporal_attn.qkv",
    "temporal_attn.proj": "temporal_attn.proj", "temporal_fc": "temporal_fc",
    "spatial_norm": "norm1", "spatial_attn.qkv": "attn.qkv", "spatial_attn.proj": "attn.proj",
    "mlp_norm": "norm2", "mlp.fc1": "mlp.0.fc1", "mlp.fc2": "mlp.0.fc2",
}  # fmt: skip
MODEL_NAMES = {
    "space_pos_embed": "space_pos_embed", "time_pos_embed": "time_pos_embed",
    "cls_token": "cls_token", "norm": "norm", "pre_logits.0": "pre_logits.fc", "head": "head",
    "hod_embed.fc1": "hod_motion_module.fc2.c_fc", "hod_embed.fc2": "hod_motion_module.fc2.c_proj",
    "hod_embed.norm": "hod_motion_module.ln2",
    "offsets_embed.fc1": "cross_motion_module.fc2.c_fc",
    "offsets_embed.fc2": "cross_motion_module.fc2.c_proj",
    "offsets_embed.norm": "cross_motion_module.ln2",
}  # fmt: skip


def release_name(name: str) -> str:
    """The release's name of a tats parameter."""
    if "." not in name:
        return name
    module, leaf = name.rsplit(".", 1)
    if module.startswith("blocks."):
        _, index, rest = module.split(".", 2)
        return f"blocks.{index}.{BLOCK_NAMES[rest]}.{leaf}"
    return f"{MODEL_NAMES.get(module, module)}.{leaf}"


def their_param(params: dict, name: str) -> torch.nn.Parameter:
    """The release's parameter of a tats one (TATs' blocks hold one MLP, Trokens' a list)."""
    target = release_name(name)
    return params[target] if target in params else params[target.replace(".mlp.0.", ".mlp.")]


def _copy_weights(model: TATsModel, theirs: torch.nn.Module) -> None:
    """tats' weights into the release's model; every trained parameter of it must be set."""
    their_params = dict(theirs.named_parameters())
    unset = {n for n, p in their_params.items() if p.requires_grad and not n.startswith("dino.")}
    unset.discard("spatial_pos_embed")  # USE_BASE_POS_EMBED: the release never reads it
    with torch.no_grad():
        for name, param in model.named_parameters():
            target = their_param(their_params, name)
            assert target.shape == param.shape, name
            target.copy_(param)
            unset -= {n for n, p in their_params.items() if p is target}
    assert not unset, f"release parameters tats has no counterpart for: {sorted(unset)}"


def _episode(method: str, generator: torch.Generator) -> dict:
    """One episode's clips (supports class by class, then queries): DINOv2-shaped patch grids,
    positions in [-1, 1], visibility, query frames on the time base, the stored frames."""
    n = WAY * (SHOT + QUERIES)
    frames = np.linspace(0, TIME_BASE - 1, FRAMES).astype(int)
    query = torch.randint(0, TIME_BASE - 8, (n, POINTS), generator=generator).numpy()
    if method == "trokens":
        query[:] = 0  # semantic points are tracked both ways: they exist at every frame
    return {
        "features": torch.randn(n, FRAMES, 16, 16, 384, generator=generator),
        "positions": torch.rand(n, FRAMES, POINTS, 2, generator=generator) * 2 - 1,
        "visible": torch.rand(n, FRAMES, POINTS, generator=generator) > 0.25,
        "query_frame": query, "frames": frames,
        "labels": torch.arange(WAY).repeat_interleave(SHOT + QUERIES).reshape(WAY, -1),
        "classes": torch.randperm(CLASSES, generator=generator)[:WAY],
    }  # fmt: skip


def _order(episode: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clip order (supports, then queries), episode labels and global class labels."""
    labels = episode["labels"]
    start = torch.arange(WAY)[:, None] * (SHOT + QUERIES)
    index = torch.cat([(start + torch.arange(SHOT)).reshape(-1),
                       (start + SHOT + torch.arange(QUERIES)).reshape(-1)])  # fmt: skip
    episode_labels = torch.cat([labels[:, :SHOT].reshape(-1), labels[:, SHOT:].reshape(-1)])
    return index, episode_labels, episode["classes"][episode_labels]


def _tats_mask(method: str, episode: dict) -> torch.Tensor:
    real = np.ones(POINTS, bool)
    mode = "query" if method == "tats" else "all"  # --fixes none: Trokens' release mask
    masks = [point_mask(mode, episode["frames"], q, v, real)
             for q, v in zip(episode["query_frame"], episode["visible"].numpy(),
                             strict=True)]  # fmt: skip
    return torch.from_numpy(np.stack(masks))


def _release_metadata(release, method: str, episode: dict, episode_labels, sample_types) -> dict:
    """What the release's loader hands its model, from the release's own functions."""
    sampler = release["slowfast.datasets.point_sampler" if method == "tats" else
                      "trokens.datasets.point_sampler"]  # fmt: skip
    masks = []
    for query in episode["query_frame"]:
        # TATs' point files hold `per_point_queries`; Trokens' loader finds none and uses 0s.
        found = query if method == "tats" else np.zeros(POINTS, np.int64)
        full = sampler.get_point_query_mask(found, np.ones((TIME_BASE, POINTS), bool))
        masks.append(torch.from_numpy(full[episode["frames"]]))
    metadata = {
        "pred_tracks": episode["positions"].clone(),
        "pred_visibility": episode["visible"].clone(),
        "pred_query_mask": torch.stack(masks),
        "batch_label": episode_labels,
        "sample_type": sample_types,
    }
    if method == "trokens":
        hod = release["trokens.datasets.hod"].get_orientation_hist
        metadata["hod_feat"] = torch.stack([
            torch.tensor(hod(p.permute(1, 0, 2).numpy(), 32, preserve_temporal=True))
            for p in episode["positions"]
        ])  # fmt: skip
    return metadata


def _close(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    ours, theirs = ours.detach().double(), theirs.detach().double()
    assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
    error = (ours - theirs).abs().max().item()
    assert error <= TOLERANCE * max(1.0, theirs.abs().max().item()), f"{name}: {error:.2e}"


@pytest.mark.parametrize("method", ["tats", "trokens"])
def test_tats_is_the_release_with_every_fix_off(release, method, monkeypatch):
    torch.manual_seed(0)
    motion = "both" if method == "trokens" else "none"
    cfg = ModelConfig(feature_dim=384, num_frames=FRAMES, grid_size=16, num_classes=CLASSES,
                      motion=motion, hod_bins=32, num_points=POINTS, fixes=())  # fmt: skip
    ours = TATsModel(cfg)
    theirs, release_cfg = _release_model(release, method, monkeypatch)
    _copy_weights(ours, theirs)
    ours.train(), theirs.train()  # drop path is 0 at depth 1, dropouts 0: deterministic

    episode = _episode(method, torch.Generator().manual_seed(1))
    index, episode_labels, classes = _order(episode)
    sample_types = np.array(["support"] * (WAY * SHOT) + ["query"] * (WAY * QUERIES))
    features = episode["features"][index]
    positions, visible = episode["positions"][index], episode["visible"][index]
    episode = {**episode, "features": features, "positions": positions, "visible": visible,
               "query_frame": episode["query_frame"][index.numpy()]}  # fmt: skip

    stages: dict[str, dict[str, torch.Tensor]] = {"ours": {}, "theirs": {}}

    def keep(side: str, name: str, pick=lambda out: out):
        def hook(module, args, out):
            stages[side][name] = pick(out)
        return hook

    for i, block in enumerate(ours.blocks):
        block.register_forward_hook(keep("ours", f"block {i}"))
        block.register_forward_pre_hook(lambda m, args, i=i: stages["ours"].__setitem__(
            f"block {i} input", args[0]))  # fmt: skip
    for i, block in enumerate(theirs.blocks):
        block.register_forward_hook(keep("theirs", f"block {i}", lambda out: out[0]))
        block.register_forward_pre_hook(lambda m, args, i=i: stages["theirs"].__setitem__(
            f"block {i} input", args[0]))  # fmt: skip
    if method == "trokens":
        ours.hod_embed.register_forward_hook(keep("ours", "HoD embedding"))
        ours.offsets_embed.register_forward_hook(keep("ours", "offsets embedding"))
        theirs.hod_motion_module.register_forward_hook(keep("theirs", "HoD embedding"))
        theirs.cross_motion_module.register_forward_hook(keep("theirs", "offsets embedding"))

    # tats: the trainer's step (tats/train.py train_epoch) on the episode.
    mask = _tats_mask(method, episode)
    tokens, logits = ours(features, positions, mask, visible)
    n = WAY * SHOT
    scores = hausdorff_scores(tokens[:n], episode_labels[:n], tokens[n:], WAY, SHOT)
    loss = episode_loss(scores, episode_labels[n:], logits, classes)
    loss.total.backward()

    # The release: its loader's metadata, its model, and its train_epoch's loss lines.
    theirs.get_dino_features = lambda x: features  # DINOv2's patch tokens, as stored
    metadata = _release_metadata(release, method, episode, episode_labels, sample_types)
    if method == "tats":
        their_logits, their_tokens = theirs(features, metadata)
    else:
        their_logits, their_tokens = theirs({"video": features, "metadata": metadata})
    matching = release["matching"]
    split = matching["support_query_split"](their_tokens, classes, metadata)
    their_scores = matching["process_patch_tokens"](
        release_cfg, split["support_preds"], split["query_preds"]
    )
    losses = release["slowfast.models.losses" if method == "tats" else "trokens.models.losses"]
    loss_fun = losses.get_loss_func(release_cfg)(reduction="mean")
    their_cls = loss_fun(their_logits / release_cfg.SOLVER.TEMPRATURE, classes)
    their_episode = F.cross_entropy(their_scores / release_cfg.SOLVER.TEMPRATURE,
                                    split["query_batch_labels"])  # fmt: skip
    their_loss = (release_cfg.FEW_SHOT.CLASS_LOSS_LAMBDA * their_cls
                  + release_cfg.FEW_SHOT.Q2S_LOSS_LAMBDA * their_episode)  # fmt: skip
    their_loss.backward()

    b = features.shape[0]
    if method == "trokens":
        for name in ("HoD embedding", "offsets embedding"):
            _close(name, stages["ours"][name], stages["theirs"][name])
    for name in stages["theirs"]:
        if name.startswith("block"):
            _close(name, stages["ours"][name], stages["theirs"][name])
    _close("tokens", tokens, their_tokens)
    _close("CLS logits", logits, their_logits)
    _close("scores", scores, their_scores)
    _close("episode loss", loss.episode, their_episode)
    _close("CLS loss", loss.cls, their_cls)
    _close("loss", loss.total, their_loss)
    their_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        _close(f"gradient of {name}", param.grad, their_param(their_params, name).grad)
    assert b == WAY * (SHOT + QUERIES) and len(stages["theirs"]) >= 2
