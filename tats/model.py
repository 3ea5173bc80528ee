"""The TATs model: trajectory-aligned tokens through divided space-time attention.

Frozen-backbone patch grids [B, S, h, w, C] get learned space and time position embeddings and
are sampled at the point tracks, one token per point and frame. A transformer then attends along
each trajectory over time and across the points of each frame; both attentions only look at the
(point, frame) pairs the query mask allows. The final tokens feed the few-shot metric
(tats/fewshot.py); a CLS token feeds a classifier over the training classes.

Trokens' motion tokens (`ModelConfig.motion`) add, before the transformer, an embedding of each
point's histogram of oriented displacements at each frame and of its offsets to every other
point of the clip at that frame (`orientation_histograms`, `relative_offsets`).

    model = TATsModel(ModelConfig(num_classes=64))
    tokens, cls_logits = model(**{k: batch[k] for k in MODEL_INPUTS})  # [B,S,P,D], [B,classes]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tats.fixes import FIX_NAMES, FIXES

SAMPLING_MODES = ("nearest", "bilinear")
MOTION_FEATURES = ("none", "hod", "offsets", "both")
# What every caller passes the model, by name, from a batch of clips (tats/episodes.py):
# features [B, S, h, w, C], positions [B, S, P, 2] in [-1, 1], mask and visible bool [B, S, P].
MODEL_INPUTS = ("features", "positions", "mask", "visible")
MODEL_FIXES = tuple(f.name for f in FIXES if f.stage == "model")  # tats/fixes.py


@dataclass(frozen=True)
class ModelConfig:
    """Model hyper-parameters; the defaults are the original release's (DINOv2 ViT-B/14, SSv2).

    The original takes D = C (no projection), grid 224 // 14 = 16, depth 1, 8 heads, MLP ratio 4,
    qkv bias, drop path 0.2, all dropouts 0, 64 classes and 8 frames from its SSv2 config, and
    nearest sampling from its defaults.

    width: D, the transformer width. None keeps the feature dimension and adds no projection,
    as the original does; any other value adds a Linear(feature_dim, width) before everything.
    align_corners: True is the original's grid_sample convention (coordinates -1 and +1 at the
    centres of the border patches). False puts them at the frame's edges, which matches
    positions normalised by the frame size exactly.
    drop_path_rate: stochastic depth of the last block, linearly from 0 at the first block (so
    a single block, the default depth, gets none).
    motion: Trokens' motion tokens, "none" (TATs), "hod" (histograms of oriented displacements
    with `hod_bins` bins), "offsets" (relative offsets to all `num_points` points) or "both"
    (Trokens). num_points: P, the points per clip; only the offsets' input size depends on it.
    fixes: the fixes of the releases' model on (tats/fixes.py): "hod-order", "hod-shares"
    (`orientation_histograms`), "motion-init" (`TATsModel.init_weights`); the others are
    ignored here.
    """

    feature_dim: int = 768
    width: int | None = None
    depth: int = 1
    num_heads: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    num_frames: int = 8
    grid_size: int = 16
    num_classes: int = 64
    sampling: str = "nearest"
    align_corners: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.2
    pos_drop_rate: float = 0.0
    head_drop_rate: float = 0.0
    motion: str = "none"
    hod_bins: int = 32
    num_points: int = 256
    fixes: tuple[str, ...] = MODEL_FIXES

    def __post_init__(self) -> None:
        object.__setattr__(self, "fixes", tuple(f for f in MODEL_FIXES if f in self.fixes))
        if self.sampling not in SAMPLING_MODES:
            raise ValueError(
                f"ModelConfig.sampling: {self.sampling!r} is not one of {SAMPLING_MODES}"
            )
        if self.motion not in MOTION_FEATURES:
            raise ValueError(f"ModelConfig.motion: {self.motion!r} is not one of {MOTION_FEATURES}")
        names = ("feature_dim", "depth", "num_heads", "num_frames", "grid_size", "num_classes",
                 "hod_bins", "num_points")  # fmt: skip
        for name in names:
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name}: must be >= 1, got {getattr(self, name)}")
        if self.width is not None and self.width < 1:
            raise ValueError(f"ModelConfig.width: must be >= 1 or None, got {self.width}")
        if self.dim % self.num_heads:
            raise ValueError(
                f"ModelConfig: width {self.dim} is not divisible by {self.num_heads} heads"
            )

    @property
    def dim(self) -> int:
        """The transformer width D."""
        return self.feature_dim if self.width is None else self.width

    @property
    def uses_hod(self) -> bool:
        return self.motion in ("hod", "both")

    @property
    def uses_offsets(self) -> bool:
        return self.motion in ("offsets", "both")


def orientation_histograms(
    positions: Tensor, bins: int, release_order: bool = False, release_shares: bool = False
) -> Tensor:
    """Histograms of oriented displacements per frame: [..., S, P, 2] -> [..., S, P, bins].

    At frame s > 0 a point's displacement from frame s-1 votes with its length for its angle;
    bin k is centred on the angle 2 pi k / bins (bin 0: +x, rightward; angles grow towards +y),
    and an angle between two bin centres is split between them linearly, the nearer bin getting
    more. Frame 0 has no displacement: all zeros. Not normalised (Trokens' per-frame HOD).

    release_order: bin k centred on -pi + 2 pi k / bins instead, as Trokens' release
    (`trokens/datasets/hod.py`, `get_orientation_hist`: bin 0 leftward, the same histogram
    rotated by half a turn). release_shares: the nearer bin gets the smaller share, as there.
    """
    step = positions[..., 1:, :, :] - positions[..., :-1, :, :]
    magnitude = step.float().norm(dim=-1)
    angle = torch.atan2(step[..., 1].float(), step[..., 0].float())
    if release_order:
        where = (angle / math.pi + 1) / 2 * bins  # in [0, bins]
    else:
        where = torch.remainder(angle / (2 * math.pi) * bins, bins)  # in [0, bins]
    lower = where.floor()
    upper_share = where - lower
    if release_shares:
        upper_share = 1 - upper_share
    lower = lower.long() % bins
    hist = step.new_zeros((*magnitude.shape, bins), dtype=torch.float32)
    hist.scatter_add_(-1, lower[..., None], (magnitude * (1 - upper_share))[..., None])
    hist.scatter_add_(-1, ((lower + 1) % bins)[..., None], (magnitude * upper_share)[..., None])
    return torch.cat([torch.zeros_like(hist[..., :1, :, :]), hist], dim=-3)


def relative_offsets(positions: Tensor, visible: Tensor) -> Tensor:
    """Cross-trajectory offsets: positions [..., S, P, 2], visible [..., S, P] -> [..., S, P, 2P].

    Point m at frame s gets (p_m - p_n) for every point n, as (x, y) pairs in point order
    (n-major), zero unless both m and n are visible at s. The point order must be canonical:
    the n-th pair feeds the same inputs of the embedding in every clip.
    """
    positions = positions.float()
    offsets = positions[..., :, None, :] - positions[..., None, :, :]  # [..., S, P, P, 2]
    both = visible[..., :, None] & visible[..., None, :]
    offsets = torch.where(both[..., None], offsets, 0.0)
    return offsets.flatten(-2)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation of Trokens' motion layers (CLIP's)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class MotionEmbed(nn.Module):
    """Trokens' motion embedding: Linear(in -> 4D), QuickGELU, Linear(4D -> D), LayerNorm
    (`trokens/models/branches/motion_blocks.py`, `CrossMotionModule` and `HODMotionModule`)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, 4 * dim)
        self.act = QuickGELU()
        self.fc2 = nn.Linear(4 * dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.fc2(self.act(self.fc1(x))))


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: zero entries along the first dim with probability p, rescale the rest.

    The first dim is whatever the caller batches over: trajectories in the temporal attention,
    frames in the spatial attention, clips in the MLP, as in the original.
    """
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class Attention(nn.Module):
    """Multi-head self-attention over sequences whose keys are masked per sequence."""

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool, attn_drop: float, proj_drop: float
    ):
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        """x [N, L, D]; key_mask [N, L] bool, True where a token may be attended to."""
        n, length, dim = x.shape
        qkv = self.qkv(x).view(n, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        # A sequence without any valid key (a padding trajectory) would get NaN from a fully
        # masked softmax: let it attend to its own keys, then zero what it receives.
        has_key = key_mask.any(dim=-1)
        attn_mask = (key_mask | ~has_key[:, None])[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop if self.training else 0.0
        )
        out = torch.where(has_key[:, None, None, None], out, 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(n, length, dim)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DividedSpaceTimeBlock(nn.Module):
    """TimeSformer-style block: attention along each trajectory, then across each frame, then MLP.

    The time branch's residual goes through an extra Linear (temporal_fc). In the space branch
    every frame gets its own copy of the CLS token; the copies' updates are averaged over frames.
    """

    def __init__(self, cfg: ModelConfig, drop_path_rate: float):
        super().__init__()
        dim = cfg.dim
        attn = dict(
            num_heads=cfg.num_heads,
            qkv_bias=cfg.qkv_bias,
            attn_drop=cfg.attn_drop_rate,
            proj_drop=cfg.drop_rate,
        )
        self.temporal_norm = nn.LayerNorm(dim, eps=1e-6)
        self.temporal_attn = Attention(dim, **attn)
        self.temporal_fc = nn.Linear(dim, dim)
        self.spatial_norm = nn.LayerNorm(dim, eps=1e-6)
        self.spatial_attn = Attention(dim, **attn)
        self.mlp_norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cfg.drop_rate)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x [B, 1 + P*S, D]: CLS, then the tokens point-major; mask [B, P, S] bool."""
        b, _, d = x.shape
        p, s = mask.shape[1:]
        cls, tokens = x[:, :1], x[:, 1:]

        traj = self.temporal_norm(tokens).reshape(b * p, s, d)
        res = self.temporal_attn(traj, mask.reshape(b * p, s))
        res = drop_path(res, self.drop_path_rate, self.training)
        tokens = tokens + self.temporal_fc(res).reshape(b, p * s, d)

        frames = tokens.reshape(b, p, s, d).transpose(1, 2).reshape(b * s, p, d)
        frames = torch.cat([cls.expand(b, s, d).reshape(b * s, 1, d), frames], dim=1)
        key_mask = torch.cat([mask.new_ones(b * s, 1), mask.transpose(1, 2).reshape(b * s, p)], 1)
        res = self.spatial_attn(self.spatial_norm(frames), key_mask)
        res = drop_path(res, self.drop_path_rate, self.training)
        cls = cls + res[:, 0].reshape(b, s, d).mean(dim=1, keepdim=True)
        tokens = tokens + res[:, 1:].reshape(b, s, p, d).transpose(1, 2).reshape(b, p * s, d)

        x = torch.cat([cls, tokens], dim=1)
        return x + drop_path(self.mlp(self.mlp_norm(x)), self.drop_path_rate, self.training)


class TATsModel(nn.Module):
    """Trajectory-aligned space-time tokens: patch grids + point tracks -> tokens and CLS logits."""

    def __init__(self, cfg: ModelConfig | None = None):
        super().__init__()
        cfg = cfg or ModelConfig()
        self.cfg = cfg
        dim = cfg.dim
        self.proj = nn.Identity() if dim == cfg.feature_dim else nn.Linear(cfg.feature_dim, dim)
        self.space_pos_embed = nn.Parameter(torch.zeros(1, cfg.grid_size**2, dim))
        self.time_pos_embed = nn.Parameter(torch.zeros(1, cfg.num_frames, dim))
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        rates = torch.linspace(0.0, cfg.drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList(DividedSpaceTimeBlock(cfg, rate) for rate in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pre_logits = nn.Sequential(nn.Linear(dim, dim), nn.Tanh())
        self.head_drop = nn.Dropout(cfg.head_drop_rate)
        self.head = nn.Linear(dim, cfg.num_classes)
        self.hod_embed = MotionEmbed(cfg.hod_bins, dim) if cfg.uses_hod else None
        self.offsets_embed = MotionEmbed(2 * cfg.num_points, dim) if cfg.uses_offsets else None
        self.init_weights()

    def init_weights(self) -> None:
        """The original's effective initialisation.

        Its Xavier pass over every parameter with more than one dim overwrote the truncated
        normal it had given the embeddings and the CLS token, and was itself overwritten for
        Linear (truncated normal, std 0.02, zero bias) and LayerNorm (1, 0) layers. The motion
        embeddings are initialised like every other layer with the fix "motion-init" (Trokens
        created them after this pass, so they kept PyTorch's defaults, as without it).
        """
        for param in (self.space_pos_embed, self.time_pos_embed, self.cls_token):
            nn.init.xavier_uniform_(param)
        motion = {id(m) for e in (self.hod_embed, self.offsets_embed) if e is not None
                  for m in e.modules()}  # fmt: skip
        for m in self.modules():
            if id(m) in motion and "motion-init" not in self.cfg.fixes:
                continue
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self, fixes: tuple[str, ...] = FIX_NAMES) -> set[str]:
        """Parameters trained without weight decay, by the fixes on (tats/fixes.py).

        The CLS token always. "embed-decay": the position embeddings too (the original meant to
        exempt them but named 'pos_embed' and 'temp_embed', which match no parameter).
        "motion-decay": the motion embeddings' biases and final LayerNorm, whose gain sets how
        strongly motion enters the tokens (Trokens decayed them by 0.5 too, which pulls that
        gain, and so the motion tokens, towards zero); their Linear weights decay as all others.
        """
        spared = {"cls_token"}
        if "embed-decay" in fixes:
            spared |= {"space_pos_embed", "time_pos_embed"}
        for name, param in self.named_parameters():
            motion = name.startswith(("hod_embed.", "offsets_embed."))
            if motion and param.ndim == 1 and "motion-decay" in fixes:
                spared.add(name)
        return spared

    def sample_tokens(self, features: Tensor, positions: Tensor) -> Tensor:
        """Position-embedded patch grids sampled at the tracks.

        features [B, S, h, w, C]; positions [B, S, P, 2] as (x, y) in [-1, 1].
        Returns [B, S, P, D]; points outside the grid sample zeros (embeddings included).
        """
        cfg = self.cfg
        if features.ndim != 5:
            raise ValueError(f"features: expected [B, S, h, w, C], got {tuple(features.shape)}")
        b, s, h, w, c = features.shape
        if (s, h, w, c) != (cfg.num_frames, cfg.grid_size, cfg.grid_size, cfg.feature_dim):
            raise ValueError(
                f"features: expected [B, {cfg.num_frames}, {cfg.grid_size}, {cfg.grid_size}, "
                f"{cfg.feature_dim}] (num_frames, grid_size, grid_size, feature_dim), "
                f"got {tuple(features.shape)}"
            )
        if positions.ndim != 4 or positions.shape[:2] != (b, s) or positions.shape[3] != 2:
            raise ValueError(f"positions: expected [{b}, {s}, P, 2], got {tuple(positions.shape)}")
        p, d = positions.shape[2], cfg.dim

        x = self.proj(features.to(self.space_pos_embed.dtype))
        x = x + self.space_pos_embed.view(1, 1, h, w, d) + self.time_pos_embed.view(1, s, 1, 1, d)
        grid = self.pos_drop(x).reshape(b * s, h, w, d).permute(0, 3, 1, 2)
        sampled = F.grid_sample(
            grid,
            positions.reshape(b * s, p, 1, 2).to(grid.dtype),
            mode=cfg.sampling,
            padding_mode="zeros",
            align_corners=cfg.align_corners,
        )  # [B*S, D, P, 1]
        return sampled.squeeze(-1).transpose(1, 2).reshape(b, s, p, d)

    def encode(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Run the transformer on trajectory tokens [B, S, P, D] under the query mask [B, S, P].

        Returns the final-normed tokens [B, S, P, D] and CLS embedding [B, D]. Masked (point,
        frame) pairs are never attended to, so CLS and the unmasked tokens do not depend on
        them; a masked pair's own token is still computed, and the original's few-shot metric
        averages it in. Tokens of padding points (masked at every frame) are zero.
        """
        if mask.dtype != torch.bool or mask.shape != tokens.shape[:3]:
            got = f"{mask.dtype} {tuple(mask.shape)}"
            raise ValueError(f"mask: expected bool {tuple(tokens.shape[:3])}, got {got}")
        b, s, p, d = tokens.shape
        x = torch.cat(
            [self.cls_token.expand(b, 1, d), tokens.transpose(1, 2).reshape(b, p * s, d)], 1
        )
        point_mask = mask.transpose(1, 2)  # [B, P, S], the token order
        for block in self.blocks:
            x = block(x, point_mask)
        x = self.norm(x)
        tokens = x[:, 1:].reshape(b, p, s, d).transpose(1, 2)
        is_point = mask.any(dim=1)[:, None, :, None]
        return torch.where(is_point, tokens, 0.0), x[:, 0]

    def forward_head(self, cls: Tensor) -> Tensor:
        """CLS embedding [B, D] -> logits over the training classes [B, num_classes]."""
        return self.head(self.head_drop(self.pre_logits(cls)))

    def motion_tokens(self, positions: Tensor, visible: Tensor | None) -> Tensor | None:
        """The motion embeddings [B, S, P, D] added to the sampled tokens; None without motion.

        positions [B, S, P, 2] in [-1, 1]; visible [B, S, P] bool (the offsets' pair mask).
        """
        cfg, motion = self.cfg, None
        if self.hod_embed is not None:
            hist = orientation_histograms(positions, cfg.hod_bins, "hod-order" not in cfg.fixes,
                                          "hod-shares" not in cfg.fixes)  # fmt: skip
            motion = self.hod_embed(hist)
        if self.offsets_embed is not None:
            p = positions.shape[2]
            if p != cfg.num_points:
                raise ValueError(
                    f"positions: the offsets embedding takes {cfg.num_points} points per clip "
                    f"(ModelConfig.num_points), got {p}"
                )
            want = tuple(positions.shape[:3])
            if visible is None or visible.dtype != torch.bool or tuple(visible.shape) != want:
                got = None if visible is None else f"{visible.dtype} {tuple(visible.shape)}"
                raise ValueError(f"visible: expected bool {want} for the offsets, got {got}")
            offsets = self.offsets_embed(relative_offsets(positions, visible))
            motion = offsets if motion is None else motion + offsets
        return motion

    def forward(
        self, features: Tensor, positions: Tensor, mask: Tensor, visible: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """features [B, S, h, w, C], positions [B, S, P, 2] in [-1, 1], mask [B, S, P] bool,
        visible [B, S, P] bool (needed by the offsets motion features only).

        Returns tokens [B, S, P, D] for the few-shot metric and CLS logits [B, num_classes].
        """
        tokens = self.sample_tokens(features, positions)
        motion = self.motion_tokens(positions, visible)
        if motion is not None:
            tokens = tokens + motion.to(tokens.dtype)
        tokens, cls = self.encode(tokens, mask)
        return tokens, self.forward_head(cls)
