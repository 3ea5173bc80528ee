"""The fixes of the releases as switches (tats/fixes.py): one registry, the docs' table, and for
each fix a test that turning it off changes what it names and nothing else."""

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tats.evaluate import evaluation_options
from tats.fewshot import hausdorff_scores
from tats.fixes import (
    FIX_NAMES,
    FIXES,
    TRACKS_FIXES,
    describe_fixes,
    fixes_table,
    not_switches_table,
    parse_fixes,
)
from tats.methods import TRAIN_KEYS, with_method
from tats.model import ModelConfig, TATsModel, orientation_histograms
from tats.pipeline.semantic import semantic_queries
from tats.pipeline.tracks import TracksConfig, tracks_row
from tats.runtime import amp_modes, inference_amp
from tats.train import draw_rank, param_groups
from tats.train_config import TrainConfig, config_from_dict

FAITHFUL = Path(__file__).resolve().parents[1] / "docs" / "faithful.md"
PATHS = dict(tracks="t", features="f", manifest="m", out="o")


def without(name: str) -> tuple[str, ...]:
    return tuple(f for f in FIX_NAMES if f != name)


def test_the_docs_hold_the_registry():
    text = FAITHFUL.read_text()
    assert fixes_table() in text, "docs/faithful.md: paste tats.fixes.fixes_table() in"
    assert not_switches_table() in text, "docs/faithful.md: paste not_switches_table() in"
    assert len(set(FIX_NAMES)) == len(FIXES)


def test_fixes_parse_by_name():
    assert parse_fixes("all") == parse_fixes(None) == FIX_NAMES
    assert parse_fixes("none") == parse_fixes("") == ()
    assert parse_fixes("hod-shares, hod-order") == ("hod-order", "hod-shares")  # registry order
    assert parse_fixes(["bf16"]) == ("bf16",)
    with pytest.raises(ValueError, match="unknown fix 'hod'; fixes: all, none, or some of"):
        parse_fixes("hod")
    assert describe_fixes(FIX_NAMES) == "all" and describe_fixes(()) == "none"
    with pytest.raises(ValueError, match="unknown fix"):
        TrainConfig(**PATHS, fixes="nope")


# ---------------------------------------------------------------------------------------------
# model


def motion_model(fixes, seed=0, motion="both") -> TATsModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(feature_dim=16, num_heads=2, num_frames=4, grid_size=4, motion=motion,
                      num_points=6, hod_bins=8, fixes=fixes)  # fmt: skip
    return TATsModel(cfg)


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 4, 4, 4, 16, generator=g)
    positions = torch.rand(2, 4, 6, 2, generator=g) * 2 - 1
    mask = torch.ones(2, 4, 6, dtype=torch.bool)
    visible = torch.rand(2, 4, 6, generator=g) > 0.2
    return features, positions, mask, visible


def test_hod_order_rotates_the_histogram_by_half_a_turn():
    positions = torch.rand(3, 5, 7, 2) * 2 - 1
    tats = orientation_histograms(positions, 8)
    release = orientation_histograms(positions, 8, release_order=True)
    assert torch.allclose(release, tats.roll(4, dims=-1), atol=1e-5)
    # A step to the right: tats' bin 0, the release's bin 4 (bin 0 points left there).
    step = torch.tensor([[[0.0, 0.0]], [[0.5, 0.0]]])
    assert orientation_histograms(step, 8)[1, 0].argmax() == 0
    assert orientation_histograms(step, 8, release_order=True)[1, 0].argmax() == 4
    # In the model: only the HoD embedding's input changes; without HoD nothing does.
    for motion, differs in (("both", True), ("offsets", False)):
        a, b = motion_model(FIX_NAMES, motion=motion), motion_model(without("hod-order"),
                                                                      motion=motion)
        pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
        assert all(torch.equal(x, y) for x, y in pairs)
        a.eval(), b.eval()
        ta, tb = a(*inputs())[0], b(*inputs())[0]
        assert (not torch.allclose(ta, tb)) == differs


def test_hod_shares_give_the_nearer_bin_the_smaller_share():
    # An angle a quarter of a bin past bin 0's centre (8 bins: 45 degrees each).
    angle = math.radians(45 / 4)
    step = torch.tensor([[[0.0, 0.0]], [[math.cos(angle), math.sin(angle)]]])
    tats = orientation_histograms(step, 8)[1, 0]
    release = orientation_histograms(step, 8, release_shares=True)[1, 0]
    assert tats[:2].tolist() == pytest.approx([0.75, 0.25], abs=1e-5)
    assert release[:2].tolist() == pytest.approx([0.25, 0.75], abs=1e-5)
    assert tats.sum() == pytest.approx(release.sum())  # the same length, split otherwise
    positions = torch.rand(3, 5, 7, 2) * 2 - 1  # the order alone is untouched by the shares
    order_only = orientation_histograms(positions, 8, release_order=True)
    both = orientation_histograms(positions, 8, release_order=True, release_shares=True)
    assert torch.allclose(order_only.sum(-1), both.sum(-1), atol=1e-5)


def test_motion_init_leaves_the_motion_layers_at_pytorchs_defaults():
    fixed, release = motion_model(FIX_NAMES), motion_model(without("motion-init"))
    motion = ("hod_embed.", "offsets_embed.")
    for (name, a), (_, b) in zip(fixed.named_parameters(), release.named_parameters(),
                                 strict=True):  # fmt: skip
        if name.startswith(motion) and name.endswith((".fc1.weight", ".fc2.weight", ".bias")):
            if "norm" not in name:
                assert not torch.equal(a, b), name
        elif not name.startswith(motion):
            assert torch.equal(a, b), name  # everything else initialised alike
    # PyTorch's default Linear init: uniform within 1/sqrt(fan_in); the fix: std 0.02, zero bias.
    fc1 = release.hod_embed.fc1
    assert fc1.bias.abs().max() > 0 and fc1.weight.abs().max() <= 1 / math.sqrt(8) + 1e-6
    assert float(fixed.hod_embed.fc1.bias.detach().abs().max()) == 0.0


def spared(model, fixes) -> set[str]:
    decay, no_decay = param_groups(model, 0.5, fixes)
    ids = {id(p) for p in no_decay["params"]}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def test_embed_decay_spares_the_position_embeddings_only():
    model = motion_model(FIX_NAMES)
    assert spared(model, FIX_NAMES) - spared(model, without("embed-decay")) == {
        "space_pos_embed", "time_pos_embed",
    }  # fmt: skip
    assert "cls_token" in spared(model, ())  # the release spares the CLS token too


def test_motion_decay_spares_the_motion_biases_and_norms_only():
    model = motion_model(FIX_NAMES)
    moved = spared(model, FIX_NAMES) - spared(model, without("motion-decay"))
    assert moved == {f"{e}.{layer}" for e in ("hod_embed", "offsets_embed")
                     for layer in ("fc1.bias", "fc2.bias", "norm.weight", "norm.bias")}  # fmt: skip
    assert spared(model, ()) == {"cls_token"}  # the release: only the CLS token


# ---------------------------------------------------------------------------------------------
# training and evaluation


def test_trokens_mask_is_the_release_mask_of_every_point():
    fixed = with_method({"method": "trokens"}, TRAIN_KEYS)
    release = with_method({"method": "trokens", "fixes": without("trokens-mask")}, TRAIN_KEYS)
    assert fixed == {"mask": "visible", "cluster_sampling": True, "motion": "both"}
    assert release == {"mask": "all", "cluster_sampling": True, "motion": "both",
                       "fixes": without("trokens-mask")}  # fmt: skip
    tats = with_method({"method": "tats", "fixes": ()}, TRAIN_KEYS)
    assert tats["mask"] == "query"  # TATs' release reads its query frames: its mask stands
    explicit = with_method({"method": "trokens", "fixes": (), "mask": "visible"}, TRAIN_KEYS)
    assert explicit["mask"] == "visible"  # an option given wins


def test_rank_episodes_draws_the_same_episodes_on_every_rank_without_it():
    assert [draw_rank(FIX_NAMES, r) for r in range(3)] == [0, 1, 2]
    assert [draw_rank(without("rank-episodes"), r) for r in range(3)] == [0, 0, 0]


def test_bf16_fix_is_what_auto_precision_means():
    assert amp_modes("auto", "cpu", FIX_NAMES) == ("auto", "auto")
    assert amp_modes("auto", "cpu", without("bf16")) == ("off", "off")  # fp16 needs CUDA
    assert amp_modes("bf16", "cpu", ()) == ("bf16", "bf16")  # a mode given stands
    assert amp_modes("off", "cpu", ()) == ("off", "off")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_fix_off_is_fp16_training_and_fp32_evaluation_on_cuda():
    assert amp_modes("auto", "cuda", without("bf16")) == ("fp16", "off")


def test_evaluate_and_predict_run_a_checkpoint_as_its_evaluation_did(monkeypatch):
    """`inference_amp` (tats evaluate, tats predict) takes the checkpoint's evaluation mode:
    without the fix "bf16", `auto` is the releases' fp32 on CUDA, as in training's validation."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # resolves "cuda" only
    assert inference_amp({"amp": "auto", "fixes": list(without("bf16"))}, "cuda") == "off"
    assert inference_amp({"amp": "auto", "fixes": list(FIX_NAMES)}, "cuda") == "auto"
    assert inference_amp({"amp": "auto"}, "cuda") == "auto"  # saved before fixes: all on
    assert inference_amp({"amp": "fp16", "fixes": []}, "cpu") == "off"  # fp16 needs CUDA


def test_metric_fp32_computes_the_distances_in_float32_under_autocast():
    g = torch.Generator().manual_seed(0)
    support, queries = torch.randn(6, 4, 5, 32, generator=g), torch.randn(3, 4, 5, 32, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    exact = hausdorff_scores(support, labels, queries, 3, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fixed = hausdorff_scores(support, labels, queries, 3, 2)
        release = hausdorff_scores(support, labels, queries, 3, 2, full_precision=False)
    assert torch.equal(fixed, exact)
    assert not torch.equal(release, exact)
    assert torch.allclose(release.float(), exact, atol=0.1)  # the same scores, rounded


def test_eval_subset_fix_off_draws_clusters_at_every_read():
    config = TrainConfig(**PATHS, cluster_sampling=True, mask="visible").to_dict()
    fixed = evaluation_options(config)
    release = evaluation_options({**config, "fixes": list(without("eval-subset"))})
    assert not fixed.cluster_sampling and fixed.per_clip  # the stored subset: embedded once
    assert release.cluster_sampling and not release.per_clip  # a draw per read and episode
    assert replace(release, cluster_sampling=False) == fixed  # nothing else
    tats = TrainConfig(**PATHS).to_dict()  # no cluster sampling: the switch changes nothing
    assert evaluation_options({**tats, "fixes": []}) == evaluation_options(tats)


# ---------------------------------------------------------------------------------------------
# tracks


def test_query_frame_fix_off_takes_the_frame_of_the_peak_frames_position():
    # Three clustering frames (clip frames 0, 10, 20); cluster 0 peaks at frame 2, cluster 1 at
    # frame 1: the release numbers the distinct peak frames (1, 2) as clustering frames 0, 1.
    labels = np.full((3, 4, 4), -1)
    labels[2, :, :2] = 0
    labels[1, :, 2:] = 1
    labels[0, 0, 0] = 0
    labels[2, 0, 3] = 1
    frame_ids = np.array([0, 10, 20])
    q_fixed, c_fixed = semantic_queries(labels, frame_ids, 32, 32, 3)
    q_release, c_release = semantic_queries(labels, frame_ids, 32, 32, 3, True)
    assert np.array_equal(c_fixed, c_release)
    assert np.array_equal(q_fixed[:, 1:], q_release[:, 1:])  # the same points
    assert sorted(set(zip(c_fixed, q_fixed[:, 0], strict=True))) == [(0, 20.0), (1, 10.0)]
    assert sorted(set(zip(c_release, q_release[:, 0], strict=True))) == [(0, 10.0), (1, 0.0)]
    assert TracksConfig(fixes=FIX_NAMES).fixes is None  # all on: as stores made before
    assert TracksConfig(fixes=()).fixes == ()
    assert TracksConfig(fixes=without("query-frame")).fixes == ("frame-visibility",)
    assert set(TRACKS_FIXES) == {"query-frame", "frame-visibility"}


def test_frame_visibility_fix_off_keeps_the_trackers_visibility_outside_the_frame():
    t, h, w = 8, 32, 32
    tracks = np.zeros((t, 3, 2), np.float32)
    tracks[:, 0] = (5, 5)
    tracks[:, 1] = (40, 5)  # outside the frame, the tracker says visible
    tracks[:, 2] = (20, 20)
    visible = np.ones((t, 3), bool)
    query = np.zeros(3, np.int32)
    config = TracksConfig(tracker="lk", grid=2, subset=3, frames=4)
    fixed = tracks_row(tracks, visible, query, (t, h, w), config, "v")
    release = tracks_row(tracks, visible, query, (t, h, w), replace(config, fixes=()), "v")
    assert not fixed["visible"][:, 1].any() and release["visible"][:, 1].all()
    assert np.array_equal(np.delete(fixed["visible"], 1, 1), np.delete(release["visible"], 1, 1))
    for key in fixed:
        if key != "visible":
            assert np.array_equal(fixed[key], release[key]), key


def test_trainer_config_records_the_fixes_and_old_runs_read_as_all():
    from tats.train import ADDED_SINCE

    assert ADDED_SINCE["fixes"] == list(FIX_NAMES) and ADDED_SINCE["protocol"] == "clean"
    cfg = config_from_dict({**PATHS, "fixes": "none", "protocol": "release"})
    assert cfg.to_dict()["fixes"] == [] and cfg.val_episodes == cfg.test_episodes // 5
    assert (cfg.val_split, cfg.eval_period, cfg.test_checkpoint) == ("test", 5, "last")
    clean = config_from_dict(dict(PATHS))
    assert (clean.val_split, clean.eval_period, clean.test_checkpoint) == ("val", 1, "best")
    assert clean.val_episodes == 1000 and clean.fixes == FIX_NAMES
