"""Training throughput: episodes per second and the share of step time spent waiting for data.

    .venv/bin/python benchmarks/bench_train.py [--quick] [--device cpu] [--workers 4]

Two data paths feed the same default TATs model (DINOv2 ViT-B/14 width, 768) the same 5-way
1-shot episodes with 6 queries per class:

- stores: `tats-train` itself, reading patch grids and tracks from the Zarr stores;
- original: the original release's path, decoding the 8 stored frames of every clip from its
  video in the DataLoader workers and running the frozen ViT-B/14 backbone in each step.

The backbone has random weights of the real architecture (speed does not depend on them), and
the features store is made by `tats-extract features` with that backbone. Stores, videos and
weights are built once under --work. Writes benchmarks/results/train[-quick].json; time it on
an idle machine. On 2 busy CPU cores one step of the default model took about 70 s and the
backbone about 6 s per clip, so even --quick takes about half an hour there.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import timm
import torch
from torch.utils.data import Dataset

from tats.episodes import EpisodeData, EpisodeDataset, EpisodeKeys, EpisodeSpec, ReadOptions
from tats.manifest import read_manifest
from tats.model import ModelConfig, TATsModel
from tats.pipeline.backbones import create_backbone
from tats.pipeline.features import FeaturesConfig, extract_features
from tats.pipeline.tracks import TracksConfig, extract_tracks
from tats.runtime import Runtime
from tats.synth import SynthConfig, generate
from tats.train import param_groups, train, train_epoch
from tats.train_config import TrainConfig
from tats.video import probe, read_frames, timeline

BACKBONE = "dinov2_vitb14"
# Episodes per epoch of each path; two epochs each, the second is reported (the first includes
# starting the workers). 10 classes split 5 train / 2 val / 3 test: 5-way 1-shot, 6 queries.
PRESETS = {
    "full": {"synth": SynthConfig(classes=10, videos_per_class=8), "stores": 8, "original": 2},
    "quick": {"synth": SynthConfig(classes=10, videos_per_class=7, frames=16), "stores": 2,
              "original": 1},
}  # fmt: skip


def build(work: Path, synth: SynthConfig, device: str, workers: int) -> tuple[Path, Path, Path]:
    """Videos, tracks (LK, 16 x 16 grids, 256-point subsets), random ViT-B/14 weights and the
    features store, each skipped where already built."""
    manifest_path = work / "synth" / "manifest.csv"
    if not manifest_path.is_file():
        generate(synth, work / "synth")
    weights = work / "dinov2_vitb14_random.pth"
    if not weights.is_file():
        torch.manual_seed(0)
        vit = timm.create_model(
            "vit_base_patch14_dinov2", pretrained=False, img_size=518, num_classes=0
        )
        torch.save(vit.state_dict(), weights)
    manifest = read_manifest(manifest_path)
    extract_tracks(manifest, work / "tracks.zarr", TracksConfig(tracker="lk"), workers=workers)
    extract_features(
        manifest, work / "features.zarr", FeaturesConfig(backbone=BACKBONE, views=1),
        weights=weights, device=device, workers=workers,
    )  # fmt: skip
    return manifest_path, work / "tracks.zarr", work / "features.zarr"


class VideoEpisodes(Dataset):
    """The original's clips: the same episodes and tracks, but the stored frames are decoded
    from each video instead of their patch grids being read from the features store."""

    def __init__(self, episodes: EpisodeDataset, manifest_path: Path):
        self.episodes, self.manifest_path = episodes, manifest_path
        self._videos = None

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        if self._videos is None:
            self._videos = read_manifest(self.manifest_path).rows
        episode = self.episodes.episode(*key)
        frames, positions, mask, visible = [], [], [], []
        for row, seed in zip(episode.rows.tolist(), episode.subset_seeds.tolist(), strict=True):
            video = self._videos[row]
            native = timeline(probe(video.path))
            frames.append(read_frames(video.path, native[self.episodes.frames[row]]))
            clip_positions, clip_mask, clip_visible = self.episodes.read_tracks(row, seed)
            positions.append(clip_positions)
            mask.append(clip_mask)
            visible.append(clip_visible)
        return {
            "features": torch.from_numpy(np.stack(frames)),  # uint8 [n, S, H, W, 3]
            "positions": torch.from_numpy(np.stack(positions)),
            "mask": torch.from_numpy(np.stack(mask)),
            "visible": torch.from_numpy(np.stack(visible)),
            "labels": torch.from_numpy(episode.labels),
            "classes": torch.from_numpy(episode.classes),
            "rows": torch.from_numpy(episode.rows),
        }


class OnlineBackbone(torch.nn.Module):
    """The frozen backbone inside the step, as in the original: frames -> patch grids -> TATs."""

    def __init__(self, backbone, model: TATsModel):
        super().__init__()
        self.backbone, self.model = backbone, model

    def forward(self, features, positions, mask, visible):
        """`features` are the clips' uint8 frames here, encoded in the step."""
        features = self.backbone(features).clone()  # out of inference mode, for autograd
        return self.model(features, positions, mask, visible)


def original_path(
    data: EpisodeData,
    manifest: Path,
    backbone,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    episodes: int,
) -> dict:
    """Two epochs of `episodes` steps through the original's data path (the first includes
    starting the workers)."""
    rt = Runtime.setup(cfg.device, cfg.amp, cfg.workers, cfg.prefetch)
    spec = EpisodeSpec(cfg.way, cfg.shot, cfg.train_queries)
    classes = data.classes("train", spec.per_class, spec.way)
    episodes_set = data.dataset("train", spec, ReadOptions(), cfg.seed, classes=classes)
    keys = EpisodeKeys(range(episodes))
    loader = rt.loader(VideoEpisodes(episodes_set, manifest), keys)
    torch.manual_seed(cfg.seed)
    model = TATsModel(model_cfg).to(rt.device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=False)
    net = OnlineBackbone(backbone, model)
    bench = TrainConfig(**{**cfg.to_dict(), "episodes": episodes, "log_every": 1})
    records = []
    for epoch in range(2):
        keys.set_epoch(epoch)
        records.append(
            train_epoch(net, loader, optimizer, scaler, bench, spec, epoch, rt, writer=None)
        )
    return summarize(records)


def summarize(records: list[dict]) -> dict:
    keep = ("episodes_per_second", "data_wait_share", "seconds")
    return {
        "episodes_per_second": records[-1]["episodes_per_second"],
        "data_wait_share": records[-1]["data_wait_share"],
        "epochs": [{k: r[k] for k in keep} for r in records],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer videos and episodes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    name = "quick" if args.quick else "full"
    preset = PRESETS[name]
    work = args.work or Path("benchmarks/work") / f"train-{name}"
    out = args.out or Path("benchmarks/results") / f"train{'-quick' if args.quick else ''}.json"
    manifest, tracks, features = build(work, preset["synth"], args.device, min(args.workers, 2))

    episodes = preset["stores"]
    cfg = TrainConfig(
        tracks=str(tracks), features=str(features), manifest=str(manifest),
        out=str(work / "run"), episodes=episodes, epochs=2, val_episodes=0, test_episodes=0,
        device=args.device, workers=args.workers, log_every=1,
    )  # fmt: skip
    shutil.rmtree(work / "run", ignore_errors=True)  # a fresh run each time
    tic = time.perf_counter()
    run = train(cfg)
    stores = summarize(run.history) | {"wall_seconds": round(time.perf_counter() - tic, 1)}
    data = EpisodeData.open(tracks, features, manifest)
    model_cfg = ModelConfig(num_classes=len(data.manifest.classes("train")))
    backbone = create_backbone(
        BACKBONE, weights=work / "dinov2_vitb14_random.pth", device=args.device
    )
    original = original_path(data, manifest, backbone, model_cfg, cfg, preset["original"])
    model = TATsModel(model_cfg)
    report = {
        "benchmark": "train",
        "preset": name,
        "episode": {"way": cfg.way, "shot": cfg.shot, "queries": cfg.train_queries,
                    "clips": cfg.way * (cfg.shot + cfg.train_queries)},
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "points": data.points, "frames": data.num_frames, "feature_dim": data.feature_dim,
        "device": args.device, "workers": args.workers,
        "stores_path": stores,
        "original_path": original,
        "speedup": stores["episodes_per_second"] / original["episodes_per_second"],
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda")
                    else None},
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    for path in ("stores_path", "original_path"):
        r = report[path]
        print(f"{path}: {r['episodes_per_second']:.3f} episodes/s, data wait "
              f"{100 * r['data_wait_share']:.1f}%")  # fmt: skip
    print(f"speed-up {report['speedup']:.1f}x; wrote {out}")


if __name__ == "__main__":
    main()
