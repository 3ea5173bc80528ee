"""Frame feature backbones, looked up by name: DINOv2 through timm, and a weight-free `pixels`.

A backbone maps uint8 RGB frames [B, S, H, W, 3] to patch-feature grids [B, S, h, w, C]
(16 x 16 at 224 px for patch 14). Frames are squashed to `size` x `size` (bilinear,
antialiased, aspect not kept), scaled to [0, 1] and normalised (CLIP mean/std by default), as
the original TATs does before its frozen DINOv2.

DINOv2 features are the patch tokens after the final norm, CLS and register tokens dropped.
The weights' 37 x 37 position embedding (518 px) is resampled once at load time exactly as the
official DINOv2 code does at 224 px on every forward (bicubic; for the plain models without
antialias and with its 0.1 scale offset, for the register models with antialias), so that the
features equal those of the official hub models the original used.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tats.pipeline.weights import file_sha256, read_tensor_file
from tats.runtime import extraction_precision, fp32_only

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2"


@dataclass(frozen=True)
class Preprocess:
    """Squash-resize to `size` x `size`, scale to [0, 1], normalise with `mean` / `std`."""

    size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        if self.size <= 0 or len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"preprocess needs size > 0 and 3 means / 3 positive stds: {self}")

    def to_dict(self) -> dict:
        """JSON-native form (lists, not tuples), as stored in store attributes."""
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std)}

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [N, H, W, 3] -> float32 [N, 3, size, size]."""
        x = frames.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True
            )
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


class Backbone(ABC):
    """Frozen patch-feature extractor; subclasses implement `forward` on normalised images."""

    name: str
    patch_size: int
    dim: int
    preprocess: Preprocess
    weights_sha256: str | None
    device: torch.device

    def __init__(self, preprocess: Preprocess | None, device: str | torch.device) -> None:
        self.preprocess = preprocess or Preprocess()
        self.device = torch.device(device)
        if self.preprocess.size % self.patch_size:
            raise ValueError(
                f"backbone {self.name!r}: input size {self.preprocess.size} is not a multiple "
                f"of its patch size {self.patch_size}"
            )

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (h, w) of one frame."""
        side = self.preprocess.size // self.patch_size
        return side, side

    precision_choice = "auto"  # auto, fp32 or bf16 (Trokens' clustering backbone: fp32)

    @property
    def precision(self) -> str:
        """The arithmetic of `forward`: bf16 autocast where the device has bf16 units (CUDA,
        CPUs with AMX or AVX512-BF16), fp32 elsewhere; or as `precision_choice` names it."""
        return extraction_precision(self.precision_choice, self.device)

    @property
    def identity(self) -> dict:
        """What produced a set of features; written into the features store for provenance
        (the precision too: a store is never finished half in bf16 and half in fp32)."""
        return {
            "name": self.name,
            "weights_sha256": self.weights_sha256,
            "preprocess": self.preprocess.to_dict(),
            "precision": self.precision,
        }

    @abstractmethod
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images [N, 3, size, size] on `device` -> float32 [N, h, w, C]."""

    def __call__(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 frames [B, S, H, W, 3] -> float32 features [B, S, h, w, C] on `device`."""
        if frames.ndim != 5:
            raise ValueError(
                f"backbone {self.name!r}: frames must be uint8 [B, S, H, W, 3], got "
                f"{tuple(frames.shape)}"
            )
        batch, steps = frames.shape[:2]
        features = self.encode([frames.reshape(batch * steps, *frames.shape[2:])])
        return features.reshape(batch, steps, *features.shape[1:])

    def encode(self, frames: Sequence[np.ndarray | torch.Tensor]) -> torch.Tensor:
        """Frames of several clips, uint8 [N_i, H_i, W_i, 3] (sizes may differ), in one forward.

        Each clip is resized on the device, then all go through the model together:
        float32 [sum N_i, h, w, C] on `device`.
        """
        with torch.inference_mode():
            images = torch.cat([self.preprocess(self._to_device(f)) for f in frames])
            return self.forward(images)

    def _to_device(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(frames, np.ndarray):  # torch wants positive strides and a writable array
            frames = np.require(frames, requirements=("C", "W"))
        x = torch.as_tensor(frames)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(
                f"backbone {self.name!r}: frames must be uint8 [N, H, W, 3], got "
                f"{x.dtype} {tuple(x.shape)}"
            )
        if self.device.type == "cuda":
            x = x.pin_memory()
        return x.to(self.device, non_blocking=True)


BackboneFactory = Callable[..., Backbone]
_BACKBONES: dict[str, BackboneFactory] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator adding a backbone factory to the registry under `name`."""

    def add(factory: BackboneFactory) -> BackboneFactory:
        if name in _BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered")
        _BACKBONES[name] = factory
        return factory

    return add


def list_backbones() -> list[str]:
    return sorted(_BACKBONES)


def create_backbone(
    name: str,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    preprocess: Preprocess | None = None,
    precision: str = "auto",
    **kwargs,
) -> Backbone:
    """Build the backbone registered as `name`, weights from `weights` or the local caches,
    running in `precision` (auto: bf16 where the device has bf16 units, else fp32).

    Extra keyword arguments go to the model constructor (e.g. `depth=2` for small test models).
    """
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(list_backbones())}")
    extraction_precision(precision, "cpu")  # a bad name fails before the model is built
    if name not in DINOV2_MODELS:
        fp32_only(f"backbone {name!r}", precision)
    backbone = _BACKBONES[name](weights=weights, device=device, preprocess=preprocess, **kwargs)
    backbone.precision_choice = precision
    return backbone


# ---------------------------------------------------------------------------------------------
# DINOv2

# official hub name -> (timm model name, official checkpoint stem)
DINOV2_MODELS = {
    "dinov2_vits14": ("vit_small_patch14_dinov2", "dinov2_vits14"),
    "dinov2_vitb14": ("vit_base_patch14_dinov2", "dinov2_vitb14"),
    "dinov2_vitl14": ("vit_large_patch14_dinov2", "dinov2_vitl14"),
    "dinov2_vits14_reg": ("vit_small_patch14_reg4_dinov2", "dinov2_vits14_reg4"),
    "dinov2_vitb14_reg": ("vit_base_patch14_reg4_dinov2", "dinov2_vitb14_reg4"),
    "dinov2_vitl14_reg": ("vit_large_patch14_reg4_dinov2", "dinov2_vitl14_reg4"),
}


def dinov2_weight_locations(name: str) -> list[tuple[str, Path | None]]:
    """Where weights for `name` are looked for when none are given, in order:
    (description, path if present). Only local caches are read, never the network."""
    from huggingface_hub import try_to_load_from_cache

    timm_name, stem = DINOV2_MODELS[name]
    repo = f"timm/{timm_name}.lvd142m"
    found: list[tuple[str, Path | None]] = []
    for filename in ("model.safetensors", "pytorch_model.bin"):
        cached = try_to_load_from_cache(repo, filename)  # a path, None, or a "known absent" mark
        path = Path(cached) if isinstance(cached, str) else None
        found.append((f"Hugging Face cache {repo}/{filename}", path))
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / f"{stem}_pretrain.pth"
    found.append((f"torch hub cache {hub_file}", hub_file if hub_file.is_file() else None))
    return found


def _find_dinov2_weights(name: str) -> Path:
    locations = dinov2_weight_locations(name)
    for _, path in locations:
        if path is not None:
            return path
    timm_name, stem = DINOV2_MODELS[name]
    base = stem.removesuffix("_reg4")
    looked = "; ".join(description for description, _ in locations)
    raise FileNotFoundError(
        f"no weights for backbone {name!r}: pass --backbone-weights PATH (the official "
        f"{DINOV2_URL}/{base}/{stem}_pretrain.pth, or model.safetensors of the Hugging Face "
        f"repo timm/{timm_name}.lvd142m; --backbone pixels needs no weights); looked in: {looked}"
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    state = read_tensor_file(path, "weights")
    if isinstance(state, dict) and state.get("format") == "tats.train.checkpoint":
        raise ValueError(f"{path}: a tats-train checkpoint, not backbone weights")
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    if not state:
        raise ValueError(f"{path}: an empty state dict, no weights")
    return state


@dataclass(frozen=True)
class VitShape:
    """What a ViT state dict says of its model: width, blocks, patch size, register tokens,
    and whether it uses the official DINOv2 key names (else timm's)."""

    width: int
    depth: int
    patch: int
    registers: int
    official: bool

    @classmethod
    def of(cls, state: dict[str, torch.Tensor]) -> VitShape | None:
        """The shape of a ViT state dict; None where it is not one (no patch embedding)."""
        proj = state.get("patch_embed.proj.weight")
        if proj is None or proj.ndim != 4:
            return None
        registers = state.get("register_tokens", state.get("reg_token"))
        blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
        return cls(
            width=int(proj.shape[0]), depth=len(blocks), patch=int(proj.shape[-1]),
            registers=0 if registers is None or registers.ndim != 3 else int(registers.shape[1]),
            official="mask_token" in state or "register_tokens" in state,
        )  # fmt: skip

    def describe(self) -> str:
        """E.g. "dinov2_vits14_reg (ViT-S/14, 4 registers, 12 blocks, official format)"."""
        size = VIT_SIZES.get(self.width)
        registers = f"{self.registers} registers" if self.registers else "no registers"
        layout = "official" if self.official else "timm"
        what = f"{registers}, {self.depth} blocks, {layout} format"
        if size is None or self.patch != 14 or self.registers not in (0, 4):
            return f"a ViT of width {self.width}, patch {self.patch} ({what}), not a DINOv2 model"
        name = f"dinov2_vit{size.lower()}14" + ("_reg" if self.registers else "")
        offered = "" if name in DINOV2_MODELS else ", which tats does not offer"
        return f"{name} (ViT-{size}/14, {what}){offered}"


VIT_SIZES = {384: "S", 768: "B", 1024: "L", 1536: "g"}


def resample_pos_embed_official(
    pos_embed: torch.Tensor, grid: tuple[int, int], registers: bool
) -> torch.Tensor:
    """Resample a square position embedding [1, (1 +) M*M, C] to `grid` the way the official
    DINOv2 forward does: bicubic; plain models without antialias, with scale factor
    (grid + 0.1) / M; register models with antialias, to the exact size."""
    tokens, dim = pos_embed.shape[1:]
    prefix = 0 if math.isqrt(tokens) ** 2 == tokens else 1
    side = math.isqrt(tokens - prefix)
    if side * side != tokens - prefix:
        raise ValueError(f"pos_embed with {tokens} tokens is not a square grid")
    if (side, side) == tuple(grid):
        return pos_embed
    patches = pos_embed[:, prefix:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if registers:
        patches = F.interpolate(patches, size=tuple(grid), mode="bicubic", antialias=True)
    else:
        scale = ((grid[0] + 0.1) / side, (grid[1] + 0.1) / side)
        patches = F.interpolate(patches, scale_factor=scale, mode="bicubic", antialias=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :prefix], patches], dim=1)


class Dinov2Backbone(Backbone):
    """DINOv2 ViT-*/14 (timm implementation) loaded from official or timm-format weights."""

    patch_size = 14

    def __init__(
        self,
        name: str,
        weights: str | Path | None = None,
        device: str | torch.device = "cpu",
        preprocess: Preprocess | None = None,
        **model_kwargs,
    ) -> None:
        import timm
        from timm.models.vision_transformer import checkpoint_filter_fn

        self.name = name
        super().__init__(preprocess, device)
        timm_name, stem = DINOV2_MODELS[name]
        path = Path(weights) if weights is not None else _find_dinov2_weights(name)
        state = _read_state_dict(path)
        model = timm.create_model(
            timm_name,
            pretrained=False,
            img_size=self.preprocess.size,
            num_classes=0,
            **model_kwargs,
        )
        _check_fits(path, name, state, model)
        state["pos_embed"] = resample_pos_embed_official(
            state["pos_embed"], model.patch_embed.grid_size, registers=stem.endswith("_reg4")
        )
        # timm's own conversion of official key names (registers, cls position, mask token)
        state = checkpoint_filter_fn(state, model)
        expected = model.state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        wrong_shape = [
            k for k, v in state.items() if k in expected and expected[k].shape != v.shape
        ]
        if missing or unexpected or wrong_shape:
            raise ValueError(
                f"{path}: weights do not fit backbone {name!r}: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}, wrong shape {wrong_shape[:5]}"
            )
        model.load_state_dict(state)
        self.weights_sha256 = file_sha256(path)
        self.dim = model.num_features
        self.model = model.eval().requires_grad_(False).to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.precision == "bf16":
            if self.device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                tokens = self.model.forward_features(images)
        else:
            tokens = self.model.forward_features(images)
        patches = tokens[:, self.model.num_prefix_tokens :].float()
        return patches.reshape(images.shape[0], *self.grid, self.dim)


for _name in DINOV2_MODELS:
    register_backbone(_name)(partial(Dinov2Backbone, _name))


def _check_fits(path: Path, name: str, state: dict, model: torch.nn.Module) -> None:
    """Weights of another model fail inside timm's conversion with errors that name neither
    the file nor the model: compare the shapes first."""
    if "pos_embed" not in state:
        raise ValueError(f"{path}: no 'pos_embed'; not a DINOv2 state dict")
    found = VitShape.of(state)
    wanted = (model.num_features, len(model.blocks), Dinov2Backbone.patch_size,
              model.num_reg_tokens)  # fmt: skip
    if found is None or (found.width, found.depth, found.patch, found.registers) != wanted:
        looks = "not a ViT" if found is None else f"they look like {found.describe()}"
        raise ValueError(
            f"{path}: weights do not fit backbone {name!r} (width {wanted[0]}, {wanted[1]} "
            f"blocks, {wanted[3] or 'no'} registers): {looks}"
        )


def check_weights(name: str, weights: str | Path | None = None) -> Path | None:
    """The weights file backbone `name` would load (`weights`, or the caches), read and
    checked to fit its model, which is built on the meta device (nothing allocated or
    initialised): what `tats run` checks before any work. None for `pixels` (no weights)."""
    import timm

    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(list_backbones())}")
    if name not in DINOV2_MODELS:
        if weights is not None:
            raise ValueError(f"backbone {name!r} has no weights; drop --backbone-weights")
        return None
    path = Path(weights) if weights is not None else _find_dinov2_weights(name)
    state = _read_state_dict(path)
    with torch.device("meta"):
        model = timm.create_model(DINOV2_MODELS[name][0], pretrained=False, num_classes=0)
    _check_fits(path, name, state, model)
    return path


# ---------------------------------------------------------------------------------------------
# pixels


@register_backbone("pixels")
class PixelsBackbone(Backbone):
    """Weight-free features for the demo and tests: for each 14 x 14 patch of the normalised
    frame, the mean, standard deviation, and mean absolute horizontal and vertical difference
    of each colour channel (12 numbers), times a fixed random matrix (numpy seed 0) to 64
    channels. Deterministic and cheap; it sees colour and texture, not objects."""

    name = "pixels"
    patch_size = 14
    dim = 64
    weights_sha256 = None
    precision = "fp32"  # on every device

    def __init__(
        self,
        weights: str | Path | None = None,
        device: str | torch.device = "cpu",
        preprocess: Preprocess | None = None,
    ) -> None:
        if weights is not None:
            raise ValueError("backbone 'pixels' has no weights; drop --backbone-weights")
        super().__init__(preprocess, device)
        projection = np.random.default_rng(0).standard_normal((12, self.dim)) / math.sqrt(12)
        self.projection = torch.from_numpy(projection).float().to(self.device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dx = F.pad(images[..., :, 1:] - images[..., :, :-1], (0, 1)).abs()
        dy = F.pad(images[..., 1:, :] - images[..., :-1, :], (0, 0, 0, 1)).abs()
        pooled = F.avg_pool2d(torch.cat([images, images * images, dx, dy], dim=1), self.patch_size)
        mean, square, mean_dx, mean_dy = pooled.split(3, dim=1)
        std = (square - mean * mean).clamp(min=0).sqrt()
        stats = torch.cat([mean, std, mean_dx, mean_dy], dim=1)  # [N, 12, h, w]
        return stats.permute(0, 2, 3, 1) @ self.projection
