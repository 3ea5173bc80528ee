"""Recipes: every value as the releases give it, every recipe resolvable, and a Trokens recipe
run end to end (the TATs one: tests/test_run.py)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import typer
from typer.testing import CliRunner

from tats.cli import app
from tats.recipes import RECIPES, list_recipes, load_recipe, recipe_names

TATS = str(Path(sys.executable).parent / "tats")
TATS_TRAIN = str(Path(sys.executable).parent / "tats-train")
README = Path(__file__).resolve().parents[1] / "README.md"
TINY = {  # a small model for the synthetic data, 3-way
    "width": 16, "heads": 2, "lr": 1e-3, "warmup_epochs": 0, "lr_steps": [], "train_queries": 2,
    "way": 3, "workers": 0,
}  # fmt: skip

# ---------------------------------------------------------------------------------------------
# The releases, value by value: (value, "repository file: key") for every value of every recipe.

T = "pulkitkumar95/tats"
K = "pulkitkumar95/trokens"
TATS_PAPER = (47.9, 64.4), (57.7, 74.6), (60.0, 77.0), (92.0, 95.5)  # small, full, hmdb, ucf
TROKENS_PAPER = (53.4, 68.9), (61.5, 76.7), (69.8, 82.3), (94.0, 97.9)
TATS_COMMIT = "c9436ea07ce8e17676c0c980dcae83e5a349bed2"
TROKENS_COMMIT = "860573d80082596f8b29ee64dd3dc3bc8d5a9e10"
TATS_NAME = ("Kumar et al., Trajectory-aligned Space-time Tokens for Few-shot Action Recognition, "
             "ECCV 2024 (arXiv:2407.18249)")  # fmt: skip
TROKENS_NAME = ("Kumar, Huang et al., Trokens: Semantic-Aware Relational Trajectory Tokens for "
                "Few-Shot Action Recognition, ICCV 2025 (arXiv:2508.03695)")  # fmt: skip
SECONDARY = (" (quoted from a secondary summary of the paper; not checked against the paper's "
             "table, whose text was not at hand)")  # fmt: skip


def paper_rows(name: str, paper, dataset: str) -> dict:
    """Where a recipe's accuracy comes from: the paper (figures quoted from a secondary summary),
    or missing: the paper reports it, tats has no figure."""
    if paper:
        return {
            "paper.where": (name + SECONDARY, "the paper, through a secondary summary"),
            "paper.shot_1": (paper[0], "the paper's 5-way 1-shot accuracy"),
            "paper.shot_5": (paper[1], "the paper's 5-way 5-shot accuracy"),
        }
    missing = (f"the paper reports {dataset}; tats has no figure for it yet (no summary at hand "
               "quoted it)")  # fmt: skip
    return {"paper.where": (name, "the paper"), "paper.missing": (missing, "no figure at hand")}


def tats(yaml, *, frames, episodes, split, paper=None, derived=False, trokens_yaml=None):
    """A TATs recipe: pulkitkumar95/tats `yaml` (derived: the nearest config, for a dataset the
    release has none for; `trokens_yaml`: the same authors' Trokens config of that dataset), its
    README.md's command, point_tracking/."""
    y = f"{K} {trokens_yaml}" if trokens_yaml else f"{T} {yaml}"
    m = f"{K} trokens/config/defaults.py" if trokens_yaml else y
    source = (K, TROKENS_COMMIT, trokens_yaml) if trokens_yaml else (T, TATS_COMMIT, yaml)
    derived_from = trokens_yaml if trokens_yaml else (yaml if derived else "")
    rows = {
        "method": ("tats", f"{T} README.md: Pointformer, {yaml} POINT_INFO.USE_PT_QUERY_MASK"),
        "dataset": (split[4], "the paper's dataset name"),
        "source.repository": (source[0], "the release"),
        "source.commit": (source[1], "the release's commit"),
        "source.config": (source[2], "the release's config"),
        "source.derived": (derived_from, "no TATs release config for this dataset"),
        "release.seed": (0, f"{T} configs/TaTs/*.yaml: RNG_SEED 0"),
        "split.importer": (split[0], f"{T} slowfast/datasets/: the few-shot split lists"),
        "split.lists": (split[1], "data_manifests/splits/"),
        "split.dataset": (split[2], f"{T} slowfast/datasets/"),
        "split.release": (split[3], f"{T} README.md SSV2.SPLIT / slowfast/datasets/*.py csv"),
        "time.frames": (frames, f"{y}: DATA.NUM_FRAMES"),
        "time.fps": (10.0, f"{T} point_tracking/vid_readers.py: get_vid_info max_fps=10"),
        "time.native_suffixes": ([".webm"], f"{T} point_tracking/vid_readers.py: read_webm_video"),
        "tracks.tracker": ("cotracker3", f"{T} point_tracking/README.md (CoTracker3 extractor)"),
        "paper_tracker.tracker": ("official", f"{T} README.md: POINT_INFO.NAME cotracker2_..."),
        "paper_tracker.options.model": ("cotracker2", f"{T} README.md: cotracker2_16_uniform_8"),
        "paper_tracker.options.passes": (
            "per_query_frame",
            f"{T} point_tracking/extract_points.py: grid_query_frame loop",
        ),
        "paper_tracker.options.support_grid": (
            False,
            f"{T} point_tracking/extract_points.py: grid_size only, no support grid",
        ),
        "tracks.queries": ("uniform:8", f"{T} README.md: POINT_INFO.NAME ..._uniform_8"),
        "tracks.grid": (16, f"{y}: POINT_INFO.GRID_SIZE"),
        "tracks.subset": (256, f"{y}: POINT_INFO.NUM_POINTS_TO_SAMPLE"),
        "features.backbone": ("dinov2_vitb14", f"{T} README.md: MODEL.DINO_CONFIG"),
        "features.views": (5, f"{T} README.md: DATA.USE_RAND_AUGMENT True"),
        "train.way": (5, f"{y}: FEW_SHOT.N_WAY"),
        "train.shot": (1, f"{y}: FEW_SHOT.K_SHOT"),
        "train.train_queries": (6, f"{y}: FEW_SHOT.TRAIN_QUERY_PER_CLASS"),
        "train.test_queries": (1, f"{y}: FEW_SHOT.TEST_QUERY_PER_CLASS"),
        "train.episodes": (episodes, f"{y}: FEW_SHOT.TRAIN_EPISODES"),
        "train.epochs": (50, f"{y}: SOLVER.MAX_EPOCH"),
        "train.test_episodes": (10000, f"{y}: FEW_SHOT.TEST_EPISODES"),
        "train.lr": (1e-4, f"{y}: SOLVER.BASE_LR"),
        "train.weight_decay": (0.5, f"{y}: SOLVER.WEIGHT_DECAY"),
        "train.warmup_epochs": (5, f"{y}: SOLVER.WARMUP_EPOCHS (the last given)"),
        "train.warmup_lr": (1e-6, f"{y}: SOLVER.WARMUP_START_LR"),
        "train.lr_steps": ([20, 40], f"{y}: SOLVER.STEPS [0, 20, 40]"),
        "train.lr_decay": (0.1, f"{y}: SOLVER.LRS [1, 0.1, 0.01]"),
        "train.depth": (1, f"{m}: MF.DEPTH"),
        "train.heads": (8, f"{m}: MF.NUM_HEADS"),
        "train.mlp_ratio": (4.0, f"{m}: MF.MLP_RATIO"),
        "train.drop_path": (0.2, f"{m}: MF.DROP_PATH"),
    }
    return rows | paper_rows(TATS_NAME, paper, split[4])


def trokens(name, *, episodes, split, paper=None):
    """A Trokens recipe: pulkitkumar95/trokens configs/trokens/<name>.yaml, with the overrides
    of scripts/trokens.sh, over trokens/config/defaults.py; point_tracking/."""
    y, s = f"{K} configs/trokens/{name}.yaml", f"{K} scripts/trokens.sh"
    d, p = f"{K} trokens/config/defaults.py", f"{K} point_tracking/new_point_tracking.py"
    rows = {
        "method": ("trokens", f"{s}: USE_CROSS_MOTION_MODULE, USE_HOD_MOTION_MODULE True"),
        "dataset": (split[4], "the paper's dataset name"),
        "source.repository": (K, "the release"),
        "source.commit": (TROKENS_COMMIT, "the release's commit"),
        "source.config": (f"configs/trokens/{name}.yaml", "the release's config"),
        "source.derived": ("", "every Trokens dataset has its release config"),
        "release.seed": (1, f"{d}: RNG_SEED (no config sets it)"),
        "split.importer": (split[0], f"{K} trokens/datasets/: the few-shot split lists"),
        "split.lists": (split[1], "data_manifests/splits/"),
        "split.dataset": (split[2], f"{K} trokens/datasets/"),
        "split.release": (split[3], f"{y} SSV2.SPLIT / trokens/datasets/*.py split file"),
        "time.frames": (8, f"{y}: DATA.NUM_FRAMES"),
        "time.fps": (10.0, f"{K} point_tracking/README.md: 10 fps but SSv2"),
        "time.native_suffixes": ([".webm"], f"{K} point_tracking/README.md: SSv2 at 12 fps"),
        "tracks.tracker": ("cotracker3", f"{s}: POINT_INFO.NAME cotracker3_bip_fr_32"),
        "tracks.queries": ("semantic", f"{s}: POINT_INFO.NAME cotracker3_bip_fr_32"),
        "tracks.grid": (16, f"{y}: POINT_INFO.GRID_SIZE"),
        "tracks.subset": (256, f"{s}: POINT_INFO.NUM_POINTS_TO_SAMPLE"),
        "tracks.semantic.method": ("bipartite", f"{p}: --clustering_method"),
        "tracks.semantic.frames": (32, f"{p}: --num_frames_clustering"),
        "tracks.semantic.merge_iterations": (11, f"{p}: --num_iters"),
        "tracks.semantic.points_per_cluster": (16, f"{p}: --num_points_per_entity"),
        "tracks.semantic.backbone": ("dinov2_vitb14", f"{K} point_tracking/feat_extractor.py"),
        "features.backbone": ("dinov2_vitb14", f"{s}: MODEL.DINO_CONFIG"),
        "features.views": (5, f"{s}: DATA.USE_RAND_AUGMENT True"),
        "train.way": (5, f"{s}: FEW_SHOT.N_WAY"),
        "train.shot": (1, f"{s}: FEW_SHOT.K_SHOT"),
        "train.train_queries": (6, f"{s}: FEW_SHOT.TRAIN_QUERY_PER_CLASS"),
        "train.test_queries": (1, f"{y}: FEW_SHOT.TEST_QUERY_PER_CLASS"),
        "train.episodes": (episodes, f"{y}: FEW_SHOT.TRAIN_EPISODES"),
        "train.epochs": (50, f"{y}: SOLVER.MAX_EPOCH"),
        "train.test_episodes": (10000, f"{y}: FEW_SHOT.TEST_EPISODES"),
        "train.lr": (1e-4, f"{y}: SOLVER.BASE_LR"),
        "train.weight_decay": (0.5, f"{y}: SOLVER.WEIGHT_DECAY"),
        "train.warmup_epochs": (5, f"{y}: SOLVER.WARMUP_EPOCHS (the last given)"),
        "train.warmup_lr": (1e-6, f"{y}: SOLVER.WARMUP_START_LR"),
        "train.lr_steps": ([20, 40], f"{y}: SOLVER.STEPS [0, 20, 40]"),
        "train.lr_decay": (0.1, f"{y}: SOLVER.LRS [1, 0.1, 0.01]"),
        "train.depth": (1, f"{d}: MF.DEPTH"),
        "train.heads": (8, f"{d}: MF.NUM_HEADS"),
        "train.mlp_ratio": (4.0, f"{d}: MF.MLP_RATIO"),
        "train.drop_path": (0.2, f"{d}: MF.DROP_PATH"),
        "train.hod_bins": (32, f"{K} trokens/config/custom_config.py: POINT_INFO.HOD.NUM_BINS"),
    }
    return rows | paper_rows(TROKENS_NAME, paper, split[4])


SSV2_SMALL = ("molo", "molo/ssv2_small", "ssv2")
SSV2_FULL = ("molo", "molo/ssv2_full", "ssv2")
KINETICS = ("molo", "molo/kinetics100", "kinetics")
HMDB, UCF = ("molo", "molo/hmdb51", "hmdb"), ("molo", "molo/ucf101", "ucf")
SSV2_YAML, K100_YAML = "configs/TaTs/ssv2_longer_steps.yaml", "configs/TaTs/k100_longer_steps.yaml"
RELEASES = {
    "tats/ssv2_small": tats(SSV2_YAML, frames=8, episodes=2000, paper=TATS_PAPER[0],
                            split=(*SSV2_SMALL, "ssv2_small_molo", "SSv2-small")),
    "tats/ssv2_full": tats(SSV2_YAML, frames=8, episodes=2000, paper=TATS_PAPER[1], derived=True,
                           split=(*SSV2_FULL, "", "SSv2-full")),
    "tats/k100": tats(K100_YAML, frames=16, episodes=100,
                      split=(*KINETICS, "kinetics100", "Kinetics-100")),
    "tats/hmdb": tats(K100_YAML, frames=8, episodes=200, paper=TATS_PAPER[2],
                      trokens_yaml="configs/trokens/hmdb.yaml",
                      split=(*HMDB, "hmdb_few_shot.csv", "HMDB-51")),
    "tats/ucf": tats(K100_YAML, frames=8, episodes=100, paper=TATS_PAPER[3],
                     trokens_yaml="configs/trokens/ucf.yaml",
                     split=(*UCF, "ucf_few_shot.csv", "UCF-101")),
    "trokens/ssv2_small": trokens("ssv2_small", episodes=400, paper=TROKENS_PAPER[0],
                                  split=(*SSV2_SMALL, "ssv2_small", "SSv2-small")),
    "trokens/ssv2_full": trokens("ssv2_full", episodes=1000, paper=TROKENS_PAPER[1],
                                 split=(*SSV2_FULL, "ssv2_full", "SSv2-full")),
    "trokens/k400": trokens("k400", episodes=100,
                            split=(*KINETICS, "kinetics100.csv", "Kinetics-100")),
    "trokens/hmdb": trokens("hmdb", episodes=200, paper=TROKENS_PAPER[2],
                            split=(*HMDB, "hmdb_few_shot.csv", "HMDB-51")),
    "trokens/ucf": trokens("ucf", episodes=100, paper=TROKENS_PAPER[3],
                           split=(*UCF, "ucf_few_shot.csv", "UCF-101")),
    "trokens/finegym": trokens("finegym", episodes=200,
                               split=("", "", "other", "finegym/master_few_shot.json", "FineGym")),
}  # fmt: skip


def leaves(values: dict, prefix: str = "") -> dict:
    """{"train.episodes": 400, ...}: every value of a recipe file but its notes."""
    found = {}
    for key, value in values.items():
        if key in ("deviations", "unhonoured", "notes"):
            continue
        if isinstance(value, dict):
            found |= leaves(value, f"{prefix}{key}.")
        else:
            found[prefix + key] = value
    return found


def test_the_recipes_are_the_releases_configurations():
    assert recipe_names() == sorted(RELEASES)


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_every_recipe_value_is_the_release_value(name):
    values = leaves(tomllib.loads((RECIPES / f"{name}.toml").read_text()))
    table = RELEASES[name]
    assert sorted(values) == sorted(table), "a value without a cited release value, or missing"
    for key, (expected, where) in table.items():
        assert values[key] == expected, f"{name} {key}: {values[key]!r}, {where} says {expected!r}"
    recipe = load_recipe(name)  # and the library reads what the file says
    assert recipe.train_options()["episodes"] == table["train.episodes"][0]
    assert recipe.tracks_options()["frames"] == recipe.features_options()["frames"]


def test_each_value_names_its_release_file_and_key():
    for path in sorted(RECIPES.glob("*/*.toml")):
        in_tables = False
        for number, line in enumerate(path.read_text().splitlines(), 1):
            in_tables |= line.startswith("[time]")
            if in_tables and "=" in line and not line.startswith("#"):
                assert "#" in line and ":" in line.split("#", 1)[1], f"{path}:{number}: {line}"


def test_recipe_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.toml"
    text = (RECIPES / "tats/ssv2_small.toml").read_text()
    bad.write_text(text.replace("episodes = 2000", "episode = 2000"))
    with pytest.raises(ValueError, match=r"bad.toml: \[train\] unknown option 'episode'"):
        load_recipe(bad)
    with pytest.raises(ValueError, match="unknown recipe 'tats/nope'; recipes: tats/hmdb"):
        load_recipe("tats/nope")


def test_the_wheel_ships_the_recipes(tmp_path):
    """`pip install .` installs the recipes with the package (they are package data)."""
    import zipfile

    source = tmp_path / "source"  # a copy: setuptools builds in the source folder
    shutil.copytree(README.parent / "tats", source / "tats",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(README.parent / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
         str(tmp_path), str(source)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("tats-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("tats/configs/")}
    assert {f"tats/configs/{name}.toml" for name in recipe_names()} <= shipped


# ---------------------------------------------------------------------------------------------
# The commands


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def resolved(*args: str) -> dict:
    """The config `tats run ARGS --print-config` prints (less "devices"), parsed by the
    command and resolved as it resolves it, without the checks of the files it makes first
    (manifest, weights, videos: tests/test_preflight.py), so that every recipe resolves
    without its dataset and weights."""
    from tats.cli.run import run_config

    ctx = typer.main.get_command(app).commands["run"].make_context("run", list(args))
    return json.loads(json.dumps(run_config(ctx.params).to_dict()))


def test_tats_recipes_lists_source_and_paper_accuracy():
    result = invoke("recipes")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for recipe in list_recipes():
        line = next(line for line in lines if line.startswith(recipe.name + " "))
        assert recipe.source["config"] in line
        for shot in (1, 5):
            accuracy = recipe.paper.accuracy(shot)
            assert (f"{accuracy:.1f}" if accuracy else "missing") in line
    assert "tats/hmdb" in result.output and "(derived: no release config for it)" in result.output


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_print_config_resolves_every_recipe(name, tmp_path):
    config = resolved("--recipe", name, "--manifest", "absent.csv", "--out", str(tmp_path / "run"))
    table = RELEASES[name]
    tracks, features = config["stages"]["tracks"], config["stages"]["features"]
    train = config["trainings"]["train"]
    assert config["recipe"] == name and config["method"] == table["method"][0]
    assert tracks["frames"] == features["frames"] == table["time.frames"][0]
    assert tracks["fps"] == features["fps"] == table["time.fps"][0]
    assert tracks["queries"] == table["tracks.queries"][0]
    assert features["views"] == table["features.views"][0]
    for key in ("way", "shot", "episodes", "epochs", "test_episodes", "lr_steps"):
        assert train[key] == table[f"train.{key}"][0]
    # The method preset reaches the trainer: Trokens' motion tokens and cluster sampling.
    assert train["motion"] == ("both" if name.startswith("trokens") else "none")
    assert train["cluster_sampling"] is name.startswith("trokens")
    assert config["unhonoured"] == list(load_recipe(name).unhonoured)
    assert not (tmp_path / "run").exists()  # no work


def test_command_line_options_win_over_the_recipe_and_the_file(tmp_path):
    options = tmp_path / "options.json"
    # Grid queries have no clusters to sample by: the file turns the preset's sampling off.
    options.write_text(json.dumps({"episodes": 7, "epochs": 3, "lr": 0.5,
                                   "cluster_sampling": False}))  # fmt: skip
    config = resolved("--recipe", "trokens/hmdb", "--manifest", "m.csv", "--out",
                      str(tmp_path / "run"), "--train-config", str(options), "--epochs", "2",
                      "--queries", "uniform:8", "--backbone", "pixels",
                      "--frames", "4")  # fmt: skip
    train = config["trainings"]["train"]
    assert (train["episodes"], train["epochs"], train["lr"]) == (7, 2, 0.5)
    assert train["shot"] == 1 and train["motion"] == "both"  # the recipe's, the preset's
    assert train["cluster_sampling"] is False  # the file's
    tracks = config["stages"]["tracks"]
    assert tracks["queries"] == "uniform:8" and tracks["semantic"] is None
    assert tracks["frames"] == config["stages"]["features"]["frames"] == 4
    assert config["stages"]["features"]["backbone"] == "pixels"
    # Another method than the recipe's: that method's queries and training options.
    config = resolved("--recipe", "tats/hmdb", "--method", "trokens", "--manifest", "m.csv",
                      "--out", str(tmp_path / "run"))  # fmt: skip
    assert config["stages"]["tracks"]["queries"] == "semantic"
    assert config["trainings"]["train"]["motion"] == "both"
    assert config["trainings"]["train"]["episodes"] == 200  # the recipe's all the same


def test_paper_tracker_runs_the_papers_tracker(tmp_path):
    def tracking(*options: str) -> tuple[str, dict]:
        config = resolved(*options, "--manifest", "m.csv", "--out", str(tmp_path / "r"),
                          "--paper-tracker")  # fmt: skip
        return config["stages"]["tracks"]["tracker"], config["extraction"]["tracker_options"]

    # TATs' numbers are CoTracker2's, through the official package; Trokens' are CoTracker3's.
    assert tracking("--recipe", "tats/ssv2_small") == (
        "official",
        {"model": "cotracker2", "passes": "per_query_frame", "support_grid": False},
    )
    assert tracking("--recipe", "tats/k100", "--tracker-option", "model=cotracker2v1") == (
        "official",
        {"model": "cotracker2v1", "passes": "per_query_frame", "support_grid": False},
    )
    assert tracking("--recipe", "trokens/hmdb") == ("cotracker3", {})
    both = subprocess.run([TATS, "run", "--recipe", "tats/hmdb", "--paper-tracker", "--tracker",
                           "lk", "-m", "m.csv", "-o", str(tmp_path), "--print-config"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert both.returncode == 2
    assert "--paper-tracker and --tracker: give one of them" in both.stderr


def test_a_bad_recipe_name_is_bad_input(tmp_path):
    result = subprocess.run([TATS, "run", "--recipe", "tats/ssv3", "--manifest", "m.csv",
                             "--out", str(tmp_path), "--print-config"],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: unknown recipe 'tats/ssv3'; recipes: {', '.join(recipe_names())}"
    ]


def test_tats_train_takes_a_recipe(synth_stores, tmp_path):
    """tats-train --recipe (a shipped name or a TOML file): the recipe's training options under
    --train-config and the command line (the stores are the caller's)."""
    recipe = tmp_path / "mine.toml"
    text = (RECIPES / "tats/k100.toml").read_text()
    recipe.write_text(
        text.replace("episodes = 100 ", "episodes = 3 ")
        .replace("test_episodes = 10000", "test_episodes = 5")
        .replace("epochs = 50", "epochs = 1")
    )
    small = tmp_path / "small.json"
    small.write_text(json.dumps({**TINY, "val_episodes": 2}))
    out = tmp_path / "train"
    result = subprocess.run(
        [TATS_TRAIN, "--recipe", str(recipe), "--train-config", str(small), "--tracks",
         str(synth_stores.tracks), "--features", str(synth_stores.features), "--manifest",
         str(synth_stores.manifest), "--out", str(out), "--test-episodes", "4"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert (config["episodes"], config["epochs"]) == (3, 1)  # the recipe's
    assert (config["way"], config["val_episodes"]) == (3, 2)  # the file's
    assert config["test_episodes"] == 4  # the command line's
    bad = subprocess.run([TATS_TRAIN, "--recipe", "tats/nope", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "unknown recipe 'tats/nope'" in bad.stderr


# ---------------------------------------------------------------------------------------------
# A Trokens recipe end to end (weight-free tracker and backbone, tiny schedule)


def test_trokens_recipe_runs_end_to_end(synth_dataset, tmp_path):
    small = tmp_path / "small.json"
    small.write_text(json.dumps(TINY))
    out = tmp_path / "run"
    command = [
        TATS, "run", "--recipe", "trokens/hmdb", "--manifest", str(synth_dataset), "--out",
        str(out), "--tracker", "lk", "--backbone", "pixels", "--views", "2", "--workers", "0",
        "--train-config", str(small), "--epochs", "1", "--episodes", "2", "--val-episodes",
        "2", "--test-episodes", "6", "--no-progress",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    assert "test:" in result.stdout and "(6 episodes)" in result.stdout
    record = json.loads((out / "run.json").read_text())
    assert record["recipe"] == "trokens/hmdb"
    assert record["stages"]["tracks"]["queries"] == "semantic"
    assert record["stages"]["tracks"]["semantic"]["backbone"] == "pixels"  # --backbone's
    assert record["stages"]["tracks"]["semantic"]["frames"] == 32  # the recipe's
    train = record["trainings"]["train"]
    assert train["motion"] == "both" and train["cluster_sampling"] is True
    assert train["episodes"] == 2 and train["test_episodes"] == 6  # the command line's
    metrics = json.loads((out / "train" / "metrics.json").read_text())
    assert metrics["config"]["motion"] == "both" and metrics["test"]["episodes"] == 6


# ---------------------------------------------------------------------------------------------
# The README's "Reproducing the papers" table


def readme_rows() -> list[list[str]]:
    section = README.read_text().split("## Reproducing the papers", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if "`tats run" in line]
    return [[cell.strip() for cell in row] for row in rows]


def test_readme_table_covers_every_recipe_and_shot():
    rows = readme_rows()
    named = {(row[4].split("--recipe ")[1].split()[0], int(row[2])) for row in rows}
    assert named == {(name, shot) for name in recipe_names() for shot in (1, 5)}


@pytest.mark.parametrize("row", readme_rows(), ids=lambda row: row[4].strip("`"))
def test_readme_commands_resolve(row, tmp_path, monkeypatch):
    import shlex

    dataset, method, shot, paper, command = row[:5]
    words = shlex.split(command.strip("`"))
    assert words[:2] == ["tats", "run"]
    monkeypatch.chdir(tmp_path)
    config = resolved(*words[2:])
    recipe = load_recipe(config["recipe"])
    (train,) = config["trainings"].values()  # "train", or the 5-shot rows' --train-out
    assert train["shot"] == int(shot)
    assert (recipe.dataset, recipe.method) == (dataset, method.lower())
    accuracy = recipe.paper.accuracy(int(shot))
    assert paper == (f"{accuracy:.1f}" if accuracy is not None else "missing (b)")
    assert not any(tmp_path.iterdir())  # a dry run: nothing written
