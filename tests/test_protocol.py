"""The protocols around training (tats/fixes.py): `release` validates on the test split every 5
epochs and tests the last epoch, `clean` validates on val and tests the best; a recipe runs
`release` with every fix off, and `--fixes all --protocol clean` on top of it is tats' own
defaults."""

import dataclasses
import json

import pytest

from tats.chain import resolve_run
from tats.fixes import FIX_NAMES
from tats.recipes import load_recipe
from tats.train import train
from tats.train_config import config_from_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMALL = dict(
    way=3, shot=1, train_queries=2, episodes=4, width=16, heads=2, lr=1e-3, warmup_epochs=0,
    lr_steps=[], workers=0, log_every=4,
)  # fmt: skip


def stores(synth_stores, out) -> dict:
    return dict(tracks=str(synth_stores.tracks), features=str(synth_stores.features),
                manifest=str(synth_stores.manifest), out=str(out))  # fmt: skip


def test_release_protocol_validates_on_test_every_5_epochs_and_tests_the_last(
    synth_stores, tmp_path
):
    cfg = config_from_dict({**stores(synth_stores, tmp_path / "release"), **SMALL, "epochs": 6,
                            "protocol": "release", "test_episodes": 30})  # fmt: skip
    assert cfg.val_episodes == 6  # test_episodes // 5, the releases' count
    cfg = dataclasses.replace(cfg, val_episodes=30)  # the test's episodes, to compare below
    result = train(cfg)
    validated = [r["epoch"] for r in result.history if r["val_accuracy"] is not None]
    assert validated == [5, 6]  # every 5 epochs, and after the last
    assert result.test_checkpoint == "last"
    # Validation read the test split: the last epoch's validation is the test of last.pt (the
    # same episodes of the same split, the same weights).
    assert result.history[-1]["val_accuracy"] == result.test.accuracy
    metrics = json.loads((tmp_path / "release" / "metrics.json").read_text())
    assert metrics["test"]["checkpoint"] == "last"
    if result.best_epoch != 6:  # the best checkpoint is tested too, and reported beside
        assert metrics["other_test"]["checkpoint"] == "best"
        assert result.other_test is not None


def test_clean_protocol_validates_on_val_every_epoch_and_tests_the_best(synth_stores, tmp_path):
    out = tmp_path / "clean"
    cfg = config_from_dict({**stores(synth_stores, out), **SMALL, "epochs": 3,
                            "val_episodes": 30, "test_episodes": 30})  # fmt: skip
    result = train(cfg)
    assert all(r["val_accuracy"] is not None for r in result.history)
    assert result.test_checkpoint == "best"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["checkpoint"] == "best"
    assert ("other_test" in metrics) == (result.best_epoch != 3)
    # The val split, not test: validation of the last epoch is not the test of last.pt.
    release = train(dataclasses.replace(cfg, out=str(tmp_path / "as-release"),
                                        protocol="release"))  # fmt: skip
    assert release.history[-1]["val_accuracy"] == release.test.accuracy
    last = result.other_test if result.best_epoch != 3 else result.test
    assert result.history[-1]["val_accuracy"] != last.accuracy or result.best_epoch == 3


def tiny_recipe(tmp_path):
    """trokens/hmdb with a schedule small enough to train here, as a recipe file of its own."""
    text = load_recipe("trokens/hmdb").path.read_text()
    schedule = {"episodes": 4, "epochs": 2, "test_episodes": 30, "way": 3,
                "train_queries": 2}  # fmt: skip
    lines = []
    for line in text.splitlines():
        key = line.split("=")[0].strip()
        if key in schedule and not line.startswith(("[", "#")):
            line = f"{key} = {schedule[key]}"
        lines.append(line)
    path = tmp_path / "tiny.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_recipe_runs_the_release_and_all_fixes_with_clean_are_tats_defaults(
    semantic_stores, tmp_path
):
    recipe = tiny_recipe(tmp_path)
    small = {"width": 16, "heads": 2, "workers": 0}
    # A recipe alone: the release protocol (its seed, test episodes // 5) and no fix.
    release = resolve_run("m.csv", tmp_path / "a", recipe=recipe, train=small)
    assert release.train.protocol == "release" and release.train.fixes == ()
    assert (release.train.seed, release.train.val_episodes) == (1, 6)
    assert release.tracks.fixes == () and release.train.mask == "all"
    # With every fix and the clean protocol: what tats runs without a recipe, given the same
    # values as options.
    fixed = resolve_run("m.csv", tmp_path / "b", recipe=recipe, train=small, fixes="all",
                        protocol="clean")  # fmt: skip
    chosen = load_recipe(recipe)
    plain = resolve_run(
        "m.csv", tmp_path / "b", method=chosen.method, tracks=chosen.tracks_options(),
        features=chosen.features_options(), train={**chosen.train, **small},
    )  # fmt: skip
    assert fixed.train.fixes == FIX_NAMES and fixed.train.protocol == "clean"
    assert (fixed.train.seed, fixed.train.val_episodes, fixed.train.mask) == (0, 1000, "visible")
    assert fixed.train == plain.train
    assert fixed.tracks == plain.tracks
    assert fixed.features == plain.features
    # And on the same data they train to the same result.
    paths = stores(semantic_stores, tmp_path / "run-recipe")
    runs = []
    for config, name in ((fixed.train, "recipe"), (plain.train, "plain")):
        config = dataclasses.replace(config, **{**paths, "out": str(tmp_path / name)},
                                     val_episodes=12)  # fmt: skip
        runs.append(train(config))
    assert runs[0].test.accuracy == runs[1].test.accuracy
    assert runs[0].history[-1]["loss"] == runs[1].history[-1]["loss"]
