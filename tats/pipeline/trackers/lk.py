"""Pyramidal Lucas-Kanade (OpenCV): a weight-free CPU tracker for the demo and the tests.

All query frames go in one call: a sweep carries every point from its query frame to the last
frame, and the same sweep over the time-reversed clip carries it back to the first frame. LK
always tracks both ways (it is cheap, and grid stores have always held those tracks), so
`backward=True` changes nothing here. Each step is checked forward-backward: a point whose
round trip misses by more than `fb_threshold` px, or that leaves the image, is lost. LK cannot
find a point again after an occlusion, so a lost point stays invisible for the rest of its
sweep and keeps the position where it was lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from tats.pipeline.trackers import TrackerIdentity, register_tracker
from tats.runtime import fp32_only


@register_tracker("lk")
class LKTracker:
    def __init__(
        self,
        checkpoint: str | Path | None = None,
        device: str = "cpu",
        window: int = 7,
        levels: int = 3,
        fb_threshold: float = 1.0,
        precision: str = "fp32",
    ):
        self.precision = fp32_only("the lk tracker", precision)
        if checkpoint is not None:
            raise ValueError("the lk tracker takes no checkpoint")
        if not str(device).startswith("cpu"):
            raise ValueError(f"the lk tracker runs on the CPU only, not on {device!r}")
        self.window, self.levels, self.fb_threshold = window, levels, fb_threshold
        self.identity = TrackerIdentity(
            name="lk",
            implementation=f"opencv {cv2.__version__} pyramidal LK, window {window}, "
            f"{levels} levels, forward-backward check {fb_threshold} px",
        )

    def track(
        self, frames: np.ndarray, queries: np.ndarray, *, backward: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Track `queries` (N, 3) = (t, x, y) through `frames` (T, H, W, 3) uint8, both ways."""
        T = len(frames)
        gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
        start = np.clip(np.rint(queries[:, 0]).astype(int), 0, T - 1)
        points = np.asarray(queries[:, 1:], np.float32)
        tracks, visible = self._sweep(gray, start, points)
        back_tracks, back_visible = self._sweep(gray[::-1], T - 1 - start, points)
        before = np.arange(T)[:, None] < start[None, :]
        tracks[before] = back_tracks[::-1][before]
        visible[before] = back_visible[::-1][before]
        return tracks, visible

    def track_batch(
        self, clips: Sequence[tuple[np.ndarray, np.ndarray]], *, backward: bool = False
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        return [self.track(frames, queries) for frames, queries in clips]

    def _sweep(
        self, gray: Sequence[np.ndarray], start: np.ndarray, points: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Points (N, 2) from their start frames to the last frame of `gray`; (T, N, 2) and
        (T, N) with the query point, invisible, before each start frame."""
        T, (H, W), N = len(gray), gray[0].shape, len(points)
        tracks = np.broadcast_to(points, (T, N, 2)).copy()
        visible = np.zeros((T, N), bool)
        visible[start, np.arange(N)] = True
        active = np.zeros(N, bool)
        for t in range(T - 1):
            active |= start == t
            lost = (start <= t) & ~active
            tracks[t + 1, lost] = tracks[t, lost]
            ids = np.flatnonzero(active)
            if len(ids):
                new, ok = self._step(gray[t], gray[t + 1], tracks[t, ids], W, H)
                tracks[t + 1, ids] = new
                visible[t + 1, ids] = ok
                active[ids[~ok]] = False
        return tracks, visible

    def _flow(self, src, dst, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        new, status, _ = cv2.calcOpticalFlowPyrLK(
            src,
            dst,
            points.reshape(-1, 1, 2).astype(np.float32),
            None,
            winSize=(self.window, self.window),
            maxLevel=self.levels,
            criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01),
        )
        return new.reshape(-1, 2), status.reshape(-1).astype(bool)

    def _step(self, src, dst, points: np.ndarray, W: int, H: int) -> tuple[np.ndarray, np.ndarray]:
        """Track `points` from pyramid `src` to `dst`; ok where the round trip agrees."""
        new, ok_forward = self._flow(src, dst, points)
        back, ok_back = self._flow(dst, src, new)
        error = np.linalg.norm(back - points, axis=1)
        inside = (new[:, 0] >= 0) & (new[:, 0] <= W - 1) & (new[:, 1] >= 0) & (new[:, 1] <= H - 1)
        return new, ok_forward & ok_back & (error < self.fb_threshold) & inside
