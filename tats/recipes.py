"""Recipes: the published configurations of TATs and Trokens, one TOML file each.

    recipe = load_recipe("trokens/hmdb")        # tats/configs/trokens/hmdb.toml
    recipe.tracks_options()                      # TracksConfig keyword arguments
    recipe.train_options()                       # tats-train options, with "method"

A recipe holds what makes a run: the split the manifest is imported from, the tracker and
query strategy, the stored frames and time base (both stages), the backbone and feature views,
and the trainer's options (way, shot, queries, episodes, epochs, schedule, test episodes); each
value's comment in the file names the release file and key it was read from. `unhonoured`
lists release values tats cannot follow (and why), `deviations` where tats differs on purpose
or the release contradicts itself. The files ship inside the package (`tats/configs/`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RECIPES = Path(__file__).parent / "configs"
TOP_KEYS = {
    "method", "dataset", "deviations", "unhonoured", "source", "paper", "split", "time",
    "tracks", "paper_tracker", "features", "train", "release", "notes",
}  # fmt: skip
RELEASE_KEYS = ("seed",)  # the `release` protocol's training values (tats/fixes.py)
TIME_KEYS = ("frames", "fps", "native_suffixes")  # shared by both stages


@dataclass(frozen=True)
class Paper:
    """The 5-way accuracy (%) the paper reports (`where`: the paper and its table, and how the
    figure was checked); None where tats has no figure for it (`missing` says why)."""

    shot_1: float | None = None
    shot_5: float | None = None
    where: str = ""
    missing: str = ""

    def accuracy(self, shot: int) -> float | None:
        return {1: self.shot_1, 5: self.shot_5}.get(shot)


@dataclass(frozen=True)
class Split:
    """The split lists the manifest is imported from (`tats manifest import`)."""

    importer: str = ""  # molo, trx, tats-json; "": no lists shipped with tats
    lists: str = ""  # a folder under data_manifests/splits
    dataset: str = "other"
    release: str = ""  # the release's name for the split

    def import_command(self, video_root: str = "VIDEOS", out: str = "M.csv") -> str | None:
        """The `tats manifest import` that makes the manifest (None: no lists shipped)."""
        if not self.importer:
            return None
        return (
            f"tats manifest import --format {self.importer} data_manifests/splits/{self.lists} "
            f"--dataset {self.dataset} --video-root {video_root} --out {out}"
        )


@dataclass(frozen=True)
class Recipe:
    """One recipe file, read and checked (see the module docstring)."""

    name: str  # "trokens/hmdb", or the path of a file outside the package
    path: Path
    method: str
    dataset: str
    source: dict[str, str]
    paper: Paper
    split: Split
    time: dict = field(default_factory=dict)
    tracks: dict = field(default_factory=dict)
    features: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    # The tracker of the paper's numbers where the recipe tracks with another ({"tracker":
    # name, "options": its tracker options}): `tats run --paper-tracker`. Empty: the same.
    paper_tracker: dict = field(default_factory=dict)
    deviations: tuple[str, ...] = ()
    unhonoured: tuple[str, ...] = ()
    # The `release` protocol's training values, under everything given ({"seed": RNG_SEED}).
    release: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # what `tats recipes` adds below the table

    @property
    def release_file(self) -> str:
        """The release config the values come from (or are derived from), with its repository."""
        config = self.source.get("derived") or self.source.get("config", "")
        return f"{self.source.get('repository', '?')} {config}".strip()

    def tracks_options(self) -> dict:
        """TracksConfig keyword arguments (the time base included; `semantic` a SemanticConfig)."""
        from tats.pipeline.semantic import SemanticConfig

        options = {**self._time(), **self.tracks}
        if "native_suffixes" in options:
            options["native_suffixes"] = tuple(options["native_suffixes"])
        if isinstance(options.get("semantic"), dict):
            options["semantic"] = SemanticConfig(**options["semantic"])
        return options

    def features_options(self) -> dict:
        """FeaturesConfig keyword arguments (the time base included)."""
        options = {**self._time(), **self.features}
        if "native_suffixes" in options:
            options["native_suffixes"] = tuple(options["native_suffixes"])
        return options

    def _time(self) -> dict:
        """[time], with fps 0 (every native frame) as the stages' None."""
        time = dict(self.time)
        if time.get("fps") == 0:
            time["fps"] = None
        return time

    def train_options(self) -> dict:
        """tats-train options: the method preset's name and the [train] table."""
        return {"method": self.method, **self.train}


def recipe_names() -> list[str]:
    """The recipes shipped with tats, as `<method>/<dataset>`."""
    return sorted(
        p.relative_to(RECIPES).with_suffix("").as_posix() for p in RECIPES.glob("*/*.toml")
    )


def list_recipes() -> list[Recipe]:
    return [load_recipe(name) for name in recipe_names()]


def recipe_path(name: str | Path) -> Path:
    """A shipped recipe's file ("tats/ssv2_small"), or the TOML file `name` names."""
    shipped = RECIPES / f"{name}.toml"
    if shipped.is_file():
        return shipped
    path = Path(name)
    if path.suffix == ".toml" and path.is_file():
        return path
    raise ValueError(f"unknown recipe {str(name)!r}; recipes: {', '.join(recipe_names())}")


def load_recipe(name: str | Path) -> Recipe:
    """Read and check a recipe; errors are one line naming the file and the key."""
    path = recipe_path(name)
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: {error}") from None
    unknown = sorted(set(values) - TOP_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r}")
    for key in ("method", "dataset"):
        if not isinstance(values.get(key), str):
            raise ValueError(f"{path}: {key} must be a string")
    tables = {}
    tables_named = ("source", "paper", "split", "time", "tracks", "paper_tracker", "features",
                    "train", "release")  # fmt: skip
    for key in tables_named:
        table = values.get(key, {})
        if not isinstance(table, dict):
            raise ValueError(f"{path}: [{key}] must be a table")
        tables[key] = table
    bad_time = sorted(set(tables["time"]) - set(TIME_KEYS))
    if bad_time:
        raise ValueError(f"{path}: [time] {bad_time[0]!r}: expected {', '.join(TIME_KEYS)}")
    for key in TIME_KEYS:
        for stage in ("tracks", "features"):
            if key in tables[stage]:
                raise ValueError(f"{path}: [{stage}] {key}: set it in [time] (both stages)")
    bad_release = sorted(set(tables["release"]) - set(RELEASE_KEYS))
    if bad_release:
        expected = ", ".join(RELEASE_KEYS)
        raise ValueError(f"{path}: [release] {bad_release[0]!r}: expected {expected}")
    for key in ("fixes", "protocol"):
        if key in tables["train"]:
            raise ValueError(f"{path}: [train] {key}: set by --fixes and --protocol, not a recipe")
    paper_tracker = tables["paper_tracker"]
    if paper_tracker and (
        set(paper_tracker) - {"tracker", "options"}
        or not isinstance(paper_tracker.get("tracker"), str)
        or not isinstance(paper_tracker.get("options", {}), dict)
    ):
        raise ValueError(f"{path}: [paper_tracker] holds tracker (a name) and options (a table)")
    try:
        paper, split = Paper(**tables["paper"]), Split(**tables["split"])
    except TypeError as error:
        raise ValueError(f"{path}: {error}") from None
    if path.is_relative_to(RECIPES):
        name = path.relative_to(RECIPES).with_suffix("").as_posix()
    recipe = Recipe(
        name=str(name), path=path, method=values["method"], dataset=values["dataset"],
        source=tables["source"], paper=paper, split=split, time=tables["time"],
        tracks=tables["tracks"], features=tables["features"], train=tables["train"],
        paper_tracker=paper_tracker,
        deviations=tuple(values.get("deviations", ())),
        unhonoured=tuple(values.get("unhonoured", ())), release=tables["release"],
        notes=tuple(values.get("notes", ())),
    )  # fmt: skip
    _check_options(recipe)
    return recipe


def _check_options(recipe: Recipe) -> None:
    """Every key must be an option of the stage or trainer it is given to."""
    from tats.pipeline.features import FeaturesConfig
    from tats.pipeline.semantic import SemanticConfig
    from tats.pipeline.tracks import TracksConfig
    from tats.train_config import TrainConfig

    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    for table, cls, values in (
        ("tracks", TracksConfig, recipe.tracks),
        ("tracks.semantic", SemanticConfig, recipe.tracks.get("semantic", {})),
        ("features", FeaturesConfig, recipe.features),
        ("train", TrainConfig, recipe.train),
    ):
        unknown = sorted(set(values) - names(cls))
        if unknown:
            raise ValueError(f"{recipe.path}: [{table}] unknown option {unknown[0]!r}")
