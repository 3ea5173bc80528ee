"""CoTracker3 point tracking with tats' own inference code and the official weights.

The predictor conventions are the official ones (`cotracker/predictor.py` in
facebookresearch/co-tracker): frames resized to the model resolution (384x512), queries
scaled to it, 6 refinement iterations, visibility sigmoid(vis) > 0.9 (offline) or
sigmoid(vis) * sigmoid(conf) > 0.6 (online), a 6x6 support grid at frame 0 added to explicit
queries, and each track overwritten with its query point (marked visible) at its query frame.
On top of that:

- all query frames of a clip in one pass (`passes="joint"`, the default), or one pass per
  query frame as the original TATs extraction does (`passes="per_query_frame"`); the feature
  CNN runs once per clip either way;
- several clips in one batch (`track_batch`), padded and masked so that each clip gets what
  it would get alone;
- optionally (`from_query_frame=True`) each point is tracked only from its query frame on,
  which skips the frames the TATs pipeline never uses and changes the tracks (see the
  registered trackers at the end);
- backward tracking (`backward=True` on a call), as the official predictor's
  `backward_tracking=True`: the clip is tracked once more time-reversed, with the support grid
  queried at the original first frame (its last reversed frame; with `from_query_frame=True`
  at the reversed clip's first frame, else it would exist in one frame only), and that pass
  fills the frames before each point's query frame;
- bounded memory: clips longer than `max_offline_frames` (or that run out of GPU memory) go
  through the online model's sliding windows (16 frames, step 8);
- bf16 autocast where the device has bf16 units (`precision="auto"`: CUDA, CPUs with AMX or
  AVX512-BF16), with the transformer's residual stream and the coordinates kept in fp32;
  `precision="fp32"` is fp32 throughout (no TF32 on CUDA).

The official weights (CC BY-NC 4.0, non-commercial) are never downloaded here: pass a file,
or put it in the torch hub cache (see `resolve_checkpoint`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tats.pipeline.trackers import TrackerIdentity, register_tracker
from tats.pipeline.trackers.cotracker3_net import (
    MODEL_RESOLUTION,
    OFFLINE_WINDOW,
    ONLINE_WINDOW,
    STRIDE,
    CoTracker3,
    TokenLayout,
)
from tats.pipeline.weights import file_sha256, read_tensor_file
from tats.runtime import extraction_precision

CHECKPOINT_FILES = {"offline": "scaled_offline.pth", "online": "scaled_online.pth"}
CHECKPOINT_URL = "https://huggingface.co/facebook/cotracker3/resolve/main/{}"
SUPPORT_GRID_SIZE = 6
ITERS = 6
OFFLINE_THRESHOLD = 0.9
ONLINE_THRESHOLD = 0.6
PASSES = ("joint", "per_query_frame")


class CheckpointError(ValueError):
    """A CoTracker3 checkpoint is missing or does not fit the model."""


def hub_checkpoint(kind: str) -> Path:
    """Where torch hub caches the official `kind` ("offline"/"online") checkpoint."""
    return Path(torch.hub.get_dir()) / "checkpoints" / CHECKPOINT_FILES[kind]


def resolve_checkpoint(checkpoint: str | Path | None, kind: str = "offline") -> Path:
    """`checkpoint` if given (it must exist), else the torch hub cache; never downloads."""
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise CheckpointError(f"{path}: CoTracker3 checkpoint not found")
        return path
    path = hub_checkpoint(kind)
    if not path.is_file():
        name = CHECKPOINT_FILES[kind]
        raise CheckpointError(
            f"no CoTracker3 {kind} weights: pass --tracker-weights PATH, or download "
            f"{CHECKPOINT_URL.format(name)} to {path} (--tracker lk needs no weights)"
        )
    return path


# CoTracker2's transformer input is 456 wide (CoTracker3's 1110); its `time_emb` is as long
# as its window: 8 in `cotracker2.pth`, 16 in `cotracker2v1.pth` (facebookresearch/co-tracker,
# `cotracker/models/core/cotracker/cotracker.py` and `hubconf.py`).
COTRACKER2_INPUT_DIM = 456
COTRACKER2_WINDOWS = {8: "cotracker2", 16: "cotracker2v1"}


def checkpoint_family(state: dict) -> str | None:
    """Which official model a state dict is: "cotracker3", "cotracker2" or "cotracker2v1"
    (told by its keys and its time embedding), None when it is none of them."""
    time_emb = state.get("time_emb")
    shape = tuple(getattr(time_emb, "shape", ()))
    if "track_feat_updater.0.weight" in state or shape[-1:] == (COTRACKER2_INPUT_DIM,):
        return COTRACKER2_WINDOWS.get(shape[1] if len(shape) == 3 else None, "cotracker2")
    if "updateformer.vis_conf_head.weight" in state and "corr_mlp.fc1.weight" in state:
        return "cotracker3"
    return None


def check_state_dict(model: torch.nn.Module, state: dict, source: str) -> None:
    """Raise CheckpointError naming the first key or shape that does not fit `model` (a
    CoTracker2 checkpoint is named as such)."""
    family = checkpoint_family(state)
    if family is not None and family != "cotracker3":
        raise CheckpointError(
            f"{source}: a CoTracker2 checkpoint ({family}), which tats' CoTracker3 cannot run: "
            f"use --tracker official --tracker-option model={family} with the official "
            "cotracker package (pip install git+https://github.com/facebookresearch/co-tracker)"
        )
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in state:
            raise CheckpointError(f"{source}: not a CoTracker3 checkpoint: missing key {key!r}")
        got = tuple(getattr(state[key], "shape", ()))
        if got != tuple(value.shape):
            hint = ""
            if key == "time_emb" and len(got) == 3:
                kind = {OFFLINE_WINDOW: "offline", ONLINE_WINDOW: "online"}.get(got[1])
                hint = f" (this looks like the {kind} checkpoint)" if kind else ""
            raise CheckpointError(
                f"{source}: {key!r} has shape {got}, expected {tuple(value.shape)}{hint}"
            )
    for key in state:
        if key not in expected:
            raise CheckpointError(f"{source}: not a CoTracker3 checkpoint: unexpected key {key!r}")


def build_model(kind: str = "offline", model_resolution=MODEL_RESOLUTION) -> CoTracker3:
    """A randomly initialised CoTracker3 of the given kind ("offline" or "online")."""
    window = {"offline": OFFLINE_WINDOW, "online": ONLINE_WINDOW}[kind]
    return CoTracker3(window, model_resolution)


def moving_state_dict(
    kind: str = "offline",
    *,
    seed: int = 0,
    head_std: float = 0.01,
    visible: float = 0.5,
    model_resolution=MODEL_RESOLUTION,
) -> dict[str, torch.Tensor]:
    """Random weights of the real architecture under which tracks move and visibility varies,
    for tests and benchmarks (never for real tracking).

    Under the official initialisation (flow and visibility heads at std 0.001) tracks barely
    leave their query points, so no comparison of two ways of tracking can tell them apart.
    Here the two heads are drawn at `head_std` (0.01: tracks move about 3 px a frame on real
    320x240 clips), and the visibility bias is set so that about `visible` of the tokens of a
    random clip end up visible: the heads' random weights shift every token's logit alike,
    mostly below the threshold.
    """
    torch.manual_seed(seed)
    model = build_model(kind, model_resolution).eval()
    g = torch.Generator().manual_seed(seed + 1)
    heads = model.updateformer
    with torch.no_grad():
        for head in (heads.flow_head, heads.vis_conf_head):
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * head_std)
        score = _visibility_probe(model, seed)
        bias = heads.vis_conf_head.bias
        for _ in range(3):  # each iteration adds the bias to the logit: about linear in it
            bias[0] -= float(torch.quantile(score(), 1 - visible)) / ITERS
    return model.state_dict()


def _visibility_probe(model: CoTracker3, seed: int):
    """A function giving the visibility scores (logits, > 0: visible) of 64 points queried
    at every frame of an 8-frame synthetic clip under `model`'s current weights, as the
    predictor thresholds them."""
    from tats.synth import MOTIONS, SynthConfig, make_video

    g = torch.Generator().manual_seed(seed + 2)
    mh, mw = model.model_resolution
    config = SynthConfig(frames=8, width=mw, height=mh, seed=seed)
    frames = make_video(config, next(iter(MOTIONS)), 0)[0]
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    pyramid = model.pyramid(video)
    n, t = 64, len(video)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([mw - 1, mh - 1]) / STRIDE
    query_frame = torch.arange(n) % t
    support = [s[None] for s in model.support_features(pyramid, query_frame, xy)]
    coords = xy[None, :, None].expand(1, n, t, 2).clone()
    layout = TokenLayout.make(None, None, (1, n, t), "cpu")
    frame_rows = torch.arange(t)[None]
    time_emb = model.time_embedding(t)
    online = model.window_len == ONLINE_WINDOW
    threshold = ONLINE_THRESHOLD if online else OFFLINE_THRESHOLD

    def score() -> torch.Tensor:
        zeros = torch.zeros(1, n, t)
        _, vis, conf = model.refine(
            pyramid, frame_rows, support, coords, zeros, zeros.clone(), layout, time_emb, ITERS
        )
        p = torch.sigmoid(vis) * torch.sigmoid(conf) if online else torch.sigmoid(vis)
        return torch.logit(p.clamp(1e-6, 1 - 1e-6)) - math.log(threshold / (1 - threshold))

    return score


def read_state_dict(path: str | Path) -> dict:
    """The state dict in an official-format checkpoint (optionally wrapped under "model"),
    read with `weights_only=True`."""
    try:
        state = read_tensor_file(path, "CoTracker3 checkpoint")
    except (ValueError, FileNotFoundError) as err:  # one line naming the file and its problem
        raise CheckpointError(str(err)) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a state dict")
    return state


def load_model(
    path: str | Path, kind: str = "offline", model_resolution=MODEL_RESOLUTION
) -> CoTracker3:
    """Load an official-format checkpoint strictly into tats' CoTracker3."""
    state = read_state_dict(path)
    model = build_model(kind, model_resolution)
    check_state_dict(model, state, str(path))
    model.load_state_dict(state, strict=True)
    return model.eval()


def official_grid(
    grid_size: int, height: int, width: int, model_resolution=MODEL_RESOLUTION
) -> np.ndarray:
    """(grid_size^2, 2) float32 (x, y) input pixels of the official predictor's grid mode.

    The grid lives at model resolution with a margin of width/64, row-major; it is scaled to
    input pixels as the predictor scales its tracks, so tracking these points as explicit
    queries without a support grid reproduces a grid-mode call.
    """
    grid = _model_grid(grid_size, model_resolution)
    mh, mw = model_resolution
    scale = torch.tensor([(width - 1) / (mw - 1), (height - 1) / (mh - 1)])
    return (grid * scale).numpy().astype(np.float32)


def _model_grid(size: int, model_resolution) -> torch.Tensor:
    """(size^2, 2) float32 (x, y) grid at model resolution (the official layout)."""
    h, w = model_resolution
    if size == 1:
        return torch.tensor([[w / 2, h / 2]])
    margin = w / 64
    ys = torch.linspace(margin, h - margin, size)
    xs = torch.linspace(margin, w - margin, size)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2)


@dataclass(frozen=True)
class _Pass:
    """One model pass: some queries of one clip (model-resolution pixels)."""

    clip: int
    columns: np.ndarray  # which of the clip's query columns this pass fills
    queries: torch.Tensor  # (N, 3) t, x, y, support grid points appended last
    num_support: int


@dataclass
class _Tracked:
    """What the windows have predicted so far for one pass (model px, logits)."""

    coords: torch.Tensor  # (N, T, 2)
    vis: torch.Tensor  # (N, T)
    conf: torch.Tensor  # (N, T)
    support: list[torch.Tensor] | None = None  # per level (N, 49, C), filled as frames arrive


class CoTracker3Tracker:
    """The `cotracker3` / `cotracker3-online` trackers (see the module docstring)."""

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        device: str = "cpu",
        *,
        online: bool = False,
        passes: str = "joint",
        support_grid: bool = True,
        from_query_frame: bool = False,
        max_offline_frames: int | None = 600,
        online_checkpoint: str | Path | None = None,
        precision: str = "auto",
        model_resolution: tuple[int, int] = MODEL_RESOLUTION,
        iters: int = ITERS,
        max_batch_tokens: int = 1 << 20,
        fnet_frames: int | None = None,
        chunk_tokens: int | None = None,
    ):
        if passes not in PASSES:
            raise ValueError(f"passes must be one of {PASSES}, got {passes!r}")
        mh, mw = model_resolution
        if mh % 32 or mw % 32:
            raise ValueError(f"model_resolution must be multiples of 32, got {model_resolution}")
        self.device = torch.device(device)
        self.online = online
        self.passes = passes
        self.support_grid = support_grid
        self.from_query_frame = from_query_frame
        self.max_offline_frames = None if online else max_offline_frames
        self.model_resolution = (mh, mw)
        self.iters = iters
        self.max_batch_tokens = max_batch_tokens
        # Work is chunked to bound temporaries. On the CPU small chunks are much faster: they
        # stay in the allocator's heap, while large fresh allocations cost page faults (the
        # CNN runs 3x faster one frame at a time than 16). Large chunks keep a GPU busy.
        gpu = self.device.type == "cuda"
        self.fnet_frames = fnet_frames or (16 if gpu else 1)
        self.chunk_tokens = chunk_tokens or (1 << 16 if gpu else 2048)
        self.precision = extraction_precision(precision, self.device)

        kind = "online" if online else "offline"
        path = resolve_checkpoint(checkpoint, kind)
        self.net = load_model(path, kind, model_resolution).to(self.device)
        sha = file_sha256(path)
        self.online_net = self.net if online else None
        online_sha = None
        if not online and self.max_offline_frames is not None:
            fallback = online_checkpoint
            if fallback is None and hub_checkpoint("online").is_file():
                fallback = hub_checkpoint("online")
            if fallback is not None:
                fallback = resolve_checkpoint(fallback, "online")
                self.online_net = load_model(fallback, "online", model_resolution).to(self.device)
                online_sha = file_sha256(fallback)

        mode = kind
        if online_sha is not None:
            mode = (
                f"offline; online windows above {self.max_offline_frames} frames "
                f"(online sha256 {online_sha})"
            )
        options = [
            f"passes={passes}",
            f"support_grid={'yes' if support_grid else 'no'}",
            f"from_query_frame={'yes' if from_query_frame else 'no'}",
            f"precision={self.precision}",
            f"resolution={mh}x{mw}",
            f"iters={iters}",
        ]
        self.identity = TrackerIdentity(
            name="cotracker3-online" if online else "cotracker3",
            implementation="tats.pipeline.trackers.cotracker3 (official CoTracker3 weights)",
            checkpoint_sha256=sha,
            mode="; ".join([mode, *options]),
        )

    # ---------------------------------------------------------------- public API

    def mode_for(self, num_frames: int) -> str:
        """ "offline" or "online": which model tracks a clip of `num_frames` frames."""
        if self.online:
            return "online"
        if self.max_offline_frames is not None and num_frames > self.max_offline_frames:
            return "online"
        return "offline"

    def track(
        self, frames: np.ndarray, queries: np.ndarray, *, backward: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Track `queries` (N, 3) = (t, x, y) through `frames` (T, H, W, 3) uint8 (`backward`:
        before each query frame too)."""
        return self.track_batch([(frames, queries)], backward=backward)[0]

    @torch.inference_mode()
    def track_batch(
        self, clips: Sequence[tuple[np.ndarray, np.ndarray]], *, backward: bool = False
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Track several (frames, queries) clips; returns (tracks, visible) per clip. With
        `backward`, the time-reversed clips go in the same batches."""
        prepared = [
            (*_check_clip(i, frames, queries), 0) for i, (frames, queries) in enumerate(clips)
        ]
        if not backward:
            return self._track_prepared(prepared)
        # The official backward pass queries its support grid at the original frame 0.
        last = not self.from_query_frame
        reversed_clips = [
            (frames[::-1], _reverse_time(queries, len(frames)), len(frames) - 1 if last else 0)
            for frames, queries, _ in prepared
        ]
        results = self._track_prepared(prepared + reversed_clips)
        n = len(prepared)
        return [
            _fill_before_query(queries, results[i], results[n + i])
            for i, (_, queries, _) in enumerate(prepared)
        ]

    def _track_prepared(self, prepared: list) -> list[tuple[np.ndarray, np.ndarray]]:
        """Track checked (frames, queries, support grid frame) clips."""
        results: list = [None] * len(prepared)
        offline, windowed = [], []
        for i, (frames, queries, _) in enumerate(prepared):
            t = len(frames)
            if len(queries) == 0:
                results[i] = (np.zeros((t, 0, 2), np.float32), np.zeros((t, 0), bool))
            elif self.mode_for(t) == "online":
                if self.online_net is None:
                    raise RuntimeError(
                        f"clip {i} has {t} frames, more than max_offline_frames="
                        f"{self.max_offline_frames}, and no CoTracker3 online weights were found "
                        f"for the bounded-memory windowed mode: pass online_checkpoint=PATH or "
                        f"download {CHECKPOINT_URL.format(CHECKPOINT_FILES['online'])} to "
                        f"{hub_checkpoint('online')}"
                    )
                windowed.append(i)
            else:
                offline.append(i)
        for group in self._groups(prepared, offline, window=None):
            self._run_offline_or_fallback(prepared, group, results)
        if windowed:
            for group in self._groups(prepared, windowed, window=self.online_net.window_len):
                self._run_windows(prepared, group, results)
        return results

    # ---------------------------------------------------------------- passes

    def _passes(
        self, clip: int, frames: np.ndarray, queries: np.ndarray, support_frame: int
    ) -> list[_Pass]:
        t, h, w = frames.shape[:3]
        mh, mw = self.model_resolution
        q = torch.from_numpy(queries.astype(np.float32))
        q[:, 1] *= (mw - 1) / (w - 1)
        q[:, 2] *= (mh - 1) / (h - 1)
        if self.passes == "joint":
            groups = [np.arange(len(q))]
        else:
            groups = [np.flatnonzero(queries[:, 0] == f) for f in np.unique(queries[:, 0])]
        support = torch.zeros(0, 3)
        if self.support_grid:
            grid = _model_grid(SUPPORT_GRID_SIZE, self.model_resolution)
            support = torch.cat([torch.full((len(grid), 1), float(support_frame)), grid], dim=1)
        return [
            _Pass(clip, cols, torch.cat([q[torch.from_numpy(cols)], support]), len(support))
            for cols in groups
        ]

    def _groups(self, prepared, clips: list[int], window: int | None) -> list[list[int]]:
        """Clips batched together, longest first, within `max_batch_tokens` padded tokens
        (a token is one point in one frame; windowed clips hold `window` frames at a time)."""
        order = sorted(clips, key=lambda i: -len(prepared[i][0]))
        groups: list[list[int]] = []
        rows = points = 0
        for i in order:
            frames, queries, _ = prepared[i]
            n = len(queries) + (SUPPORT_GRID_SIZE**2 if self.support_grid else 0)
            passes = 1 if self.passes == "joint" else len(np.unique(queries[:, 0]))
            t_max = window or len(prepared[groups[-1][0]][0] if groups else frames)
            if groups and (rows + passes) * max(points, n) * t_max <= self.max_batch_tokens:
                groups[-1].append(i)
                rows, points = rows + passes, max(points, n)
            else:
                groups.append([i])
                rows, points = passes, n
        return groups

    # ---------------------------------------------------------------- offline

    def _run_offline_or_fallback(self, prepared, group: list[int], results: list) -> None:
        try:
            self._run_offline(prepared, group, results)
            return
        except torch.OutOfMemoryError:
            if len(group) == 1 and self.online_net is None:
                raise
        # Out of the except block: its traceback holds the failed pass's tensors, which the
        # cache could not give back while it lives.
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(group) > 1:
            half = len(group) // 2
            self._run_offline_or_fallback(prepared, group[:half], results)
            self._run_offline_or_fallback(prepared, group[half:], results)
        else:
            self._run_windows(prepared, group, results)

    def _run_offline(self, prepared, group: list[int], results: list) -> None:
        net = self.net
        pyramid, offsets = self._pyramids(net, [prepared[i][0] for i in group])
        passes = [p for k, i in enumerate(group) for p in self._passes(k, *prepared[i])]
        lengths = torch.tensor([len(prepared[group[p.clip]][0]) for p in passes])
        b, t = len(passes), int(lengths.max())
        n = max(len(p.queries) for p in passes)
        queries = torch.zeros(b, n, 3)
        point_valid = torch.zeros(b, n, dtype=torch.bool)
        for k, p in enumerate(passes):
            queries[k, : len(p.queries)] = p.queries
            point_valid[k, : len(p.queries)] = True
        frame_idx = torch.arange(t)
        frame_valid = frame_idx[None] < lengths[:, None]
        start = torch.tensor([offsets[p.clip] for p in passes])
        frame_rows = start[:, None] + torch.minimum(frame_idx[None], lengths[:, None] - 1)
        time_emb = torch.stack([_resized(net, int(length), t) for length in lengths])
        out = self._refine(net, pyramid, frame_rows, queries, point_valid, frame_valid, time_emb)
        coords, vis, conf = out
        self._finish(
            prepared, group, passes, coords, torch.sigmoid(vis) > OFFLINE_THRESHOLD, results
        )

    def _refine(
        self,
        net,
        pyramid,
        frame_rows,
        queries,
        point_valid,
        frame_valid,
        time_emb,
        coords=None,
        vis=None,
        conf=None,
        support=None,
        first_frame: int = 0,
    ):
        """Run the refinement for (B, N) queries on frames first_frame.. of their clips;
        returns coords (model px), vis and conf logits."""
        dev = self.device
        b, n = point_valid.shape
        t = frame_rows.shape[1]
        queries, point_valid, frame_rows = queries.to(dev), point_valid.to(dev), frame_rows.to(dev)
        qt = queries[..., 0].long()
        xy = queries[..., 1:] / STRIDE
        if support is None:
            rows = frame_rows.gather(1, qt.clamp(0, t - 1))
            support = [
                s.view(b, n, *s.shape[1:])
                for s in net.support_features(pyramid, rows.reshape(-1), xy.reshape(-1, 2))
            ]
            support = [s * point_valid[..., None, None] for s in support]
        if coords is None:
            coords = xy[:, :, None].expand(b, n, t, 2).clone()
            vis = torch.zeros(b, n, t, device=dev)
            conf = torch.zeros(b, n, t, device=dev)
        token_valid = point_valid[:, :, None].expand(b, n, t)
        if frame_valid is not None:
            frame_valid = frame_valid.to(dev)
            token_valid = token_valid & frame_valid[:, None, :]
        if self.from_query_frame:
            frame = torch.arange(first_frame, first_frame + t, device=dev)
            token_valid = token_valid & (frame >= qt[..., None])
        layout = TokenLayout.make(token_valid, frame_valid, (b, n, t), dev)
        with self._autocast():
            coords, vis, conf = net.refine(
                pyramid,
                frame_rows,
                support,
                coords,
                vis,
                conf,
                layout,
                time_emb.to(dev),
                iters=self.iters,
                rows=self.chunk_tokens,
                corr_rows=self.chunk_tokens // 4,
            )
        return coords * STRIDE, vis, conf

    def _pyramids(self, net, clips: list[np.ndarray]):
        """Feature pyramids of all frames of `clips`, stacked; and each clip's first row."""
        levels: list[list[torch.Tensor]] = [[] for _ in range(4)]
        offsets, total = [], 0
        for frames in clips:
            offsets.append(total)
            total += len(frames)
            for i in range(0, len(frames), self.fnet_frames):
                for level, x in zip(
                    levels, self._features(net, frames[i : i + self.fnet_frames]), strict=True
                ):
                    level.append(x)
        return [torch.cat(level) for level in levels], offsets

    def _features(self, net, frames: np.ndarray) -> list[torch.Tensor]:
        if min(frames.strides) < 0:  # a chunk of a time-reversed clip (backward tracking)
            frames = frames.copy()
        video = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device)
        video = video.permute(0, 3, 1, 2).float()
        video = F.interpolate(video, self.model_resolution, mode="bilinear", align_corners=True)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        with self._autocast():
            return net.pyramid(video, dtype)

    def _autocast(self):
        if self.precision == "fp32":
            return _full_fp32(self.device)
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    # ---------------------------------------------------------------- online windows

    def _run_windows(self, prepared, group: list[int], results: list) -> None:
        """The online model over sliding windows of S frames, step S/2 (official semantics):
        a window's predictions seed the next one's overlapping frames, and only S frames of
        features are held at a time."""
        net = self.online_net
        size = net.window_len
        step = size // 2
        passes = [p for k, i in enumerate(group) for p in self._passes(k, *prepared[i])]
        lengths = [len(prepared[group[p.clip]][0]) for p in passes]
        dev = self.device
        state = [
            _Tracked(
                torch.zeros(len(p.queries), t, 2, device=dev),
                torch.zeros(len(p.queries), t, device=dev),
                torch.zeros(len(p.queries), t, device=dev),
            )
            for p, t in zip(passes, lengths, strict=True)
        ]
        cache: dict[int, tuple[int, list[torch.Tensor]]] = {}  # clip -> (first frame, levels)
        ind = 0
        while True:
            active = [k for k, length in enumerate(lengths) if ind == 0 or ind + step < length]
            if not active:
                break
            clips = sorted({passes[k].clip for k in active})
            cache = {c: cache[c] for c in clips if c in cache}  # drop finished clips
            window_levels, offsets = [], {}
            row = 0
            for c in clips:
                frames = prepared[group[c]][0]
                end = min(ind + size, len(frames))
                levels = self._window_features(net, frames, ind, end, cache.get(c))
                cache[c] = (ind, levels)
                offsets[c] = row
                row += end - ind
                window_levels.append(levels)
            pyramid = [torch.cat(lv) for lv in zip(*window_levels, strict=True)]
            self._window_step(net, pyramid, offsets, passes, lengths, state, active, ind)
            ind += step
        coords = [s.coords for s in state]
        visible = [torch.sigmoid(s.vis) * torch.sigmoid(s.conf) > ONLINE_THRESHOLD for s in state]
        self._finish_lists(prepared, group, passes, coords, visible, results)

    def _window_features(self, net, frames, start, end, cached):
        """Pyramid rows for frames [start, end), reusing those computed for the last window."""
        reuse: list[torch.Tensor] | None = None
        first = start
        if cached is not None:
            c_start, levels = cached
            have = c_start + len(levels[0])
            if c_start <= start < have:
                reuse = [lv[start - c_start :] for lv in levels]
                first = have
        new = self._pyramids(net, [frames[first:end]])[0] if first < end else None
        if reuse is None:
            return new
        if new is None:
            return reuse
        return [torch.cat([a, b]) for a, b in zip(reuse, new, strict=True)]

    def _window_step(self, net, pyramid, offsets, passes, lengths, state, active, ind):
        size = net.window_len
        step = size // 2
        overlap = size - step
        dev = self.device
        b = len(active)
        n = max(len(passes[k].queries) for k in active)
        queries = torch.zeros(b, n, 3)
        point_valid = torch.zeros(b, n, dtype=torch.bool)
        frame_rows = torch.zeros(b, size, dtype=torch.long)
        coords = torch.zeros(b, n, size, 2, device=dev)
        vis = torch.zeros(b, n, size, device=dev)
        conf = torch.zeros(b, n, size, device=dev)
        support = None
        for j, k in enumerate(active):
            p, length, s = passes[k], lengths[k], state[k]
            m = len(p.queries)
            queries[j, :m] = p.queries
            point_valid[j, :m] = True
            real = min(size, length - ind)
            frame_rows[j] = offsets[p.clip] + torch.arange(size).clamp(max=real - 1)
            qt = p.queries[:, 0].long().to(dev)
            xy = p.queries[:, 1:].to(dev) / STRIDE
            coords[j, :m] = xy[:, None]
            # features of the points whose query frame enters the window now
            left = 0 if ind == 0 else ind + step
            new = ((qt >= left) & (qt < ind + size)).nonzero().squeeze(1)
            feats = net.support_features(pyramid, offsets[p.clip] + qt[new] - ind, xy[new])
            if s.support is None:
                s.support = [f.new_zeros(m, *f.shape[1:]) for f in feats]
            for acc, f in zip(s.support, feats, strict=True):
                acc[new] = f
            if support is None:
                support = [f.new_zeros(b, n, *f.shape[1:]) for f in s.support]
            for acc, f in zip(support, s.support, strict=True):
                acc[j, :m] = f
            if ind > 0:  # seed the overlap with the previous window's predictions
                carry = (qt < ind + overlap).nonzero().squeeze(1)
                for dst, src in ((coords, s.coords / STRIDE), (vis, s.vis), (conf, s.conf)):
                    prev = src[carry, ind : ind + overlap]
                    pad = prev[:, -1:].expand(-1, size - overlap, *prev.shape[2:])
                    dst[j, carry] = torch.cat([prev, pad], dim=1)
        time_emb = net.time_embedding(size)
        out = self._refine(
            net,
            pyramid,
            frame_rows,
            queries,
            point_valid,
            None,
            time_emb,
            coords,
            vis,
            conf,
            support,
            first_frame=ind,
        )
        for j, k in enumerate(active):
            m, s = len(passes[k].queries), state[k]
            real = min(size, lengths[k] - ind)
            s.coords[:, ind : ind + real] = out[0][j, :m, :real].float()
            s.vis[:, ind : ind + real] = out[1][j, :m, :real].float()
            s.conf[:, ind : ind + real] = out[2][j, :m, :real].float()

    # ---------------------------------------------------------------- outputs

    def _finish(self, prepared, group, passes, coords, visible, results) -> None:
        lists_c, lists_v = [], []
        for k, p in enumerate(passes):
            t = len(prepared[group[p.clip]][0])
            m = len(p.queries)
            lists_c.append(coords[k, :m, :t])
            lists_v.append(visible[k, :m, :t])
        self._finish_lists(prepared, group, passes, lists_c, lists_v, results)

    def _finish_lists(self, prepared, group, passes, coords, visible, results) -> None:
        """Drop support points, overwrite query frames, scale to input pixels, reassemble."""
        mh, mw = self.model_resolution
        for k, i in enumerate(group):
            frames, queries, _ = prepared[i]
            t, h, w = frames.shape[:3]
            tracks = np.zeros((t, len(queries), 2), np.float32)
            vis = np.zeros((t, len(queries)), bool)
            for p, c, v in zip(passes, coords, visible, strict=True):
                if p.clip != k:
                    continue
                m = len(p.queries) - p.num_support
                c, v = c[:m].float().clone(), v[:m].clone()  # (m, t, 2), (m, t)
                q = p.queries[:m].to(c.device)
                qt = q[:, 0].long()
                idx = torch.arange(m, device=c.device)
                if self.from_query_frame:
                    before = torch.arange(t, device=c.device)[None] < qt[:, None]
                    c = torch.where(before[..., None], q[:, None, 1:], c)
                    v = v & ~before
                c[idx, qt] = q[:, 1:]
                v[idx, qt] = True
                c = c * c.new_tensor([(w - 1) / (mw - 1), (h - 1) / (mh - 1)])
                tracks[:, p.columns] = c.transpose(0, 1).cpu().numpy()
                vis[:, p.columns] = v.transpose(0, 1).cpu().numpy()
            results[i] = (tracks, vis)


@contextmanager
def _full_fp32(device: torch.device):
    """fp32 means fp32: on CUDA, no TF32 in matmuls and convolutions while it lasts (cuDNN
    convolutions use TF32 by default)."""
    if device.type != "cuda":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _resized(net: CoTracker3, length: int, total: int) -> torch.Tensor:
    """The time embedding for a clip of `length` frames, zero-padded to `total` frames."""
    emb = net.time_embedding(length)[0]
    return F.pad(emb, (0, 0, 0, total - length))


def _reverse_time(queries: np.ndarray, num_frames: int) -> np.ndarray:
    """Queries (t, x, y) of a clip -> the same points in the time-reversed clip."""
    flipped = queries.copy()
    flipped[:, 0] = num_frames - 1 - flipped[:, 0]
    return flipped


def _fill_before_query(queries: np.ndarray, forward, backward) -> tuple[np.ndarray, np.ndarray]:
    """A clip's forward (tracks, visible), with the frames before each point's query frame
    taken from the pass over the time-reversed clip, `backward`."""
    tracks, visible = forward
    before = np.arange(len(tracks))[:, None] < queries[None, :, 0]
    tracks = np.where(before[..., None], backward[0][::-1], tracks)
    visible = np.where(before, backward[1][::-1], visible)
    return tracks, visible


def _check_clip(index: int, frames, queries) -> tuple[np.ndarray, np.ndarray]:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(
            f"clip {index}: frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}"
        )
    t, h, w = frames.shape[:3]
    if t < 1 or h < 2 or w < 2:
        raise ValueError(f"clip {index}: frames of shape {frames.shape} are too small to track")
    queries = (
        np.asarray(queries, dtype=np.float64).reshape(-1, 3)
        if np.size(queries)
        else np.zeros((0, 3))
    )
    if not np.isfinite(queries).all():
        row = int(np.flatnonzero(~np.isfinite(queries).all(axis=1))[0])
        raise ValueError(f"clip {index}: query {row} is not finite: {queries[row].tolist()}")
    bad = (queries[:, 0] != np.round(queries[:, 0])) | (queries[:, 0] < 0) | (queries[:, 0] >= t)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"clip {index}: query {row} has frame {queries[row, 0]}, not an integer in [0, {t - 1}]"
        )
    return frames, queries


# As registered trackers (what `tats-extract tracks` uses), every query frame goes in one pass
# over whole clips: 0.01-0.03 px from the official seven calls with moving test weights
# (benchmarks/bench_cotracker.py), at the cost of one. `passes="per_query_frame",
# support_grid=False, precision="fp32"` is the exact mode (the official calls, within 1e-4 px);
# `from_query_frame=True` skips the frames before each query frame: faster, but about 0.8 px
# from the official tracks with those weights, and visibility agrees less.
@register_tracker("cotracker3")
def _offline_tracker(checkpoint=None, device="cpu", **kwargs) -> CoTracker3Tracker:
    return CoTracker3Tracker(checkpoint, device, online=False, **kwargs)


@register_tracker("cotracker3-online")
def _online_tracker(checkpoint=None, device="cpu", **kwargs) -> CoTracker3Tracker:
    return CoTracker3Tracker(checkpoint, device, online=True, **kwargs)
