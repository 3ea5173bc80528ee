"""`tats synth`: write the synthetic motion dataset."""

from pathlib import Path
from typing import Annotated

import typer

from tats.cli.common import fail, input_errors
from tats.synth import MOTIONS, SynthConfig, generate

_DEFAULT = SynthConfig()


def _frame_size(text: str) -> tuple[int, int]:
    """'S' -> (S, S); 'WxH' -> (W, H)."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise fail(f"--size: expected S or WxH (e.g. 128 or 160x128), got {text!r}")
    width, height = (int(parts[0]), int(parts[-1]))
    return width, height


def synth(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (created if missing).")
    ],
    classes: Annotated[
        int,
        typer.Option(
            help=f"Number of motion classes (3-{len(MOTIONS)}), taken in registry "
            "order and split train/val/test in proportion 12/4/8."
        ),
    ] = _DEFAULT.classes,
    videos_per_class: Annotated[int, typer.Option(help="Videos per class.")] = (
        _DEFAULT.videos_per_class
    ),
    frames: Annotated[int, typer.Option(help="Frames per video.")] = _DEFAULT.frames,
    size: Annotated[
        str, typer.Option(help="Frame size in pixels: S for SxS, or WxH; even numbers >= 32.")
    ] = str(_DEFAULT.width),
    fps: Annotated[
        float, typer.Option(help="Frame rate of the videos in frames per second.")
    ] = _DEFAULT.fps,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same videos.")] = _DEFAULT.seed,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Render the synthetic motion dataset: videos that only motion tells apart.

    Writes OUT/manifest.csv, OUT/videos/*.mp4 (H.264), OUT/synth.json (the settings)
    and OUT/ground_truth/*.npz (each object's exact pose per frame, for tracker tests).
    """
    width, height = _frame_size(size)
    with input_errors():
        config = SynthConfig(
            classes=classes,
            videos_per_class=videos_per_class,
            frames=frames,
            width=width,
            height=height,
            fps=fps,
            seed=seed,
        )
        manifest = generate(config, out, progress=progress)
    splits = list(config.class_splits().values())
    typer.echo(
        f"wrote {config.classes * config.videos_per_class} videos of {config.classes} classes "
        f"({splits.count('train')} train / {splits.count('val')} val / {splits.count('test')} test)"
        f" to {manifest}"
    )
