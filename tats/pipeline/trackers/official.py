"""The `official` tracker: a thin adapter over the official `cotracker` package.

The package is an optional install from git (`pip install
git+https://github.com/facebookresearch/co-tracker`; it is not on PyPI); this module imports
without it and fails only when the tracker is created. It exists to check tats' own
CoTracker3 against the reference (tests/test_cotracker3_parity.py), to time the original TATs
procedure (benchmarks/bench_cotracker.py): one predictor call per query frame, in grid mode,
and to run CoTracker2 (`model=cotracker2`), the tracker of the TATs paper's published numbers,
which tats does not implement itself. CoTracker2 is built as the package's torch hub entry
`cotracker2` builds it (`hubconf.py`): `CoTracker2(stride=4, window_len=8)` behind
`CoTrackerPredictor(v2=True)`; `cotracker2v1` is the hub's `cotracker2v1` (window 16).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from tats.pipeline.trackers import TrackerIdentity, register_tracker
from tats.pipeline.trackers.cotracker3 import (
    COTRACKER2_WINDOWS,
    MODEL_RESOLUTION,
    OFFLINE_WINDOW,
    ONLINE_WINDOW,
    PASSES,
    CheckpointError,
    checkpoint_family,
    official_grid,
    read_state_dict,
    resolve_checkpoint,
)
from tats.pipeline.weights import file_sha256
from tats.runtime import fp32_only

INSTALL_HINT = "pip install git+https://github.com/facebookresearch/co-tracker"
# CoTracker2 models of the official hub (`hubconf.py`): the window of both predictors.
WINDOWS = {name: window for window, name in COTRACKER2_WINDOWS.items()}
MODELS = ("cotracker3", *WINDOWS)
COTRACKER2_URL = "https://huggingface.co/facebook/cotracker/resolve/main/{}.pth"


@register_tracker("official")
class OfficialCoTracker:
    """The official CoTracker predictors behind the tats tracker protocol: CoTracker3
    (`model="cotracker3"`) or CoTracker2 (`"cotracker2"`, `"cotracker2v1"`).

    online=False: `CoTrackerPredictor`, one call per pass. With support_grid=False each pass
    must hold the official grid of one query frame (see `official_grid`) and runs in grid
    mode, as the original TATs extraction does; otherwise queries are explicit (the official
    predictor then adds its support grid). online=True: `CoTrackerOnlinePredictor` fed
    windows of the model's length (CoTracker3: 16 frames) with half-window steps, as the
    official online demo does; the adapter then
    applies the offline predictor's query-frame overwrite so both modes share one contract.
    `backward=True` is the offline predictor's `backward_tracking=True` (the online predictor
    has none).
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        device: str = "cpu",
        *,
        model: str = "cotracker3",
        online: bool = False,
        passes: str = "joint",
        support_grid: bool = True,
        model_resolution: tuple[int, int] = MODEL_RESOLUTION,
        precision: str = "fp32",
    ):
        self.precision = fp32_only("the official tracker adapter", precision)
        if model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {model!r}")
        if passes not in PASSES:
            raise ValueError(f"passes must be one of {PASSES}, got {passes!r}")
        try:
            from cotracker.predictor import CoTrackerOnlinePredictor, CoTrackerPredictor
        except ImportError as err:
            raise ImportError(
                f"the 'official' tracker needs the official CoTracker package ({INSTALL_HINT})"
            ) from err
        kind = "online" if online else "offline"
        v2 = model != "cotracker3"
        if v2:
            path, window = _cotracker2_checkpoint(checkpoint, model), WINDOWS[model]
        else:
            path = resolve_checkpoint(checkpoint, kind)
            window = ONLINE_WINDOW if online else OFFLINE_WINDOW
        state = read_state_dict(path)
        net = _official_model(model, online, window, tuple(model_resolution))
        found = checkpoint_family(state)
        if found is not None and found != model:
            raise CheckpointError(
                f"{path}: a {found} checkpoint, not {model}: pass --tracker-option model={found}"
            )
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise CheckpointError(f"{path}: {err}") from err
        predictor_class = CoTrackerOnlinePredictor if online else CoTrackerPredictor
        self.predictor = predictor_class(checkpoint=None, window_len=window, v2=v2)
        self.predictor.model = net.eval()
        self.predictor.interp_shape = tuple(model_resolution)
        self.predictor.to(device)
        self.device = torch.device(device)
        self.online = online
        self.passes = passes
        self.support_grid = support_grid
        self.model_resolution = tuple(model_resolution)
        mode = f"{kind}; passes={passes}; support_grid={'yes' if support_grid else 'no'}"
        self.identity = TrackerIdentity(
            name="official",
            implementation="cotracker (official package)",
            checkpoint_sha256=file_sha256(path),
            mode=f"{mode}; model={model}" if v2 else mode,  # CoTracker3 stores keep their mode
        )

    def track(
        self, frames: np.ndarray, queries: np.ndarray, *, backward: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Track `queries` (N, 3) = (t, x, y) through `frames` (T, H, W, 3) uint8."""
        if backward and self.online:
            raise ValueError("the official online predictor has no backward tracking")
        frames = np.asarray(frames)
        queries = np.asarray(queries, dtype=np.float32).reshape(-1, 3)
        t = len(frames)
        tracks = np.zeros((t, len(queries), 2), np.float32)
        visible = np.zeros((t, len(queries)), bool)
        if len(queries) == 0:
            return tracks, visible
        video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)[None]
        video = video.float().to(self.device)
        if self.passes == "joint":
            groups = [np.arange(len(queries))]
        else:
            groups = [np.flatnonzero(queries[:, 0] == f) for f in np.unique(queries[:, 0])]
        with torch.no_grad():
            for cols in groups:
                if self.online:
                    c, v = self._online(video, queries[cols])
                else:
                    c, v = self._offline(video, queries[cols], backward)
                tracks[:, cols], visible[:, cols] = c, v
        return tracks, visible

    def track_batch(
        self, clips: Sequence[tuple[np.ndarray, np.ndarray]], *, backward: bool = False
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        return [self.track(frames, queries, backward=backward) for frames, queries in clips]

    def _offline(self, video: torch.Tensor, queries: np.ndarray, backward: bool):
        if self.support_grid:
            q = torch.from_numpy(queries)[None].to(self.device)
            tracks, visible = self.predictor(video, queries=q, backward_tracking=backward)
        else:
            frame, size = self._grid_pass(video, queries)
            tracks, visible = self.predictor(
                video, grid_size=size, grid_query_frame=frame, backward_tracking=backward
            )
        return tracks[0].cpu().numpy(), visible[0].cpu().numpy()

    def _grid_pass(self, video: torch.Tensor, queries: np.ndarray) -> tuple[int, int]:
        """The (query frame, grid size) of a pass that is one official grid, else an error."""
        h, w = video.shape[-2:]
        size = int(round(np.sqrt(len(queries))))
        frames = np.unique(queries[:, 0])
        grid = official_grid(size, h, w, self.model_resolution)
        if (
            len(frames) != 1
            or size * size != len(queries)
            or not np.allclose(queries[:, 1:], grid, atol=1e-3)
        ):
            raise ValueError(
                "the official predictor adds a support grid to explicit queries: "
                "support_grid=False needs each pass to be the official grid of one query frame"
            )
        return int(frames[0]), size

    def _online(self, video: torch.Tensor, queries: np.ndarray):
        predictor = self.predictor
        size = predictor.model.window_len
        step = size // 2
        t = video.shape[1]
        q = torch.from_numpy(queries)[None].to(self.device)
        kwargs = {"queries": q, "add_support_grid": self.support_grid}
        predictor(video[:, :size], is_first_step=True, **kwargs)
        ind = 0
        while ind == 0 or ind + step < t:
            tracks, visible = predictor(video[:, ind : ind + size], **kwargs)
            ind += step
        tracks, visible = tracks[0].cpu().numpy(), visible[0].cpu().numpy()
        cols = np.arange(len(queries))
        qt = queries[:, 0].astype(int)
        tracks[qt, cols] = queries[:, 1:]
        visible[qt, cols] = True
        return tracks, visible


def _official_model(model: str, online: bool, window: int, resolution: tuple[int, int]):
    """The official package's network for `model`, randomly initialised."""
    if model != "cotracker3":
        from cotracker.models.core.cotracker.cotracker import CoTracker2

        return CoTracker2(stride=4, window_len=window, model_resolution=resolution)
    if online:
        from cotracker.models.core.cotracker.cotracker3_online import CoTrackerThreeOnline as Net
    else:
        from cotracker.models.core.cotracker.cotracker3_offline import CoTrackerThreeOffline as Net
    return Net(stride=4, corr_radius=3, window_len=window, model_resolution=resolution)


def _cotracker2_checkpoint(checkpoint: str | Path | None, model: str) -> Path:
    """`checkpoint` if given (it must exist), else where torch hub caches `model`.pth (the
    official hub's download); never downloads."""
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise CheckpointError(f"{path}: {model} checkpoint not found")
        return path
    path = Path(torch.hub.get_dir()) / "checkpoints" / f"{model}.pth"
    if not path.is_file():
        raise CheckpointError(
            f"no {model} weights: pass --tracker-weights PATH, or download "
            f"{COTRACKER2_URL.format(model)} to {path}"
        )
    return path
