"""The CUDA paths: CoTracker3 and DINOv2 features in bf16 against fp32, the out-of-memory
fall-back to online windows, training with AMP and pinned memory, resume after a kill, and DDP
over nccl.

benchmarks/gpu_check.sh runs these on a GPU machine (`pytest -m cuda` selects them); without
CUDA each skips, naming the reason. Weights are random, of the real architectures at their
real sizes; the tolerances below were set from bf16 against fp32 on the CPU (stated at each).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from stage_helpers import arrays
from test_backbones import official_state_dict, random_vit
from test_cotracker3 import random_state, synth_clip
from test_train import SMALL, config, kill_mid_epoch_2, stores_options

from tats.checkpoints import load_checkpoint
from tats.manifest import read_manifest
from tats.model import ModelConfig, TATsModel
from tats.pipeline import queries as Q
from tats.pipeline import semantic as S
from tats.pipeline.backbones import create_backbone
from tats.pipeline.features import FeaturesConfig, extract_features
from tats.pipeline.trackers import create_tracker
from tats.runtime import Runtime
from tats.stores import RowStore
from tats.synth import SynthConfig, generate
from tats.train import train

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason=f"needs a CUDA device; torch {torch.__version__} sees none",
    ),
]
# tats-train as a process, from wherever tats is importable (the GPU check has no entry points)
TATS_TRAIN = [sys.executable, "-c", "from tats.cli.train import app; app()"]


@pytest.fixture(scope="module")
def cotracker_weights(tmp_path_factory) -> dict:
    """Random CoTracker3 weights, flow and visibility heads at std 0.01 (tracks move)."""
    folder = tmp_path_factory.mktemp("cotracker3_cuda")
    paths = {}
    for seed, kind in enumerate(("offline", "online")):
        paths[kind] = folder / f"{kind}.pth"
        torch.save(random_state(kind, seed), paths[kind])
    return paths


def tats_queries(frames: np.ndarray) -> np.ndarray:
    """The TATs queries: a 16 x 16 grid at each of the 7 query frames of `uniform:8`."""
    t, h, w = frames.shape[:3]
    return Q.make_queries(Q.QueryStrategy.parse("uniform:8"), 16, t, h, w)


# ------------------------------------------------------------------ CoTracker3


@pytest.mark.parametrize("name, kind", [("cotracker3", "offline"), ("cotracker3-online", "online")])
def test_cotracker3_bf16_stays_close_to_fp32(cotracker_weights, name, kind):
    # bf16 against fp32 on the CPU, 448 points of such a clip: offline 0.03 px mean, 0.08 px
    # 99th percentile, 0.12 px at most; online 0.09 / 0.16 / 0.22 px; visibility and the
    # redundancy filter agreed everywhere. Allowed here, on the GPU (whose fp32 convolutions
    # run in TF32): 0.5 px mean, 1.5 px 99th percentile, 4 px at most, 98% agreement.
    frames = synth_clip(frames=24, width=320, height=240)
    queries = tats_queries(frames)
    qf = queries[:, 0].astype(int)
    auto = create_tracker(name, checkpoint=cotracker_weights[kind], device="cuda")
    assert auto.precision == "bf16" and "precision=bf16" in auto.identity.mode
    bf16 = auto.track(frames, queries)
    fp32 = create_tracker(
        name, checkpoint=cotracker_weights[kind], device="cuda", precision="fp32"
    ).track(frames, queries)

    used = np.arange(len(frames))[:, None] >= qf[None]  # the frames TATs reads
    distance = np.linalg.norm(bf16[0] - fp32[0], axis=-1)[used]
    moved = np.linalg.norm(fp32[0] - queries[None, :, 1:], axis=-1)[used]
    assert moved.mean() > 1.0, "random heads at std 0.01 move the points: the check is not empty"
    stats = (distance.mean(), np.percentile(distance, 99), distance.max())
    assert stats[0] < 0.5 and stats[1] < 1.5 and stats[2] < 4.0, stats
    visible = [Q.hide_before_query(v, qf) for v in (bf16[1], fp32[1])]
    assert (visible[0] == visible[1])[used].mean() >= 0.98
    keep = [
        Q.filter_redundant(t, v, qf, 16.0) for t, v in zip((bf16[0], fp32[0]), visible, strict=True)
    ]
    assert (keep[0] == keep[1]).mean() >= 0.98


def test_out_of_memory_falls_back_to_online_windows(cotracker_weights):
    # A 160-frame clip offline needs several times the memory of 16-frame windows. Capped at
    # 1.5 times what the windows need, the offline pass runs out of memory and the clip must
    # come out of the online windows instead, as the online tracker gives it.
    frames = synth_clip(frames=160, width=320, height=240)
    queries = tats_queries(frames)
    tracker = create_tracker(
        "cotracker3", checkpoint=cotracker_weights["offline"],
        online_checkpoint=cotracker_weights["online"], device="cuda",
    )  # fmt: skip
    online = create_tracker("cotracker3-online", checkpoint=cotracker_weights["online"],
                            device="cuda")  # fmt: skip
    assert tracker.mode_for(len(frames)) == "offline"

    def reserved_for(which) -> tuple[tuple, int]:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        out = which.track(frames, queries)
        return out, torch.cuda.max_memory_reserved()

    expected, windows_need = reserved_for(online)
    _, offline_need = reserved_for(tracker)
    assert offline_need > 3 * windows_need, (offline_need, windows_need)
    total = torch.cuda.get_device_properties(0).total_memory
    ooms = torch.cuda.memory_stats().get("num_ooms", 0)
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1.5 * windows_need / total)
    try:
        tracks, visible = tracker.track(frames, queries)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert torch.cuda.memory_stats().get("num_ooms", 0) > ooms, "the offline pass did not fail"
    np.testing.assert_allclose(tracks, expected[0], atol=1e-3)
    assert (visible != expected[1]).mean() <= 1e-3


# ------------------------------------------------------------------ features


def test_features_stage_in_bf16_matches_fp32(tmp_path):
    # ViT-B/14 with random weights that all matter (layer scales 0.5..1): bf16 autocast against
    # fp32 on the CPU differed by 0.4% (relative L2) with every patch's cosine above 0.9999.
    # Allowed here: 2%, cosine above 0.999 (the stores hold float16). Two views: the augmented
    # one too. The GPU run decodes in 2 worker processes and pins the frames.
    weights = tmp_path / "dinov2_vitb14.pth"
    torch.save(official_state_dict(random_vit("vit_base_patch14_dinov2", 518)), weights)
    synth = SynthConfig(classes=3, videos_per_class=1, frames=16, width=160, height=120)
    manifest = read_manifest(generate(synth, tmp_path / "synth", progress=False))
    config = FeaturesConfig(backbone="dinov2_vitb14", views=2, shard_size=2)
    stores = {}
    for device, workers in (("cuda", 2), ("cpu", 0)):
        out = tmp_path / f"{device}.zarr"
        summary = extract_features(manifest, out, config, weights=weights, device=device,
                                   workers=workers, progress=False)  # fmt: skip
        assert summary.videos_done == 3 and not summary.failures, summary.failures
        stores[device] = arrays(out)
        precision = RowStore.open(out).provenance["backbone"]["precision"]
        assert precision == {"cuda": "bf16", "cpu": "fp32"}[device]
    gpu = torch.from_numpy(stores["cuda"]["features"].astype(np.float32))
    cpu = torch.from_numpy(stores["cpu"]["features"].astype(np.float32))
    assert gpu.shape == cpu.shape == (3, 2, 8, 16, 16, 768)
    written = cpu.norm(dim=-1) > 0  # val and test clips have view 0 only
    assert torch.equal(gpu.norm(dim=-1) > 0, written) and written[:, 1].any()
    assert (gpu - cpu).norm() / cpu.norm() < 0.02
    cosine = torch.nn.functional.cosine_similarity(gpu[written], cpu[written], dim=-1)
    assert cosine.min() > 0.999
    np.testing.assert_array_equal(stores["cuda"]["view_seed"], stores["cpu"]["view_seed"])

    backbone = create_backbone("dinov2_vitb14", weights=weights, device="cuda")
    conv = backbone.model.patch_embed.proj.weight
    assert conv.is_cuda and conv.is_contiguous(memory_format=torch.channels_last)


def test_the_clustering_backbone_stays_fp32_on_cuda(tmp_path):
    # Trokens clusters fp32 features (`point_tracking/feat_extractor.py`): on CUDA the
    # clustering backbone does not enter the features stage's bf16 autocast, and says so.
    # Against fp32 on the CPU it must be much closer than the bf16 backbone (0.4% above).
    weights = tmp_path / "dinov2_vitb14.pth"
    torch.save(official_state_dict(random_vit("vit_base_patch14_dinov2", 518)), weights)
    frames = np.random.default_rng(0).integers(0, 256, (4, 120, 160, 3), dtype=np.uint8)
    features = {}
    for device in ("cuda", "cpu"):
        backbone = S.clustering_backbone("dinov2_vitb14", str(weights), device)
        assert backbone.precision == backbone.identity["precision"] == "fp32"
        features[device] = backbone.encode([frames]).cpu()
    bf16 = create_backbone("dinov2_vitb14", weights=weights, device="cuda",
                           preprocess=S.PREPROCESS).encode([frames]).cpu()  # fmt: skip
    cpu = features["cpu"]
    assert (features["cuda"] - cpu).norm() < 0.5 * (bf16 - cpu).norm()


# ------------------------------------------------------------------ training


def test_one_epoch_with_amp_pinned_and_close_to_fp32(synth_stores, tmp_path):
    # The first epoch's mean loss (8 episodes, same initial weights and episodes) under bf16
    # and fp16 autocast against fp32, on the GPU: within 5%.
    runs = {}
    for amp in ("off", "auto", "fp16"):
        result = train(config(synth_stores, tmp_path / amp, amp=amp, device="cuda", workers=2,
                              epochs=1, val_episodes=4, test_episodes=4))  # fmt: skip
        state = load_checkpoint(result.last_checkpoint)
        runs[amp] = (result.history[0], state)
        assert np.isfinite(result.history[0]["loss"])
        assert result.test is not None and result.test.episodes == 4
        weights = [v for v in state["model"].values() if v.is_floating_point()]
        assert all(v.dtype == torch.float32 for v in weights)  # autocast keeps fp32 weights
    precision = {amp: state["run"]["precision"] for amp, (_, state) in runs.items()}
    assert precision == {"off": "fp32", "auto": "bfloat16", "fp16": "float16"}
    assert runs["fp16"][1]["scaler"]["scale"] > 0  # the gradient scaler ran
    reference = runs["off"][0]
    for amp in ("auto", "fp16"):
        record = runs[amp][0]
        assert record["episode_digests"] == reference["episode_digests"]
        assert abs(record["loss"] - reference["loss"]) < 0.05 * reference["loss"], (amp, record)

    rt = Runtime.setup("cuda", "auto", workers=2, prefetch=2)
    assert rt.device.type == "cuda" and rt.amp_dtype == torch.bfloat16
    assert rt.loader(list(range(4)), batch_size=2).pin_memory


def flat_weights(model: dict) -> torch.Tensor:
    return torch.cat([v.detach().float().flatten().cpu() for v in model.values()])


def test_resume_after_a_kill_on_cuda_reaches_the_uninterrupted_run(synth_stores, tmp_path):
    # On the GPU the backward of grid_sample adds with atomics, so two uninterrupted runs
    # already differ by rounding. The resumed run must train on the same episodes at the same
    # learning rates and end as close to the uninterrupted run as a second uninterrupted run
    # is (10x), or within 1% of the distance training moved the weights.
    options = dict(episodes=10, epochs=3, depth=2, lr_steps=[2], test_episodes=0, log_every=2,
                   device="cuda", workers=1)  # fmt: skip
    straight = train(config(synth_stores, tmp_path / "straight", **options))
    again = train(config(synth_stores, tmp_path / "again", **options))

    killed = tmp_path / "killed"
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps({**SMALL, **options, **stores_options(synth_stores, killed)}))
    kill_mid_epoch_2(TATS_TRAIN, config_file)
    assert load_checkpoint(killed / "checkpoints" / "last.pt")["epoch"] == 1
    resumed = train(config(synth_stores, killed, resume=True, **options))

    a, b, r = (load_checkpoint(x.last_checkpoint) for x in (straight, again, resumed))
    assert r["epoch"] == 3 and r["run"]["precision"] == "bfloat16"
    same = ("episode_digests", "lr")
    assert [{k: e[k] for k in same} for e in resumed.history] == [
        {k: e[k] for k in same} for e in straight.history
    ]
    for ra, rr in zip(straight.history, resumed.history, strict=True):
        assert abs(ra["loss"] - rr["loss"]) < 0.02 * ra["loss"], (ra, rr)
    torch.manual_seed(0)  # the runs' seed: their initial weights
    start = flat_weights(TATsModel(ModelConfig(**a["model_config"])).state_dict())
    moved = (flat_weights(a["model"]) - start).norm()
    noise = (flat_weights(a["model"]) - flat_weights(b["model"])).norm()
    off = (flat_weights(a["model"]) - flat_weights(r["model"])).norm()
    assert off <= max(10 * noise, 0.01 * moved), (off, noise, moved)


# ------------------------------------------------------------------ DDP


@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.device_count() < 2,
    reason=f"two-rank DDP over nccl needs 2 GPUs; this machine has {torch.cuda.device_count()}",
)
def test_torchrun_two_ranks_over_nccl(synth_stores, tmp_path):
    out = tmp_path / "run"
    options = dict(**stores_options(synth_stores, out), way=3, shot=1, train_queries=2,
                   episodes=6, epochs=2, val_episodes=6, test_episodes=10, width=16, heads=2,
                   lr=1e-3, warmup_epochs=0, workers=1, log_every=3, seed=5)  # fmt: skip
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps(options))
    launcher = tmp_path / "tats_train.py"
    launcher.write_text("from tats.cli.train import app\n\napp()\n")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(launcher), "--train-config", str(config_file)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "NCCL_DEBUG": "INFO", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "on 2 x cuda" in proc.stdout and "NCCL INFO" in output
    metrics = json.loads((out / "metrics.json").read_text())
    for record in metrics["history"]:
        assert len(set(record["episode_digests"])) == 2  # each rank its own episodes
    test = metrics["test"]
    assert test["episodes"] == 10 and np.sum(test["confusion"]) == 10 * 3
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["run"]["world_size"] == 2 and state["run"]["precision"] == "bfloat16"
