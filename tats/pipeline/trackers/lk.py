"""Pyramidal Lucas-Kanade (OpenCV): a weight-free CPU tracker for the demo and the tests.

All query frames go in one call: a forward sweep carries every point from its query frame to
the last frame, a backward sweep to the first. Each step is checked forward-backward: a point
whose round trip misses by more than `fb_threshold` px, or that leaves the image, is lost. LK
cannot find a point again after an occlusion, so a lost point stays invisible for the rest of
its sweep and keeps the position where it was lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from tats.pipeline.trackers import TrackerIdentity, register_tracker


@register_tracker("lk")
class LKTracker:
    def __init__(
        self,
        checkpoint: str | Path | None = None,
        device: str = "cpu",
        window: int = 7,
        levels: int = 3,
        fb_threshold: float = 1.0,
    ):
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

    def track(self, frames: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        T, H, W = frames.shape[:3]
        N = len(queries)
        gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
        start = np.clip(np.rint(queries[:, 0]).astype(int), 0, T - 1)
        tracks = np.zeros((T, N, 2), np.float32)
        visible = np.zeros((T, N), bool)
        tracks[start, np.arange(N)] = queries[:, 1:]
        visible[start, np.arange(N)] = True
        for step in (1, -1):
            started = np.zeros(N, bool)
            active = np.zeros(N, bool)
            for t in range(T - 1) if step == 1 else range(T - 1, 0, -1):
                active |= start == t
                started |= start == t
                held = started & ~active
                tracks[t + step, held] = tracks[t, held]
                ids = np.flatnonzero(active)
                if len(ids):
                    new, ok = self._step(gray[t], gray[t + step], tracks[t, ids], W, H)
                    tracks[t + step, ids] = new
                    visible[t + step, ids] = ok
                    active[ids[~ok]] = False
        return tracks, visible

    def track_batch(
        self, clips: Sequence[tuple[np.ndarray, np.ndarray]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        return [self.track(frames, queries) for frames, queries in clips]

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
