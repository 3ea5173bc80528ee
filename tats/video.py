"""Video decoding: probe a file, resample it to the track time base, read frames as RGB.

PyAV decodes; decord, an optional extra (`pip install 'tats[decord]'`), is the fallback for
files PyAV cannot open (backend="auto").

Frame numbering is "the n-th frame the decoder outputs", counted from 0. `probe` reports as
`num_frames` the number of frames that actually decode:
- containers with a frame index (MP4/MOV, AVI): the declared count when the packets present
  match it (fewer packets than declared = truncated file, an error);
- containers without one (WebM/Matroska, MPEG-TS, ...), where demuxers and decord only estimate,
  or whose index disagrees with the packets: every frame is decoded and counted (SSv2 clips are
  short, so this costs little). A WebM or Matroska file shorter than the segment size its
  header declares is reported as truncated.

`read_frames` decodes straight through dense index sets and seeks (to the keyframe before a
frame) only when that skips more than SEEK_MIN_SKIP frames; seeking needs a container whose
packets map one-to-one onto frames, otherwise it decodes through.

Frames come out as they are displayed: a clip whose container carries a display rotation (a
phone held upright records landscape frames and a 90-degree display matrix) is decoded rotated,
and its width and height are the displayed ones. PyAV reports the rotation and tats turns each
frame; decord turns them itself and does not report by how much.

Frames are numbered in presentation order. A file whose presentation times are not evenly
spaced (variable frame rate: phones, screen recordings) reports them, so that the time base
picks frames by time, not by index.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BACKENDS = ("auto", "av", "decord")
# A seek (flush, demux from the keyframe, refill the decoder) is used only when it skips more
# frames than this: over skips of 5 frames of a 480x360 H.264 clip, seeking still takes less
# time than decoding through (benchmarks/bench_video.py, "short_seeks").
SEEK_MIN_SKIP = 4
_MATROSKA_SUFFIXES = (".webm", ".mkv", ".mka", ".mk3d")
_DECORD_BATCH = 8  # frames decord decodes at full size at once, before they are scaled


class VideoError(RuntimeError):
    """A video that cannot be used: missing, empty, unreadable, truncated or corrupt."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")

    def __reduce__(self):  # keep the two-argument form picklable (worker processes)
        return (type(self), (self.path, self.problem))


@dataclass(frozen=True)
class VideoInfo:
    """What `probe` reports: decodable frame count, native frame rate, displayed frame size,
    the display rotation decoding applies (degrees counterclockwise: 0, 90, 180 or 270; None
    where decord applied it without saying), and, for a file whose frames are not evenly
    spaced in time, each frame's presentation time in seconds (None: evenly spaced)."""

    path: Path
    num_frames: int
    fps: float
    width: int
    height: int
    rotation: int | None = 0
    times: tuple[float, ...] | None = None

    @property
    def duration(self) -> float:
        """Seconds: num_frames / fps."""
        return self.num_frames / self.fps


def probe(path: str | Path, backend: str = "auto") -> VideoInfo:
    """Open a video and report its decodable frame count, frame rate and frame size.

    backend: "auto" (PyAV, then decord if PyAV cannot open the file), "av" or "decord".
    """
    path = _existing_file(path, backend)
    if backend == "decord":
        return _probe_decord(path)
    try:
        return _probe_av(path)
    except _CannotOpen as err:
        if backend == "av":
            raise VideoError(path, f"cannot open: {err}") from None
        return _fallback(path, err, _probe_decord)


def timeline(
    info: VideoInfo, fps: float | None = 10.0, native_suffixes: Sequence[str] = (".webm",)
) -> np.ndarray:
    """Native frame index of each frame on the track time base, as the original TATs
    extraction reads clips (`read_video` and `read_webm_video` in `point_tracking/vid_readers.py`
    of pulkitkumar95/tats; it takes int(duration * fps) frames, where round() is used here).

    The clip is resampled to `fps`: T = round(duration * fps) frames spread evenly over
    [0, num_frames - 1]. With fps=None, or for a file whose suffix is in native_suffixes
    (SSv2's .webm), every native frame is kept. For a file whose frames are not evenly spaced
    in time (`info.times`), the T instants are spread evenly from the first frame's
    presentation time to the last one's, and each picks the frame shown at that instant (the
    last one presented at or before it); for evenly spaced frames this is the same choice.
    """
    n = info.num_frames
    if n < 1:
        raise ValueError(f"{info.path}: no frames")
    if fps is None or Path(info.path).suffix.lower() in {s.lower() for s in native_suffixes}:
        return np.arange(n)
    num = max(1, round(info.duration * fps))
    if info.times is None:
        return np.linspace(0, n - 1, num).astype(int)
    times = np.asarray(info.times)
    instants = np.linspace(times[0], times[-1], num)
    # The tolerance keeps an instant that float rounding puts just before a frame on it.
    return np.searchsorted(times, instants + 1e-9, side="right") - 1


def stored_frames(T: int, S: int = 8) -> np.ndarray:
    """The S time-base indices that are stored and trained on: linspace(0, T-1, S)."""
    if T < 1 or S < 1:
        raise ValueError(f"need T >= 1 and S >= 1, got T={T}, S={S}")
    return np.linspace(0, T - 1, S).astype(int)


def decode_size(
    width: int, height: int, max_side: int | None, min_side: int = 0
) -> tuple[int, int]:
    """(width, height) to decode at: the frame size, shrunk (aspect kept) so that its longer
    side is at most `max_side` (None: the frame size), but never so far that its shorter side
    falls below `min_side` (a later resize to that size then still only shrinks)."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max(max_side / max(width, height), min(1.0, min_side / min(width, height)))
    return max(2, round(width * scale)), max(2, round(height * scale))


def read_frames(
    path: str | Path,
    indices: Sequence[int],
    backend: str = "auto",
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decode the given native frame indices (any order, repeats allowed).

    Returns uint8 RGB frames [len(indices), H, W, 3] as displayed (rotated by the file's
    display rotation), in the requested order, scaled to `size` = (width, height) of the
    displayed frame where given (area interpolation, one frame at a time), so that a large
    video never exists in memory at full size. Raises VideoError for an unreadable, truncated
    or corrupt file, or an index past the last decodable frame. backend: as for `probe`.
    """
    path = _existing_file(path, backend)
    wanted = np.asarray(indices)
    if wanted.ndim != 1 or (wanted.size and not np.issubdtype(wanted.dtype, np.integer)):
        raise ValueError(f"indices must be a 1-D sequence of integers, got {wanted!r}")
    if wanted.size and wanted.min() < 0:
        raise ValueError(f"negative frame index {wanted.min()}")
    targets, order = np.unique(wanted, return_inverse=True)
    if backend == "decord":
        frames = _read_decord(path, targets, size)
    else:
        try:
            frames = _read_av(path, targets, size)
        except _CannotOpen as err:
            if backend == "av":
                raise VideoError(path, f"cannot open: {err}") from None
            frames = _fallback(path, err, lambda p: _read_decord(p, targets, size))
    return frames[order.reshape(-1)]


# --- shared helpers -----------------------------------------------------------------------


class _CannotOpen(Exception):
    """PyAV cannot open the container or has no decoder for its video stream."""


def _existing_file(path: str | Path, backend: str) -> Path:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    path = Path(path)
    if not path.is_file():
        raise VideoError(path, "a folder, not a video file" if path.is_dir() else "no such file")
    if path.stat().st_size == 0:
        raise VideoError(path, "empty file")
    return path


def _fallback(path: Path, av_error: _CannotOpen, decord_call):
    try:
        return decord_call(path)
    except VideoError as err:
        decord_problem = err.problem.removeprefix("cannot open: ")
        raise VideoError(path, f"cannot open: {av_error} (decord: {decord_problem})") from None


def _matroska_truncated(path: Path) -> bool:
    """True when a Matroska/WebM file is shorter than the segment size its header declares."""
    with open(path, "rb") as f:
        head = f.read(4096)
    pos = 0
    for expected_id in (0x1A45DFA3, 0x18538067):  # EBML header, then Segment
        element_id, pos = _ebml_vint(head, pos, keep_marker=True)
        size, pos = _ebml_vint(head, pos, keep_marker=False)
        if element_id != expected_id or size is None:
            return False  # not plain Matroska, or a live stream of unknown size
        if expected_id == 0x1A45DFA3:
            pos += size
    return path.stat().st_size < pos + size


def _ebml_vint(data: bytes, pos: int, keep_marker: bool) -> tuple[int | None, int]:
    """Read an EBML variable-length integer; None for a size of 'unknown' (all ones)."""
    if pos >= len(data) or data[pos] == 0:
        return None, len(data)
    length = 8 - data[pos].bit_length() + 1
    if pos + length > len(data):
        return None, len(data)
    value = int.from_bytes(data[pos : pos + length], "big")
    if not keep_marker:
        value &= (1 << (7 * length)) - 1
        if value == (1 << (7 * length)) - 1:
            return None, pos + length
    return value, pos + length


# --- PyAV ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Packets:
    """What demuxing (without decoding) tells about a video stream."""

    pts: np.ndarray  # presentation time stamp of each frame, ascending (stream time base)
    keyframes: list[int]  # frame indices whose packet is a keyframe, ascending
    declared: int  # frame count in the container's index, 0 if it has none
    seekable: bool  # packets map one-to-one onto frames with unique time stamps


@contextmanager
def _av_stream(path: Path) -> Iterator[tuple[object, object]]:
    import av

    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError) as err:
        raise _CannotOpen(_av_message(err)) from None
    try:
        if not container.streams.video:
            raise _CannotOpen("no video stream")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise _CannotOpen(f"no decoder for codec {stream.codec_tag!r}")
        yield container, stream
    finally:
        container.close()


def _av_message(err: Exception) -> str:
    """FFmpeg's own words without the errno prefix and the repeated file name."""
    text = getattr(err, "strerror", None) or str(err)
    return text.rstrip(".")


def _scan(path: Path) -> _Packets:
    """Demux every packet of the video stream; raise VideoError for a truncated file."""
    import av

    pts, is_key = [], []
    with _av_stream(path) as (container, stream):
        declared = int(stream.frames or 0)
        try:
            for packet in container.demux(stream):
                if packet.size == 0 or packet.is_discard:
                    continue
                pts.append(packet.pts)
                is_key.append(packet.is_keyframe)
        except av.error.FFmpegError as err:
            raise VideoError(path, f"corrupt container: {_av_message(err)}") from None
    if not pts:
        raise VideoError(path, "no video frames")
    if declared and len(pts) < declared:
        raise VideoError(
            path, f"truncated: the container declares {declared} frames, {len(pts)} are present"
        )
    if path.suffix.lower() in _MATROSKA_SUFFIXES and _matroska_truncated(path):
        raise VideoError(path, "truncated: file is shorter than its Matroska segment size")
    seekable = declared == len(pts) and None not in pts and len(set(pts)) == len(pts)
    if not seekable:
        return _Packets(np.zeros(0, np.int64), [], declared, False)
    order = np.argsort(pts, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    keyframes = sorted(int(rank[i]) for i, key in enumerate(is_key) if key)
    return _Packets(np.asarray(pts, np.int64)[order], keyframes, declared, bool(keyframes))


def _probe_av(path: Path) -> VideoInfo:
    packets = _scan(path)
    with _av_stream(path) as (container, stream):
        ctx = stream.codec_context
        width, height = int(ctx.width), int(ctx.height)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        frames = _decoded(path, container, stream)
        first = next(frames, None)
        if first is None:
            raise VideoError(path, "no frame decodes")
        rotation = _rotation(path, first)
        if packets.seekable:
            pts = packets.pts.tolist()
        else:
            pts = [first.pts, *(frame.pts for frame in frames)]
        times = _uneven_times(pts, stream.time_base)
    if not rate or rate <= 0:
        raise VideoError(path, "unknown frame rate")
    if width <= 0 or height <= 0:
        raise VideoError(path, f"invalid frame size {width}x{height}")
    if rotation in (90, 270):
        width, height = height, width
    return VideoInfo(path, len(pts), float(rate), width, height, rotation, times)


def _rotation(path: Path, frame) -> int:
    """The display rotation of a decoded frame, degrees counterclockwise in 0, 90, 180, 270."""
    degrees = frame.rotation
    turns = round(degrees / 90)
    if abs(degrees - 90 * turns) > 1:
        raise VideoError(path, f"display rotation of {degrees} degrees (not a multiple of 90)")
    return 90 * turns % 360


def _uneven_times(pts: list, time_base) -> tuple[float, ...] | None:
    """Presentation times (s) of frames whose time stamps are not evenly spaced, else None.

    Time stamps within a quarter frame of an even spacing count as even (containers round
    them to their clock: 33, 33, 34 ms at 30 fps in Matroska); so do unknown or unordered ones.
    """
    if len(pts) < 3 or None in pts or time_base is None:
        return None
    times = np.asarray(pts, np.float64) * float(time_base)
    if np.any(np.diff(times) <= 0):
        return None
    step = (times[-1] - times[0]) / (len(times) - 1)
    even = times[0] + step * np.arange(len(times))
    if np.abs(times - even).max() <= step / 4:
        return None
    return tuple(times.tolist())


def _decoded(path: Path, container, stream) -> Iterator[object]:
    """Decoded frames of the stream from the container's current position."""
    import av

    try:
        yield from container.decode(stream)
    except av.error.FFmpegError as err:
        raise VideoError(path, f"corrupt or truncated data: {_av_message(err)}") from None


class _SeekMissed(Exception):
    """After a seek the decoder did not land on a known frame at or before the target."""


def _read_av(path: Path, targets: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    packets = _scan(path)
    try:
        return _decode_targets(path, targets, packets, size)
    except _SeekMissed:
        return _decode_targets(path, targets, packets, size, allow_seek=False)


def _decode_targets(
    path: Path,
    targets: np.ndarray,
    packets: _Packets,
    size: tuple[int, int] | None,
    allow_seek: bool = True,
) -> np.ndarray:
    """Decode the sorted unique `targets`, seeking where a keyframe lets us skip enough."""
    if packets.seekable and len(targets) and targets[-1] >= len(packets.pts):
        raise VideoError(path, f"frame {targets[-1]} requested, {len(packets.pts)} frames decode")
    seekable = allow_seek and packets.seekable
    index_of = {int(p): i for i, p in enumerate(packets.pts)} if seekable else {}
    seeks = seek_plan(targets.tolist(), packets.keyframes if seekable else [])
    from av.video.reformatter import VideoReformatter

    to_rgb = VideoReformatter()  # one for all frames: it keeps its swscale context
    with _av_stream(path) as (container, stream):
        frames = _decoded(path, container, stream)
        frame = next(frames, None)  # the first frame tells the display rotation
        if frame is None:
            raise VideoError(path, "no frame decodes")
        pos = index_of.get(frame.pts, -1) if seekable else 0
        turns = _rotation(path, frame) // 90
        coded = (int(stream.codec_context.width), int(stream.codec_context.height))
        shown = coded[::-1] if turns % 2 else coded
        width, height = size or shown
        # Scaled in the coded orientation, then turned to the displayed one.
        scaled = (height, width) if turns % 2 else (width, height)
        # Area interpolation where the frame shrinks; the converter's default otherwise.
        scaling = {"interpolation": "AREA"} if scaled != coded else {}
        out = np.empty((len(targets), height, width, 3), np.uint8)
        for slot, (target, key) in enumerate(zip(targets.tolist(), seeks, strict=True)):
            if key is not None:
                container.seek(int(packets.pts[key]), stream=stream, backward=True)
                frames, pos = _decoded(path, container, stream), None
            while pos is None or pos < target:
                frame = next(frames, None)
                if frame is None and pos is None:
                    raise _SeekMissed
                if frame is None:
                    raise VideoError(path, f"frame {target} requested, {pos + 1} frames decode")
                if seekable:
                    if frame.pts not in index_of:
                        raise _SeekMissed
                    pos = index_of[frame.pts]
                else:
                    pos += 1
            if pos != target:
                raise _SeekMissed
            rgb = to_rgb.reformat(frame, *scaled, "rgb24", **scaling).to_ndarray()
            out[slot] = np.rot90(rgb, turns)
    return out


def seek_plan(targets: Sequence[int], keyframes: Sequence[int]) -> list[int | None]:
    """For each sorted target frame: the keyframe to seek to first, or None to decode on.

    Decoding goes on from the last frame read unless a keyframe at or before the target lies
    more than SEEK_MIN_SKIP frames ahead; no keyframes given = decode straight through.
    """
    plan, pos = [], -1
    for target in targets:
        i = bisect.bisect_right(keyframes, target) - 1
        key = keyframes[i] if i >= 0 else 0
        plan.append(key if key - pos - 1 > SEEK_MIN_SKIP else None)
        pos = target
    return plan


# --- decord (fallback) --------------------------------------------------------------------


def _decord(path: Path):
    """The decord module, or a VideoError saying how to install it (it is an extra)."""
    try:
        import decord
    except ImportError as err:
        raise VideoError(
            path, f"decord is not installed ({err}; pip install 'tats[decord]')"
        ) from None
    return decord


def _decord_reader(path: Path):
    decord = _decord(path)
    try:
        return decord.VideoReader(str(path), num_threads=1)
    except (decord.DECORDError, RuntimeError) as err:
        raise VideoError(path, f"cannot open: {_decord_message(err)}") from None


def _decord_message(err: Exception) -> str:
    """decord's first error line without its '[time] source.cc:line: Error:' prefix."""
    line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return line.split("Error: ", 1)[-1]


def _probe_decord(path: Path) -> VideoInfo:
    decord = _decord(path)
    if path.suffix.lower() in _MATROSKA_SUFFIXES and _matroska_truncated(path):
        raise VideoError(path, "truncated: file is shorter than its Matroska segment size")
    reader = _decord_reader(path)
    num_frames = len(reader)
    if num_frames == 0:
        raise VideoError(path, "no video frames")
    try:
        # decord's count is an estimate for some containers: the last frame must decode.
        height, width = reader[num_frames - 1].shape[:2]
    except (decord.DECORDError, RuntimeError, IndexError) as err:
        problem = f"truncated: frame {num_frames - 1} does not decode ({_decord_message(err)})"
        raise VideoError(path, problem) from None
    fps = float(reader.get_avg_fps())
    if fps <= 0:
        raise VideoError(path, "unknown frame rate")
    starts = reader.get_frame_timestamp(range(num_frames))[:, 0].tolist()
    times = _uneven_times(starts, 1)  # decord's time stamps are in seconds
    return VideoInfo(path, num_frames, fps, int(width), int(height), None, times)


def _read_decord(path: Path, targets: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Frames at full size, a few at a time, each scaled here where a size is given: decord's
    own scaling breaks on frames it turns by 90 degrees (it swaps the size's sides)."""
    import cv2

    decord = _decord(path)
    reader = _decord_reader(path)
    if len(targets) and targets[-1] >= len(reader):
        raise VideoError(path, f"frame {targets[-1]} requested, {len(reader)} frames decode")
    width, height = size or reader[0].shape[1::-1]
    out = np.empty((len(targets), height, width, 3), np.uint8)
    for start in range(0, len(targets), _DECORD_BATCH):
        chunk = targets[start : start + _DECORD_BATCH].tolist()
        try:
            frames = reader.get_batch(chunk).asnumpy()
        except (decord.DECORDError, RuntimeError) as err:
            problem = f"corrupt or truncated data: {_decord_message(err)}"
            raise VideoError(path, problem) from None
        for i, frame in enumerate(frames):
            if frame.shape[1::-1] != (width, height):
                frame = cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)
            out[start + i] = frame
    return out
