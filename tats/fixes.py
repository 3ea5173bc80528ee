"""tats' fixes of the original releases, each a named switch whose other value is the release's
behaviour; and the protocols around training (`release`, `clean`).

    fixes = parse_fixes("all")                     # every fix on: tats' defaults
    fixes = parse_fixes("none")                    # as the releases compute
    fixes = parse_fixes("hod-order,hod-shares")    # only these on

`FIXES` is the one list of them: `docs/faithful.md` holds the table `fixes_table()` writes
(tests/test_fixes.py checks it), and each part of tats asks `"name" in fixes` where the fix
acts. Differences from the releases that are no switch (the release crashes, or computes the
same) are listed in `NOT_SWITCHES`, with the reason.

A recipe (`tats run --recipe`) runs every fix off and the `release` protocol unless told
otherwise; without a recipe tats runs every fix and the `clean` protocol.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Fix:
    """One fix: its switch name, the stage it acts in, what the release does, what tats does."""

    name: str
    stage: str  # tracks, training, evaluation, model
    release: str
    tats: str


FIXES: tuple[Fix, ...] = (
    Fix("query-frame", "tracks",
        "Trokens: a cluster's query frame is the clustering frame at its peak frame's position in "
        "the sorted list of peak frames, not its peak frame (`point_tracking/utils.py` "
        "`convert_points_for_tracking` with `get_semantic_points.py`): points are queried in "
        "frames where their cluster may be small or absent",
        "the clustering frame where the cluster covers most patches"),
    Fix("frame-visibility", "tracks",
        "a tracker may report a point outside the frame as visible",
        "visibility is False outside the frame"),
    Fix("hod-order", "model",
        "Trokens: the histogram's bin 0 is centred on the angle -pi, leftward (`datasets/hod.py` "
        "`get_orientation_hist`: `(arctan2 / pi + 1) / 2 * bins`)",
        "bin 0 is centred on +x, rightward; the same histogram rotated by half a turn (no "
        "matter when training from scratch; weights moved between the two need it)"),
    Fix("hod-shares", "model",
        "Trokens: an angle between two bin centres gives the nearer bin the smaller share "
        "(`datasets/hod.py` `get_orientation_hist`)",
        "the nearer bin gets the larger share (linear in the angle)"),
    Fix("motion-init", "model",
        "Trokens: the motion layers are created after the weight initialisation, so they keep "
        "PyTorch's defaults (`models/pointformer.py`)",
        "initialised like every other layer (truncated normal 0.02, zero bias; LayerNorm 1, 0)"),
    Fix("embed-decay", "training",
        "weight-decay exemptions name `pos_embed`/`temp_embed`, which match no parameter: the "
        "position embeddings decay (`models/pointformer.py` `no_weight_decay`)",
        "the position embeddings and the CLS token are exempt, as intended"),
    Fix("motion-decay", "training",
        "Trokens: the motion layers' biases and LayerNorms get weight decay 0.5, pulling the "
        "gain that scales the motion tokens to zero",
        "their Linear weights decay like all others; their biases and LayerNorms do not"),
    Fix("trokens-mask", "training",
        "Trokens: no attention mask at all: the point files store the query frames as "
        "`point_queries` (`point_tracking/new_point_tracking.py`), the loader reads "
        "`per_point_queries` (`datasets/base_ds.py`, `__getitem__`), so the query mask it "
        "attends with is all True (`--mask all`)",
        "the Trokens preset masks by visibility (`--mask visible`): semantic points are tracked "
        "both ways and exist at every frame; TATs keeps its query mask"),
    Fix("rank-episodes", "training",
        "every GPU rank draws the same training episodes (`datasets/custom_sampler.py`: one "
        "seed for all ranks)",
        "each rank draws its own"),
    Fix("bf16", "training",
        "fp16 autocast with a GradScaler in training (`TRAIN.MIXED_PRECISION`)",
        "`--amp auto` is bf16 on CUDA where supported (no scaler); fp32 on CPU either way"),
    Fix("metric-fp32", "training",
        "the Hausdorff metric under the training autocast (its matrix products in fp16)",
        "in float32"),
    Fix("eval-subset", "evaluation",
        "Trokens: the points are sampled anew at every read, at test time too "
        "(`datasets/point_sampler.py` `cluster_sample`)",
        "evaluation reads a fixed subset per video (training draws stay per read)"),
)  # fmt: skip
FIX_NAMES: tuple[str, ...] = tuple(f.name for f in FIXES)
TRACKS_FIXES = tuple(f.name for f in FIXES if f.stage == "tracks")

# Documented differences from the releases that are no switch, and why.
NOT_SWITCHES: tuple[tuple[str, str, str], ...] = (
    ("the 256-point subset is drawn unseeded",
     "drawn from a seed derived from the video id: stores are reproducible",
     "the same distribution: which points the release draws is itself a random draw"),
    ("clips with fewer than 256 kept points crash the sampler",
     "padded; padding points are masked", "the release crashes"),
    ("short clips repeat query frames (`linspace(...).astype(int)`), tracking and filtering "
     "the same grid twice", "one grid per distinct query frame",
     "the same tracks: the repeated grid's points lie on the kept ones and are filtered out"),
    ("a fully masked attention row gives NaN", "a zero update",
     "the release's loss turns NaN and it stops; only padding (tats') or a visibility mask "
     "(a fix) makes such rows"),
    ("accuracy without a confidence interval", "mean +- 1.96 std / sqrt(episodes)",
     "reporting only: the same mean"),
    ("RandAugment: the first frame's ops come from another random state; both ops are applied "
     "or skipped together; posterize at level 10 blacks out the clip",
     "one op plan per clip, independent ops, posterize keeps >= 1 bit",
     "not yet a switch: the features stage draws its views with tats' RandAugment"),
    ("DINOv2 runs on every clip at every step; CoTracker runs 7 times per video, one clip per "
     "call", "features and tracks extracted once, resumable; CoTracker in one pass over all "
     "query frames, batched", "the same computation, done once"),
    ("the CLS head has `MODEL.NUM_CLASSES` outputs: HMDB-51 51, UCF-101 101, FineGym 99 "
     "(Trokens' configs), more than the training classes",
     "one output per training class",
     "not yet a switch: the outputs no clip is labelled with take a share of the label "
     "smoothing and of the softmax"),
    ("Trokens: the k-means clustering alternative draws its initial centres from the global "
     "random state, seeded once per run, so a video's clusters depend on the videos extracted "
     "before it", "seeded per clip: a video's queries depend on the video only",
     "the release's order of videos is not reproducible in a parallel extraction; no recipe "
     "uses k-means"),
)  # fmt: skip

PROTOCOLS = ("clean", "release")
# What the `release` protocol does, from both releases' `tools/train_few_shot.py`,
# `tools/test_few_shot.py`, `utils/checkpoint.py` and `datasets/custom_sampler.py`.
RELEASE_EVAL_PERIOD = 5  # TRAIN.EVAL_PERIOD in every release config
RELEASE_VAL_SHARE = 5  # val episodes: FEW_SHOT.TEST_EPISODES // 5 (`less_iters`)


def parse_fixes(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """The fixes on, in registry order: "all", "none", or names separated by commas (or an
    iterable of names). ValueError naming an unknown one."""
    if value is None:
        return FIX_NAMES
    if isinstance(value, str):
        text = value.strip()
        if text in ("all", "none", ""):
            return FIX_NAMES if text == "all" else ()
        names = [n.strip() for n in text.split(",") if n.strip()]
    else:
        names = list(value)
    unknown = [n for n in names if n not in FIX_NAMES]
    if unknown:
        raise ValueError(
            f"unknown fix {unknown[0]!r}; fixes: all, none, or some of {', '.join(FIX_NAMES)}"
        )
    return tuple(n for n in FIX_NAMES if n in names)


def describe_fixes(fixes: Iterable[str]) -> str:
    """"all", "none", or the names on."""
    fixes = tuple(fixes)
    if set(fixes) == set(FIX_NAMES):
        return "all"
    return ",".join(fixes) if fixes else "none"


def stage_fixes(fixes: Iterable[str], names: tuple[str, ...]) -> tuple[str, ...] | None:
    """A stage's record of its fixes: None where all of them are on (what stores made before
    the switches record), else those on."""
    on = tuple(n for n in names if n in tuple(fixes))
    return None if on == names else on


def fixes_table() -> str:
    """The Markdown table of the switches, as docs/faithful.md holds it."""
    lines = ["| switch | acts in | the release | tats (the fix) |", "|---|---|---|---|"]
    for f in FIXES:
        lines.append(f"| `{f.name}` | {f.stage} | {f.release} | {f.tats} |")
    return "\n".join(lines)


def not_switches_table() -> str:
    """The Markdown table of the differences that are no switch."""
    lines = ["| the release | tats | why no switch |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in NOT_SWITCHES]
    return "\n".join(lines)
