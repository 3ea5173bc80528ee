"""The `official` tracker: a thin adapter over the official `cotracker` package.

The package is an optional install from git (`pip install
git+https://github.com/facebookresearch/co-tracker`); this module imports without it and
fails only when the tracker is created. It exists to check tats' own CoTracker3 against the
reference (tests/test_cotracker3_parity.py) and to time the original TATs procedure
(benchmarks/bench_cotracker.py): one predictor call per query frame, in grid mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from tats.pipeline.trackers import TrackerIdentity, register_tracker
from tats.pipeline.trackers.cotracker3 import (
    MODEL_RESOLUTION,
    OFFLINE_WINDOW,
    ONLINE_WINDOW,
    PASSES,
    CheckpointError,
    official_grid,
    read_state_dict,
    resolve_checkpoint,
)
from tats.pipeline.weights import file_sha256

INSTALL_HINT = "pip install git+https://github.com/facebookresearch/co-tracker"


@register_tracker("official")
class OfficialCoTracker:
    """The official CoTracker3 predictors behind the tats tracker protocol.

    online=False: `CoTrackerPredictor`, one call per pass. With support_grid=False each pass
    must hold the official grid of one query frame (see `official_grid`) and runs in grid
    mode, as the original TATs extraction does; otherwise queries are explicit (the official
    predictor then adds its support grid). online=True: `CoTrackerOnlinePredictor` fed
    windows of 16 frames with step 8, as the official online demo does; the adapter then
    applies the offline predictor's query-frame overwrite so both modes share one contract.
    `backward=True` is the offline predictor's `backward_tracking=True` (the online predictor
    has none).
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        device: str = "cpu",
        *,
        online: bool = False,
        passes: str = "joint",
        support_grid: bool = True,
        model_resolution: tuple[int, int] = MODEL_RESOLUTION,
    ):
        try:
            from cotracker.models.core.cotracker.cotracker3_offline import CoTrackerThreeOffline
            from cotracker.models.core.cotracker.cotracker3_online import CoTrackerThreeOnline
            from cotracker.predictor import CoTrackerOnlinePredictor, CoTrackerPredictor
        except ImportError as err:
            raise ImportError(
                f"the 'official' tracker needs the official CoTracker package ({INSTALL_HINT})"
            ) from err
        if passes not in PASSES:
            raise ValueError(f"passes must be one of {PASSES}, got {passes!r}")
        kind = "online" if online else "offline"
        path = resolve_checkpoint(checkpoint, kind)
        state = read_state_dict(path)
        window = ONLINE_WINDOW if online else OFFLINE_WINDOW
        model_class = CoTrackerThreeOnline if online else CoTrackerThreeOffline
        model = model_class(
            stride=4, corr_radius=3, window_len=window, model_resolution=tuple(model_resolution)
        )
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise CheckpointError(f"{path}: {err}") from err
        predictor_class = CoTrackerOnlinePredictor if online else CoTrackerPredictor
        self.predictor = predictor_class(checkpoint=None, window_len=window)
        self.predictor.model = model.eval()
        self.predictor.interp_shape = tuple(model_resolution)
        self.predictor.to(device)
        self.device = torch.device(device)
        self.online = online
        self.passes = passes
        self.support_grid = support_grid
        self.model_resolution = tuple(model_resolution)
        self.identity = TrackerIdentity(
            name="official",
            implementation="cotracker (official package)",
            checkpoint_sha256=file_sha256(path),
            mode=f"{kind}; passes={passes}; support_grid={'yes' if support_grid else 'no'}",
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
