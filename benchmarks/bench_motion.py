"""Motion benchmark: appearance only, TATs, TATs + motion tokens and Trokens on `tats synth`.

    .venv/bin/python benchmarks/bench_motion.py [--preset quick|cpu|full] [--out results.json]

The synthetic classes differ only in motion, and the test classes are held out from training.
Every row is the same small model trained the same way (budget, seeds, episodes) on stores of
the same videos with the same weight-free `pixels` features; only the options that make a
method differ (tats/methods.py):

    appearance only       TATs' tracks with every point frozen where it starts
                          (`--tracks-mode frozen`): appearance changes at fixed places, no motion
    TATs                  grids at the uniform:8 query frames, LK tracks, the stored subset
    TATs + motion tokens  the same, with Trokens' motion tokens (`--motion both`)
    Trokens               semantic queries (clusters of `pixels` features, LK tracks in both
                          directions), cluster sampling, the visible mask, motion tokens

Trokens' clips with fewer points than the subset are filled with repeated points as the release
does; the row "Trokens, padded" reads them with masked padding instead (`fill: pad`). The rows
"TATs, fixes off" and "Trokens, fixes off" turn every fix of the releases off (tats/fixes.py,
`--fixes none`: stores, model, training and evaluation as the releases compute them); every row
runs the clean protocol, so that only the fixes differ. An
ablation row, `--rows "Trokens without motion tokens"`, is Trokens with `--motion none`.
`--keep-other-rows` keeps, in an existing --out of the same preset, the rows not run now.

Reported: 5-way 1-shot and 5-shot test accuracy +- 95% CI of each row, a model trained per shot.
Stores are built once under --work and reused; runs resume. Presets: `quick` is a smoke test;
`cpu` (the default) trains 2.5x longer on twice the videos and is meant to run in under 45
minutes on 2 idle CPU cores; `full` is the default dataset and point budget (hours on a CPU:
--device cuda). The JSON records each run's training seconds (summed from the run's own epoch
records, so a resumed run counts in full) and the wall seconds of this invocation (small for runs
that were already finished).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from tats.manifest import read_manifest
from tats.pipeline.backbones import Preprocess
from tats.pipeline.features import FeaturesConfig, extract_features
from tats.pipeline.semantic import SemanticConfig
from tats.pipeline.tracks import TracksConfig, extract_tracks
from tats.synth import SynthConfig, generate
from tats.train import train
from tats.train_config import config_from_dict

# The model is the TATs model with a 32-wide projection of the 64-dim pixel features (4 heads);
# trained on the raw pixel features (width 64, no projection) it did not leave chance level
# within these budgets. Weight decay 0.05 instead of the original's 0.5 for this small model.
MODEL = dict(width=32, heads=4, weight_decay=0.05)
# Row -> (which tracks store, the training options that make it).
ROWS = {
    "appearance only": ("uniform", {"method": "tats", "tracks_mode": "frozen"}),
    "TATs": ("uniform", {"method": "tats"}),
    "TATs + motion tokens": ("uniform", {"method": "tats", "motion": "both"}),
    "Trokens": ("semantic", {"method": "trokens"}),
    "Trokens, padded": ("semantic", {"method": "trokens", "fill": "pad"}),
    # Every fix of the releases off (tats/fixes.py), stores included: what the releases compute.
    "TATs, fixes off": ("uniform-release", {"method": "tats", "fixes": "none"}),
    "Trokens, fixes off": ("semantic-release", {"method": "trokens", "fixes": "none"}),
    # Ablation, not run by default: which part of Trokens makes its lead.
    "Trokens without motion tokens": ("semantic", {"method": "trokens", "motion": "none"}),
}
DEFAULT_ROWS = ["appearance only", "TATs", "TATs + motion tokens", "Trokens", "Trokens, padded"]
PRESETS = {
    "quick": {
        "synth": SynthConfig(videos_per_class=10, frames=24),
        "tracks": TracksConfig(tracker="lk", grid=8, subset=64),
        "train": dict(MODEL, train_queries=3, episodes=60, epochs=6, lr=1e-3, warmup_epochs=0,
                      lr_steps=[], val_episodes=100, test_episodes=500),
    },
    # 2.5x the quick preset's training steps, twice its videos. On 2 idle cores the training
    # epochs of its eight runs took 22 minutes (benchmarks/results/motion-cpu.json).
    "cpu": {
        "synth": SynthConfig(videos_per_class=20, frames=24),
        "tracks": TracksConfig(tracker="lk", grid=8, subset=64),
        "train": dict(MODEL, train_queries=3, episodes=100, epochs=9, lr=1e-3, warmup_epochs=1,
                      lr_steps=[6], val_episodes=200, test_episodes=2000),
    },
    # The cpu preset's videos and stores, a third of its training steps: what 2 cores shared
    # with other work finish in an hour (the Trokens fill rows of motion-cpu-short.json).
    "cpu-short": {
        "synth": SynthConfig(videos_per_class=20, frames=24),
        "tracks": TracksConfig(tracker="lk", grid=8, subset=64),
        "train": dict(MODEL, train_queries=3, episodes=60, epochs=5, lr=1e-3, warmup_epochs=1,
                      lr_steps=[4], val_episodes=100, test_episodes=1000),
    },
    # cpu-short with 4 points per cluster: a clip's 12 clusters give
    # 48 points, fewer than the 64-point subset, as Trokens' 12 to 16 clusters of 16 points are
    # fewer than its 256 (a quarter of every read is fill): where the two fills differ.
    "cpu-fill": {
        "synth": SynthConfig(videos_per_class=20, frames=24),
        "tracks": TracksConfig(tracker="lk", grid=8, subset=64),
        "semantic": SemanticConfig(backbone="pixels", points_per_cluster=4),
        "train": dict(MODEL, train_queries=3, episodes=60, epochs=5, lr=1e-3, warmup_epochs=1,
                      lr_steps=[4], val_episodes=100, test_episodes=1000),
    },
    "full": {
        "synth": SynthConfig(),
        "tracks": TracksConfig(tracker="lk", grid=16),
        "train": dict(MODEL, train_queries=6, episodes=200, epochs=20, lr=1e-3, warmup_epochs=1,
                      lr_steps=[12, 17], val_episodes=500, test_episodes=2000),
    },
}  # fmt: skip
FEATURES = FeaturesConfig(backbone="pixels", views=2, preprocess=Preprocess(size=224))


def tracks_config(preset: dict, store: str) -> TracksConfig:
    """The tracks stores: TATs' grids ("uniform"), Trokens' semantic points ("semantic"); with
    "-release", the same without the tracks stage's fixes (as the releases extract them)."""
    uniform = preset["tracks"]
    if store.endswith("-release"):
        return replace(tracks_config(preset, store.removesuffix("-release")), fixes=())
    if store == "uniform":
        return uniform
    semantic = preset.get("semantic", SemanticConfig(backbone="pixels"))
    return replace(uniform, queries="semantic", semantic=semantic)


def build_stores(work: Path, preset: dict, stores: set[str], workers: int) -> dict[str, Path]:
    """The synth dataset and its stores under `work` (each skipped where already done)."""
    manifest_path = work / "synth" / "manifest.csv"
    if not manifest_path.is_file():
        generate(preset["synth"], work / "synth")
    manifest = read_manifest(manifest_path)
    paths = {"manifest": manifest_path, "features": work / "features.zarr"}
    summaries = [extract_features(manifest, paths["features"], FEATURES, workers=workers)]
    for name in sorted(stores):
        paths[name] = work / f"tracks-{name}.zarr"
        config = tracks_config(preset, name)
        summaries.append(extract_tracks(manifest, paths[name], config, workers=workers))
    for summary in summaries:
        if summary.failures:
            raise RuntimeError(f"extraction failed: {summary.failures[:3]}")
        if summary.units_elsewhere:  # another benchmark process is still extracting them
            raise RuntimeError(f"units {summary.units_elsewhere} are held elsewhere: rerun later")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=DEFAULT_ROWS)
    parser.add_argument("--work", type=Path, default=None, help="stores and runs go here")
    parser.add_argument("--out", type=Path, default=None, help="the JSON result")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--workers", type=int, default=2, help="decoding / loading processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="where training runs: auto, cpu, cuda")
    parser.add_argument(
        "--keep-other-rows",
        action="store_true",
        help="keep the other rows of an existing --out of this preset",
    )
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    work = args.work or Path("benchmarks/work") / f"motion-{args.preset}"
    out = args.out or Path("benchmarks/results") / f"motion-{args.preset}.json"

    started = tic = time.perf_counter()
    stores = {ROWS[row][0] for row in args.rows}
    paths = build_stores(work, preset, stores, args.workers)
    build_seconds = time.perf_counter() - tic
    results = []
    for shot in args.shots:
        for row in args.rows:
            store, options = ROWS[row]
            name = row.replace(" ", "-").replace(",", "")
            run_dir = work / "runs" / f"{name}-{shot}shot-seed{args.seed}"
            config = config_from_dict({
                "tracks": str(paths[store]), "features": str(paths["features"]),
                "manifest": str(paths["manifest"]), "out": str(run_dir), "way": 5, "shot": shot,
                "seed": args.seed, "workers": args.workers, "device": args.device,
                "resume": True, **preset["train"], **options,
            })  # fmt: skip
            tic = time.perf_counter()
            run = train(config)
            results.append({
                "row": row, "tracks": store, "options": options, "shot": shot, "way": 5,
                "test_accuracy": run.test.accuracy, "test_ci95": run.test.ci95,
                "test_episodes": run.test.episodes, "best_epoch": run.best_epoch,
                "best_val_accuracy": run.best_val_accuracy,
                "final_train_accuracy": run.history[-1]["train_accuracy"],
                "train_seconds": round(sum(epoch["seconds"] for epoch in run.history), 1),
                "wall_seconds": round(time.perf_counter() - tic, 1), "run": str(run_dir),
                "measured": time.strftime("%Y-%m-%d"),
            })  # fmt: skip
    kept = []
    if args.keep_other_rows and out.is_file():
        earlier = json.loads(out.read_text())
        if earlier["preset"] != args.preset:
            raise SystemExit(f"{out} holds preset {earlier['preset']}, not {args.preset}")
        kept = [r for r in earlier["results"] if r["row"] not in args.rows]
    shown = [r for r in ROWS if r in args.rows or any(k["row"] == r for k in kept)]
    report = {
        "benchmark": "motion",
        "preset": args.preset,
        "synth": asdict(preset["synth"]),
        "tracks": {name: asdict(tracks_config(preset, name)) for name in sorted(stores)},
        "features": {"backbone": FEATURES.backbone, "views": FEATURES.views},
        "train": preset["train"],
        "seed": args.seed,
        "build_seconds": round(build_seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "results": sorted(kept + results, key=lambda r: (r["shot"], list(ROWS).index(r["row"]))),
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print("\n| model | 5-way 1-shot | 5-way 5-shot |\n|---|---|---|")
    for row in shown:
        cells = []
        for shot in (1, 5):
            r = next((r for r in report["results"] if r["row"] == row and r["shot"] == shot), None)
            cells.append("-" if r is None else f"{r['test_accuracy']:.1f} +- {r['test_ci95']:.1f}")
        print(f"| {row} | {' | '.join(cells)} |")
    print(f"\nwrote {out} ({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
