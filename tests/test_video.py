"""tats.video on small clips made here with PyAV: each frame carries its own index as a barcode."""

import importlib.util
import pickle
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

import tats.video
from tats.video import (
    VideoError,
    VideoInfo,
    probe,
    read_frames,
    seek_plan,
    stored_frames,
    timeline,
)

# decord is an extra (pip install 'tats[decord]'): its backend's tests run where it is installed.
HAS_DECORD = importlib.util.find_spec("decord") is not None
DECORD = pytest.param(
    "decord", marks=pytest.mark.skipif(not HAS_DECORD, reason="decord is not installed (an extra)")
)
BITS = 8  # the barcode: BITS blocks of 16x16 pixels in the top row, white = bit set


def make_clip(
    path: Path,
    num_frames: int,
    fps: int = 30,
    codec: str = "libx264",
    gop: int = 12,
    size: tuple[int, int] = (96, 160),
    options: dict | None = None,
) -> Path:
    """Write a clip whose frame i shows i in binary, plus a moving bar."""
    height, width = size
    container = av.open(str(path), "w", options=options or {})
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = {"g": str(gop)} if codec in ("libx264", "mpeg4") else {}
    for i in range(num_frames):
        image = np.full((height, width, 3), 60, np.uint8)
        for bit in range(BITS):
            if i >> bit & 1:
                image[:16, 16 * bit : 16 * bit + 16] = 255
        image[40:, (3 * i) % width] = (255, 0, 0)
        for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def barcode(frames: np.ndarray) -> list[int]:
    """The frame indices the barcodes of decoded frames show."""
    blocks = frames[:, :16, : 16 * BITS].reshape(len(frames), 16, BITS, 16, 3)
    bits = blocks.mean(axis=(1, 3, 4)) > 157
    return [int(sum(1 << b for b in range(BITS) if row[b])) for row in bits]


def upright_frames(num_frames: int, size: tuple[int, int] = (160, 128)) -> np.ndarray:
    """Frames as they are to be displayed (portrait by default, as a phone held upright):
    frame i shows i as a barcode, a moving bar, and a marked bottom-left corner."""
    height, width = size
    frames = np.full((num_frames, height, width, 3), 60, np.uint8)
    for i, image in enumerate(frames):
        for bit in range(BITS):
            if i >> bit & 1:
                image[:16, 16 * bit : 16 * bit + 16] = 255
        image[40:, (3 * i) % width] = (255, 0, 0)
        image[-20:, :12] = (0, 0, 255)
    return frames


def write_frames(
    path: Path,
    frames: np.ndarray,
    rotation: int = 0,
    times: list[float] | None = None,
    fps: int = 30,
) -> Path:
    """Write `frames` losslessly (H.264, qp 0, 4:4:4: every pixel decodes back, up to the
    rounding of RGB -> YUV -> RGB) as they are displayed: stored turned clockwise by
    `rotation` degrees, under a display matrix that turns them back. `times`: each frame's
    presentation time in seconds (default: 1 / fps apart)."""
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=fps)
    turns = rotation // 90
    stream.height, stream.width = np.rot90(frames[0], -turns).shape[:2]
    stream.pix_fmt, stream.options = "yuv444p", {"qp": "0"}
    if rotation:
        stream.set_display_rotation(rotation)
    if times is not None:
        stream.codec_context.time_base = Fraction(1, 1000)
    for i, image in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.rot90(image, -turns)), "rgb24")
        if times is not None:
            frame.pts, frame.time_base = round(times[i] * 1000), Fraction(1, 1000)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clips")
    return {
        "h264": make_clip(root / "h264.mp4", 90, gop=12),
        "vp9": make_clip(root / "vp9.webm", 30, fps=12, codec="libvpx-vp9"),
        "mpeg4": make_clip(root / "mpeg4.avi", 40, fps=25, codec="mpeg4", gop=10),
    }


@pytest.mark.parametrize("backend", ["av", DECORD])
@pytest.mark.parametrize(
    ("name", "frames", "fps"), [("h264", 90, 30.0), ("vp9", 30, 12.0), ("mpeg4", 40, 25.0)]
)
def test_probe_reports_count_rate_and_size(clips, backend, name, frames, fps):
    info = probe(clips[name], backend=backend)
    rotation = 0 if backend == "av" else None  # decord turns frames without saying by how much
    assert info == VideoInfo(clips[name], frames, fps, 160, 96, rotation)
    assert info.duration == pytest.approx(frames / fps)


@pytest.mark.parametrize("backend", ["auto", "av", DECORD])
@pytest.mark.parametrize("name", ["h264", "vp9", "mpeg4"])
def test_read_frames_returns_requested_frames_in_order(clips, backend, name):
    n = probe(clips[name]).num_frames
    rng = np.random.default_rng(0)
    for indices in (
        list(range(n)),  # dense: decode through
        [n - 1, 0, 5, 5, n // 2],  # any order, repeats
        sorted(rng.choice(n, 4, replace=False).tolist()),  # sparse: seeks where it pays
        [n - 1],
        [],
    ):
        frames = read_frames(clips[name], indices, backend=backend)
        assert frames.dtype == np.uint8 and frames.shape == (len(indices), 96, 160, 3)
        assert barcode(frames) == list(indices)


def test_seek_plan_seeks_only_where_a_keyframe_skips_enough(monkeypatch):
    monkeypatch.setattr(tats.video, "SEEK_MIN_SKIP", 4)
    keys = list(range(0, 250, 10))
    assert seek_plan([3, 40, 41, 120, 121, 199, 249], keys) == [None, 40, None, 120, None, 190, 240]
    assert seek_plan([0, 5, 12], [0, 5, 12]) == [None, None, 12]  # skip 4: decode; skip 6: seek
    assert seek_plan(list(range(0, 100, 3)), keys) == [None] * 34  # dense: decode through
    assert seek_plan([5, 200], []) == [None, None]  # no keyframes known: decode through


def test_sparse_reads_seek_to_the_right_frames(tmp_path):
    # Long GOP-structured clip: keyframes every 10 frames, so far targets are reached by seeking.
    path = make_clip(tmp_path / "long.mp4", 250, gop=10)
    indices = [3, 40, 41, 120, 121, 122, 199, 249, 0, 120]
    assert barcode(read_frames(path, indices)) == indices


@pytest.mark.parametrize("backend", ["av", DECORD])
@pytest.mark.parametrize(("name", "frames"), [("h264", 90), ("vp9", 30), ("mpeg4", 40)])
def test_index_beyond_decodable_frames_is_a_video_error(clips, backend, name, frames):
    with pytest.raises(VideoError, match=rf"frame {frames} requested, {frames} frames decode"):
        read_frames(clips[name], [3, frames], backend=backend)


def test_bad_files_raise_one_clear_error(tmp_path, clips):
    data = clips["h264"].read_bytes()
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    webm = clips["vp9"].read_bytes()
    (tmp_path / "cut.webm").write_bytes(webm[: len(webm) * 3 // 4])
    cases = {
        "missing.mp4": "no such file",
        "empty.mp4": "empty file",
        "garbage.mp4": "cannot open",
        "cut.mp4": "cannot open",  # the MP4 index (moov) sits at the end and is gone
        "cut.webm": "truncated",
    }
    for name, problem in cases.items():
        for call in (lambda p: probe(p), lambda p: read_frames(p, [0])):
            with pytest.raises(VideoError, match=problem) as err:
                call(tmp_path / name)
            assert str(err.value).startswith(str(tmp_path / name))
            assert "\n" not in str(err.value)


def test_truncated_file_with_index_up_front_is_detected(tmp_path, clips):
    # faststart puts the index first: the header still promises every frame after a cut.
    path = make_clip(tmp_path / "fast.mp4", 60, options={"movflags": "faststart"})
    data = path.read_bytes()
    cut = tmp_path / "fast_cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.8)])
    with pytest.raises(VideoError, match="truncated: the container declares 60 frames"):
        probe(cut)
    with pytest.raises(VideoError, match="truncated"):
        read_frames(cut, [0])


def test_corrupt_middle_is_a_video_error(tmp_path):
    path = make_clip(tmp_path / "c.mp4", 60, options={"movflags": "faststart"})
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 2000] = np.random.default_rng(1).bytes(2000)
    path.write_bytes(bytes(data))
    try:
        frames = read_frames(path, list(range(60)))
    except VideoError as err:
        assert str(err).startswith(str(path))
    else:  # H.264 may conceal the damage; then every frame must still come back
        assert frames.shape == (60, 96, 160, 3)


def test_video_error_survives_pickling(tmp_path):
    err = VideoError(tmp_path / "x.mp4", "truncated")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, VideoError) and str(back) == str(err) and back.path == err.path


def test_timeline_resamples_to_10fps_and_keeps_webm_native():
    info = VideoInfo(Path("a.mp4"), num_frames=300, fps=30.0, width=320, height=240)
    t = timeline(info)
    assert len(t) == 100 and t[0] == 0 and t[-1] == 299
    np.testing.assert_array_equal(t, np.linspace(0, 299, 100).astype(int))
    assert len(timeline(info, fps=5.0)) == 50
    np.testing.assert_array_equal(timeline(info, fps=None), np.arange(300))
    webm = VideoInfo(Path("b.WEBM"), num_frames=37, fps=12.0, width=427, height=240)
    np.testing.assert_array_equal(timeline(webm), np.arange(37))
    resampled = timeline(webm, native_suffixes=())  # 37 frames at 12 fps -> round(30.8) = 31
    np.testing.assert_array_equal(resampled, np.linspace(0, 36, 31).astype(int))
    # 50 frames at 24.75 fps -> round(20.2) = 20 frames; a single-frame clip keeps one frame
    assert len(timeline(VideoInfo(Path("c.avi"), 50, 24.75, 8, 8))) == 20
    np.testing.assert_array_equal(timeline(VideoInfo(Path("d.mp4"), 1, 30.0, 8, 8)), [0])


def test_stored_frames_spread_over_the_time_base():
    np.testing.assert_array_equal(stored_frames(100), [0, 14, 28, 42, 56, 70, 84, 99])
    np.testing.assert_array_equal(stored_frames(3, 4), [0, 0, 1, 2])
    with pytest.raises(ValueError):
        stored_frames(0)


def test_timeline_and_read_frames_together(clips):
    info = probe(clips["h264"])
    indices = timeline(info)  # 90 frames at 30 fps -> 30 frames at 10 fps
    assert len(indices) == 30
    frames = read_frames(clips["h264"], indices[stored_frames(len(indices))])
    assert barcode(frames) == indices[stored_frames(len(indices))].tolist()


@pytest.mark.parametrize("backend", ["av", DECORD])
@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_a_rotated_clip_decodes_as_displayed(tmp_path, backend, rotation):
    shown = upright_frames(12)
    path = write_frames(tmp_path / f"rot{rotation}.mp4", shown, rotation)
    info = probe(path, backend=backend)
    assert (info.height, info.width) == (160, 128)
    assert info.rotation == (rotation if backend == "av" else None)
    upright = write_frames(tmp_path / "upright.mp4", shown)
    expected = read_frames(upright, range(12), backend=backend)
    assert np.abs(expected.astype(int) - shown).max() <= 1  # RGB -> YUV -> RGB rounding
    np.testing.assert_array_equal(read_frames(path, range(12), backend=backend), expected)
    np.testing.assert_array_equal(read_frames(path, [7, 2], backend=backend), expected[[7, 2]])
    # Scaled to a size of the displayed frame (the tracks stage's --max-side): the scaler runs
    # across the stored frame's rows where the upright one's runs along them.
    small = read_frames(path, [0, 5], backend=backend, size=(64, 80))
    assert small.shape == (2, 80, 64, 3)
    scaled = read_frames(upright, [0, 5], backend=backend, size=(64, 80))
    assert np.abs(small.astype(int) - scaled).max() <= 2


def test_unevenly_timed_frames_are_picked_by_time(tmp_path):
    # A screen recording: 1 s at 30 fps, then a still second (2 frames), then 1 s at 15 fps.
    times = [i / 30 for i in range(30)] + [1.0, 1.5] + [2.0 + i / 15 for i in range(15)]
    path = write_frames(tmp_path / "vfr.mp4", upright_frames(len(times)), times=times)
    info = probe(path)
    np.testing.assert_allclose(info.times, times, atol=1e-3)
    picked = timeline(info)
    instants = np.linspace(times[0], times[-1], len(picked))
    shown = [max(i for i, t in enumerate(times) if t <= instant + 1e-6) for instant in instants]
    assert picked.tolist() == shown
    assert picked.tolist() != np.linspace(0, len(times) - 1, len(picked)).astype(int).tolist()
    assert barcode(read_frames(path, picked)) == shown
    if HAS_DECORD:
        assert probe(path, backend="decord").times == pytest.approx(times, abs=1e-3)


@pytest.mark.parametrize("backend", ["av", DECORD])
def test_evenly_timed_frames_keep_the_index_time_base(clips, tmp_path, backend):
    # Matroska's millisecond clock spaces 30 fps frames 33, 33, 34 ms apart: still even.
    mkv = make_clip(tmp_path / "ms.mkv", 45, fps=30)
    for path in (*clips.values(), mkv):
        info = probe(path, backend=backend)
        assert info.times is None
        expected = np.linspace(0, info.num_frames - 1, round(info.duration * 10)).astype(int)
        np.testing.assert_array_equal(timeline(info, native_suffixes=()), expected)


def test_decord_is_an_extra_tats_runs_without(clips, tmp_path, monkeypatch):
    """pip installs tats without decord (it has no wheels for Linux aarch64 or macOS arm64);
    without it PyAV decodes everything it can, and a file PyAV cannot open says what to
    install for a second try."""
    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert not any(d.split(";")[0].strip().startswith("decord") for d in project["dependencies"])
    assert project["optional-dependencies"]["decord"] == ["decord"]
    monkeypatch.setitem(sys.modules, "decord", None)  # import decord raises ImportError
    name = next(iter(clips))
    assert len(read_frames(clips[name], [0, 1])) == 2
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 100)
    with pytest.raises(VideoError, match=r"decord: decord is not installed .*tats\[decord\]"):
        probe(junk)
