"""The CoTracker3 network, written for tats from the paper and the official checkpoint layout.

Parameter and buffer names match the official `scaled_offline.pth` / `scaled_online.pth`
checkpoints (the two differ only in the length of the `time_emb` buffer: 60 and 16 frames).

The refinement runs on *tokens*, one per (track, frame). A `TokenLayout` says which tokens
exist: all of them (the official computation), or a subset when clips of different lengths or
point counts share a batch (padding) or when frames before a point's query frame are skipped.
Per-token work (correlation, linear layers) is done on the existing tokens only; attention
masks the missing ones, so a padded batch computes what each clip would compute alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STRIDE = 4
LATENT_DIM = 128
CORR_RADIUS = 3
CORR_LEVELS = 4
HIDDEN_DIM = 384
NUM_HEADS = 8
NUM_VIRTUAL = 64
INPUT_DIM = 1110  # vis + conf + 4 * 256 correlation + 84 displacement encoding
OFFLINE_WINDOW = 60
ONLINE_WINDOW = 16
MODEL_RESOLUTION = (384, 512)

_NEIGHBOURS = 2 * CORR_RADIUS + 1  # 7: a 7x7 neighbourhood per level


def _instance_norm(x: Tensor) -> Tensor:
    return F.instance_norm(x, eps=1e-5)


def _layer_norm(x: Tensor) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_dim, out_dim, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(out_dim, out_dim, 3, padding=1)
        self.downsample = None
        if stride != 1:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_dim, out_dim, 1, stride=stride), nn.InstanceNorm2d(out_dim)
            )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(_instance_norm(self.conv1(x)))
        y = F.relu(_instance_norm(self.conv2(y)))
        if self.downsample is not None:
            x = self.downsample(x)
        return F.relu(x + y)


class FeatureNet(nn.Module):
    """Stride-4 CNN: four stages of two residual blocks, multi-scale concat, 3x3 and 1x1 convs."""

    def __init__(self, dim: int = LATENT_DIM):
        super().__init__()
        self.conv1 = nn.Conv2d(3, dim // 2, 7, stride=2, padding=3)
        widths = (dim // 2, dim // 4 * 3, dim, dim)
        in_dim = dim // 2
        for i, (width, stride) in enumerate(zip(widths, (1, 2, 2, 2), strict=True), start=1):
            first, second = ResidualBlock(in_dim, width, stride), ResidualBlock(width, width, 1)
            self.add_module(f"layer{i}", nn.Sequential(first, second))
            in_dim = width
        self.conv2 = nn.Conv2d(sum(widths), dim * 2, 3, padding=1)
        self.conv3 = nn.Conv2d(dim * 2, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        size = (x.shape[-2] // STRIDE, x.shape[-1] // STRIDE)
        x = F.relu(_instance_norm(self.conv1(x)))
        scales = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            scales.append(F.interpolate(x, size, mode="bilinear", align_corners=True))
        x = F.relu(_instance_norm(self.conv2(torch.cat(scales, dim=1))))
        return self.conv3(x)


class Mlp(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, approximate: str):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class Attention(nn.Module):
    def __init__(self, dim: int = HIDDEN_DIM, heads: int = NUM_HEADS):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.to_out = nn.Linear(dim, dim)


def attend(q: Tensor, k: Tensor, v: Tensor, heads: int, key_mask: Tensor | None = None) -> Tensor:
    """Multi-head attention of q (G, Lq, D) over k, v (G, Lk, D); key_mask (G, Lk) bool.

    Rows of a group without any key get zeros.
    """
    g, lq, dim = q.shape

    def split(x: Tensor) -> Tensor:
        return x.reshape(g, x.shape[1], heads, dim // heads).transpose(1, 2)

    mask = None
    empty = None
    if key_mask is not None:
        empty = ~key_mask.any(dim=1)
        if empty.any():
            key_mask = key_mask | empty[:, None]
        else:
            empty = None
        mask = key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
    out = out.transpose(1, 2).reshape(g, lq, dim)
    if empty is not None:
        out = out.masked_fill(empty[:, None, None], 0.0)
    return out


class AttnBlock(nn.Module):
    def __init__(self, dim: int = HIDDEN_DIM):
        super().__init__()
        self.attn = Attention(dim)
        self.mlp = Mlp(dim, 4 * dim, dim, approximate="tanh")

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        h = _layer_norm(x)
        k, v = self.attn.to_kv(h).chunk(2, dim=-1)
        x = x + self.attn.to_out(attend(self.attn.to_q(h), k, v, self.attn.heads, key_mask))
        return x + self.mlp(_layer_norm(x))


class CrossAttnBlock(nn.Module):
    def __init__(self, dim: int = HIDDEN_DIM):
        super().__init__()
        self.norm_context = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim)
        self.mlp = Mlp(dim, 4 * dim, dim, approximate="tanh")


@dataclass(frozen=True)
class TokenLayout:
    """Which (track, frame) tokens of a (B, N, T) batch exist, and how to visit them in chunks.

    Existing tokens are stored packed, row-major over (B, N, T): the tokens of one track are
    consecutive rows. Without `token_valid` all B*N*T tokens exist. `frame_valid` (B, T)
    marks real frames (False only for padding of shorter clips).
    """

    batch: int
    points: int
    frames: int
    device: torch.device
    token_valid: Tensor | None = None
    frame_valid: Tensor | None = None
    index: Tensor | None = None  # (M,) flat position of each existing token
    row_of: Tensor | None = None  # (B*N*T,) packed row of each position, -1 where none
    track_rows: tuple[int, ...] | None = None  # first packed row of each track, and M

    @staticmethod
    def make(token_valid: Tensor | None, frame_valid: Tensor | None, shape, device) -> TokenLayout:
        b, n, t = shape
        if frame_valid is not None and bool(frame_valid.all()):
            frame_valid = None
        if token_valid is None or bool(token_valid.all()):
            return TokenLayout(b, n, t, torch.device(device), None, frame_valid)
        flat = token_valid.reshape(-1)
        index = flat.nonzero().squeeze(1)
        row_of = torch.full_like(flat, -1, dtype=torch.long)
        row_of[index] = torch.arange(len(index), device=index.device)
        counts = token_valid.sum(-1).reshape(-1).cumsum(0).tolist()
        return TokenLayout(
            b, n, t, torch.device(device), token_valid, frame_valid, index, row_of, (0, *counts)
        )

    @property
    def count(self) -> int:
        return self.batch * self.points * self.frames if self.index is None else len(self.index)

    def pad(self, x: Tensor) -> Tensor:
        """(M, C) existing tokens -> (B, N, T, C), zeros where a token does not exist."""
        shape = (self.batch, self.points, self.frames, x.shape[-1])
        if self.index is None:
            return x.view(shape)
        out = x.new_zeros(self.batch * self.points * self.frames, x.shape[-1])
        out[self.index] = x
        return out.view(shape)

    def pack(self, x: Tensor) -> Tensor:
        """(B, N, T, C) -> (M, C) existing tokens."""
        x = x.reshape(-1, x.shape[-1])
        return x if self.index is None else x[self.index]

    def token_coords(self) -> tuple[Tensor, Tensor, Tensor]:
        """(clip, point, frame) index of each existing token."""
        b, n, t = self.batch, self.points, self.frames
        flat = torch.arange(b * n * t, device=self.device) if self.index is None else self.index
        return flat // (n * t), (flat // t) % n, flat % t

    def track_chunks(self, rows: int):
        """Yield (clip, first point, end point, packed rows) for whole tracks of one clip."""
        b, n, t = self.batch, self.points, self.frames
        per = max(1, rows // t)
        for clip in range(b):
            for n0 in range(0, n, per):
                n1 = min(n0 + per, n)
                k0, k1 = clip * n + n0, clip * n + n1
                if self.track_rows is None:
                    yield clip, n0, n1, slice(k0 * t, k1 * t)
                else:
                    yield clip, n0, n1, slice(self.track_rows[k0], self.track_rows[k1])

    def track_runs(self, rows: int) -> list[tuple[slice, slice]]:
        """(packed rows, tracks) of runs of consecutive tracks with the same number of tokens,
        at most `rows` tokens a run (or one track): a run's tokens correlate with its tracks'
        support features in one batched matmul."""
        b, n, t = self.batch, self.points, self.frames
        if self.track_rows is None:
            starts = list(range(0, b * n * t + 1, t))
        else:
            starts = list(self.track_rows)
        runs, k = [], 0
        while k < b * n:
            count = starts[k + 1] - starts[k]
            end, stop = k + 1, k + max(1, rows // max(count, 1))
            while end < min(stop, b * n) and starts[end + 1] - starts[end] == count:
                end += 1
            if count:
                runs.append((slice(starts[k], starts[end]), slice(k, end)))
            k = end
        return runs

    def chunk_mask(self, clip: int, n0: int, n1: int) -> Tensor | None:
        return None if self.token_valid is None else self.token_valid[clip, n0:n1]

    def chunk_pad(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """Rows of a track chunk -> (tracks, T, C), zeros where a token does not exist."""
        if mask is None:
            return x.view(-1, self.frames, x.shape[-1])
        out = x.new_zeros(mask.numel(), x.shape[-1])
        out[mask.reshape(-1)] = x
        return out.view(*mask.shape, x.shape[-1])

    @staticmethod
    def chunk_pack(y: Tensor, mask: Tensor | None) -> Tensor:
        """(tracks, T, C) -> rows of the existing tokens."""
        y = y.reshape(-1, y.shape[-1])
        return y if mask is None else y[mask.reshape(-1)]

    def frame_chunks(self, rows: int):
        """Yield (clip, first frame, end frame, packed rows in (frame, point) order, mask).

        mask (frames, N) marks which (frame, point) tokens exist (None: all of them).
        """
        b, n, t = self.batch, self.points, self.frames
        per = max(1, rows // n)
        points = torch.arange(n, device=self.device)
        for clip in range(b):
            for t0 in range(0, t, per):
                t1 = min(t0 + per, t)
                frames = torch.arange(t0, t1, device=self.device)
                pos = (clip * n + points[None]) * t + frames[:, None]  # (frames, N)
                if self.row_of is None:
                    yield clip, t0, t1, pos.reshape(-1), None
                else:
                    row = self.row_of[pos]
                    mask = row >= 0
                    yield clip, t0, t1, row[mask], mask

    def frames_with_tokens(self) -> Tensor | None:
        """(B*T,) whether a frame has any point token (None: all have)."""
        if self.token_valid is None:
            return None
        return self.token_valid.any(dim=1).reshape(-1)


class UpdateFormer(nn.Module):
    """Transformer over tokens: attention along each track, and across tracks through 64
    learned virtual tracks; predicts coordinate, visibility and confidence updates.

    Point tokens are updated in place, chunk by chunk, so temporaries stay small.
    """

    def __init__(self, depth: int = 3, dim: int = HIDDEN_DIM):
        super().__init__()
        self.input_transform = nn.Linear(INPUT_DIM, dim)
        self.flow_head = nn.Linear(dim, 2)
        self.vis_conf_head = nn.Linear(dim, 2)
        self.virual_tracks = nn.Parameter(torch.randn(1, NUM_VIRTUAL, 1, dim))  # sic: official
        self.time_blocks = nn.ModuleList(AttnBlock(dim) for _ in range(depth))
        self.space_virtual_blocks = nn.ModuleList(AttnBlock(dim) for _ in range(depth))
        self.space_point2virtual_blocks = nn.ModuleList(CrossAttnBlock(dim) for _ in range(depth))
        self.space_virtual2point_blocks = nn.ModuleList(CrossAttnBlock(dim) for _ in range(depth))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.flow_head.weight, std=0.001)
        nn.init.trunc_normal_(self.vis_conf_head.weight, std=0.001)

    def forward(self, pts: Tensor, layout: TokenLayout, rows: int) -> Tensor:
        """pts (M, D) input-transformed existing tokens, updated in place -> (M, 4) deltas."""
        b, t = layout.batch, layout.frames
        dim = pts.shape[-1]
        virt = self.virual_tracks.expand(b, NUM_VIRTUAL, t, dim).reshape(-1, t, dim)
        frame_mask = None
        if layout.frame_valid is not None:
            frame_mask = layout.frame_valid.repeat_interleave(NUM_VIRTUAL, dim=0)
        for i, time_block in enumerate(self.time_blocks):
            for clip, n0, n1, sl in layout.track_chunks(rows):
                _time_attention(time_block, pts[sl], layout.chunk_mask(clip, n0, n1), layout)
            virt = time_block(virt, frame_mask).view(b, NUM_VIRTUAL, t, dim)
            virt = virt.transpose(1, 2).reshape(b * t, NUM_VIRTUAL, dim)
            virt = _virtual_from_points(self.space_virtual2point_blocks[i], virt, pts, layout, rows)
            virt = self.space_virtual_blocks[i](virt)
            block = self.space_point2virtual_blocks[i]
            kv = block.cross_attn.to_kv(block.norm_context(virt))
            for clip, n0, n1, sl in layout.track_chunks(rows):
                mask = layout.chunk_mask(clip, n0, n1)
                _points_from_virtual(block, pts[sl], kv[clip * t : (clip + 1) * t], mask, layout)
            virt = virt.view(b, t, NUM_VIRTUAL, dim).transpose(1, 2).reshape(-1, t, dim)
        heads = (self.flow_head, self.vis_conf_head)
        return _rowwise(lambda y: torch.cat([full_precision(h, y) for h in heads], -1), pts, rows)


def _time_attention(block: AttnBlock, x: Tensor, mask: Tensor | None, layout: TokenLayout):
    """Attention along each track of a chunk of whole tracks, then the MLP; x updated in place."""
    attn = block.attn
    h = _layer_norm(x)
    k, v = attn.to_kv(h).chunk(2, dim=-1)
    q, k, v = (layout.chunk_pad(z, mask) for z in (attn.to_q(h), k, v))
    out = layout.chunk_pack(attend(q, k, v, attn.heads, mask), mask)
    x += attn.to_out(out)
    x += block.mlp(_layer_norm(x))


def _virtual_from_points(
    block: CrossAttnBlock, virt: Tensor, pts: Tensor, layout: TokenLayout, rows: int
) -> Tensor:
    """Virtual tokens (B T, 64, D) attend to the point tokens of their frame."""
    attn = block.cross_attn
    n, t = layout.points, layout.frames
    q = attn.to_q(_layer_norm(virt))
    out = torch.empty_like(q)
    for clip, t0, t1, gather, mask in layout.frame_chunks(rows):
        k, v = attn.to_kv(block.norm_context(pts[gather])).chunk(2, dim=-1)
        if mask is not None:
            k, v = (layout.chunk_pad(z, mask) for z in (k, v))
        else:
            k, v = k.view(t1 - t0, n, -1), v.view(t1 - t0, n, -1)
        rows_q = slice(clip * t + t0, clip * t + t1)
        out[rows_q] = attend(q[rows_q], k, v, attn.heads, mask)
    out = attn.to_out(out)
    has_tokens = layout.frames_with_tokens()
    if has_tokens is not None:  # a frame without point tokens leaves its virtual tokens as is
        out = out * has_tokens[:, None, None]
    virt = virt + out
    return virt + block.mlp(_layer_norm(virt))


def _points_from_virtual(
    block: CrossAttnBlock, x: Tensor, kv: Tensor, mask: Tensor | None, layout: TokenLayout
) -> None:
    """Tokens of a chunk of tracks attend to the 64 virtual tokens of their frame (kv: T, 64,
    2D); then the MLP. x is updated in place."""
    attn = block.cross_attn
    q = layout.chunk_pad(attn.to_q(_layer_norm(x)), mask).transpose(0, 1)  # (T, tracks, D)
    k, v = kv.chunk(2, dim=-1)
    out = attend(q.contiguous(), k, v, attn.heads).transpose(0, 1)
    x += attn.to_out(layout.chunk_pack(out, mask))
    x += block.mlp(_layer_norm(x))


def full_precision(layer: nn.Module, x: Tensor) -> Tensor:
    """`layer(x)` in fp32 under bf16 autocast too: the input layer and the heads cost little,
    and their rounding moves tracks the most (the heads' deltas add up over iterations)."""
    with torch.autocast(x.device.type, enabled=False):
        return layer(x.float())


def _rowwise(fn, x: Tensor, rows: int) -> Tensor:
    """Apply a per-row function in chunks of `rows` rows to bound the size of temporaries."""
    if x.shape[0] <= rows:
        return fn(x)
    return torch.cat([fn(x[i : i + rows]) for i in range(0, x.shape[0], rows)])


def posenc(x: Tensor, num_scales: int = 10) -> Tensor:
    """x followed by sin and cos of x * 2^k, k < num_scales (the official 84-channel layout)."""
    scales = 2.0 ** torch.arange(num_scales, device=x.device, dtype=x.dtype)
    xb = (x[..., None, :] * scales[:, None]).flatten(-2)
    return torch.cat([x, torch.sin(torch.cat([xb, xb + 0.5 * math.pi], dim=-1))], dim=-1)


def sincos_time_embedding(dim: int, length: int) -> Tensor:
    """(1, length, dim) 1-D sin/cos embedding of frame positions 0..length-1."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = torch.arange(length, dtype=torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)[None].float()


class CoTracker3(nn.Module):
    """CoTracker3 weights and the pieces of its computation (`pyramid`, `refine`)."""

    def __init__(self, window_len: int = OFFLINE_WINDOW, model_resolution=MODEL_RESOLUTION):
        super().__init__()
        self.window_len = window_len
        self.model_resolution = tuple(model_resolution)
        self.fnet = FeatureNet(LATENT_DIM)
        self.updateformer = UpdateFormer()
        self.corr_mlp = Mlp(_NEIGHBOURS**4, 384, 256, approximate="none")
        self.register_buffer("time_emb", sincos_time_embedding(INPUT_DIM, window_len))
        for m in self.fnet.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def time_embedding(self, length: int) -> Tensor:
        """(1, length, INPUT_DIM): `time_emb` linearly resampled to `length` frames."""
        if length == self.time_emb.shape[1]:
            return self.time_emb
        emb = F.interpolate(self.time_emb.float().transpose(1, 2), size=length, mode="linear")
        return emb.transpose(1, 2)

    def pyramid(self, video: Tensor, dtype: torch.dtype = torch.float32) -> list[Tensor]:
        """video (F, 3, H, W) float 0..255 at model resolution -> 4 levels (F, h, w, C).

        Frames are independent, so callers may split a clip into chunks freely.
        """
        fmaps = self.fnet(2 * (video / 255.0) - 1.0).float()
        fmaps = fmaps / fmaps.square().sum(1, keepdim=True).clamp_min(1e-12).sqrt()
        levels = [fmaps]
        for _ in range(CORR_LEVELS - 1):
            levels.append(F.avg_pool2d(levels[-1], 2, stride=2))
        return [lvl.to(dtype).permute(0, 2, 3, 1).contiguous() for lvl in levels]

    def support_features(self, pyramid: list[Tensor], frame: Tensor, xy: Tensor) -> list[Tensor]:
        """Per level (Q, 49, C) features around Q query points (xy in stride-4 units)."""
        out = []
        for level, fmap in enumerate(pyramid):
            patch, frac = window(fmap, frame, xy / 2**level)
            out.append(bilinear(patch, frac).flatten(1, 2))
        return out

    def correlation(self, pyramid, frame: Tensor, xy: Tensor, support: list[Tensor]) -> Tensor:
        """Correlation embedding (M, 1024) of M tokens.

        frame (M,) pyramid row of each token; xy (M, 2) position in stride-4 units; support
        per level (G, 49, C) query features, G dividing M: token i uses support i // (M / G).
        The 7x7 bilinear samples around a token are linear in the 8x8 integer window that
        holds them, so the window is correlated first and interpolated after (fewer values).
        """
        m, groups = xy.shape[0], support[0].shape[0]
        volumes = None
        for level, fmap in enumerate(pyramid):
            patch, frac = window(fmap, frame, xy / 2**level)  # (M, 8, 8, C)
            patch = patch.view(groups, -1, patch.shape[-1])
            corr = torch.bmm(patch, support[level].transpose(1, 2).to(patch.dtype))
            if volumes is None:
                volumes = corr.new_empty(CORR_LEVELS, m, _NEIGHBOURS, _NEIGHBOURS, corr.shape[-1])
            bilinear(corr.view(m, 8, 8, -1), frac, out=volumes[level])
        emb = self.corr_mlp(volumes.view(CORR_LEVELS * m, -1))  # one GEMM for all levels
        return emb.view(CORR_LEVELS, m, -1).transpose(0, 1).reshape(m, -1)

    def refine(
        self,
        pyramid: list[Tensor],
        frame_rows: Tensor,
        support: list[Tensor],
        coords: Tensor,
        vis: Tensor,
        conf: Tensor,
        layout: TokenLayout,
        time_emb: Tensor,
        iters: int = 6,
        rows: int = 2048,
        corr_rows: int = 512,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Iteratively update tracks (the official offline iteration, on existing tokens).

        pyramid: levels (F, h, w, C); frame_rows (B, T): pyramid row of each clip frame;
        support: per level (B, N, 49, C); coords (B, N, T, 2) in stride-4 units; vis, conf
        (B, N, T) logits; time_emb (B or 1, T, INPUT_DIM). Returns updated coords, vis, conf;
        tokens that do not exist keep their input values. `rows` and `corr_rows` bound the
        size of the chunks the work is done in (results do not depend on them).
        """
        b, n, t = layout.batch, layout.points, layout.frames
        tb, _, tt = layout.token_coords()
        frame = frame_rows[tb, tt]
        support = [s.reshape(b * n, *s.shape[2:]) for s in support]
        runs = layout.track_runs(corr_rows)
        emb = time_emb.expand(b, t, -1)
        scale = coords.new_tensor(self.model_resolution[::-1]).repeat(2) / STRIDE
        exists = None if layout.token_valid is None else layout.token_valid[..., None].float()
        xy = layout.pack(coords)
        vis_conf = layout.pack(torch.stack([vis, conf], dim=-1))
        pts = None
        for _ in range(iters):
            full = layout.pad(xy)
            forward = F.pad(full[:, :, :-1] - full[:, :, 1:], (0, 0, 0, 1))
            backward = F.pad(full[:, :, 1:] - full[:, :, :-1], (0, 0, 1, 0))
            if exists is not None:  # no displacement to a frame without a token (as at clip ends)
                forward = forward * F.pad(exists[:, :, 1:], (0, 0, 0, 1))
                backward = backward * F.pad(exists[:, :, :-1], (0, 0, 1, 0))
            rel = layout.pack(torch.cat([forward, backward], dim=-1)) / scale
            for sl, tracks in runs:
                sup = [s[tracks] for s in support]
                corr = self.correlation(pyramid, frame[sl], xy[sl], sup).to(xy.dtype)
                x = torch.cat([vis_conf[sl], corr, posenc(rel[sl])], dim=-1) + emb[tb[sl], tt[sl]]
                x = full_precision(self.updateformer.input_transform, x)
                if pts is None:
                    pts = x.new_empty(len(xy), x.shape[-1], dtype=torch.float32)
                pts[sl] = x
            delta = self.updateformer(pts, layout, rows).float()
            xy = xy + delta[:, :2]
            vis_conf = vis_conf + delta[:, 2:]
        xy, vis_conf = layout.pad(xy), layout.pad(vis_conf)
        if exists is not None:
            keep = layout.token_valid[..., None]
            xy = torch.where(keep, xy, coords)
            vis_conf = torch.where(keep, vis_conf, torch.stack([vis, conf], dim=-1))
        return xy, vis_conf[..., 0], vis_conf[..., 1]


def window(fmap: Tensor, frame: Tensor, xy: Tensor) -> tuple[Tensor, Tensor]:
    """The 8x8 integer-pixel window holding the 7x7 bilinear samples around each point.

    fmap (F, h, w, C); frame (M,) frame of each point; xy (M, 2) centre in pixels of this
    level. Returns the window (M, 8 x-major, 8, C) and the sub-pixel offset (M, 2). Indices
    are clamped to the map, which equals grid_sample's border padding.
    """
    _, h, w, c = fmap.shape
    xy = xy.float()
    base = xy.floor()
    offsets = torch.arange(-CORR_RADIUS, CORR_RADIUS + 2, device=xy.device)
    xs = (base[:, 0:1].long() + offsets).clamp_(0, w - 1)  # (M, 8)
    ys = (base[:, 1:2].long() + offsets).clamp_(0, h - 1)
    rows = (frame[:, None, None] * h + ys[:, None, :]) * w + xs[:, :, None]  # (M, 8x, 8y)
    patch = torch.index_select(fmap.reshape(-1, c), 0, rows.reshape(-1)).view(-1, 8, 8, c)
    return patch, xy - base


def bilinear(window: Tensor, frac: Tensor, out: Tensor | None = None) -> Tensor:
    """(M, 8, 8, K) window values -> (M, 7, 7, K) at offsets frac (M, 2) = (x, y) in [0, 1)."""
    fx = frac[:, 0, None, None, None].to(window.dtype)
    fy = frac[:, 1, None, None, None].to(window.dtype)
    along_x = torch.lerp(window[:, :-1], window[:, 1:], fx)
    return torch.lerp(along_x[:, :, :-1], along_x[:, :, 1:], fy, out=out)
