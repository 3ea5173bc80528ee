"""TATs and Trokens as presets: option values over one tracks stage, model and trainer.

A method is nothing but the values it gives to options that exist on their own: the tracks
stage's queries, the mask and point sampling that training reads with, and the model's motion
tokens. `--method` fills those options wherever they were not given, so every part can be
changed alone for ablations (`--method trokens --motion hod`, or `--method tats --motion both`).

    values = with_method({"method": "trokens", "motion": "hod"}, TRAIN_KEYS)
    # {"mask": "visible", "cluster_sampling": True, "motion": "hod"}

Trokens' mask is the fix "trokens-mask" (tats/fixes.py): without it, the preset attends with
the release's mask, which lets every token see every other (`--mask all`).
"""

from __future__ import annotations

METHODS: dict[str, dict[str, object]] = {
    # ECCV 2024: grids at 7 query frames tracked forward, the fixed 256-subset, no motion tokens.
    "tats": {"queries": "uniform:8", "mask": "query", "cluster_sampling": False, "motion": "none"},
    # Trokens: semantic points tracked both ways (so they exist at every frame, and visibility
    # is the mask), cluster-balanced sampling per training read, both kinds of motion tokens.
    "trokens": {
        "queries": "semantic", "mask": "visible", "cluster_sampling": True, "motion": "both",
    },
}  # fmt: skip
TRACKS_KEYS = ("queries",)  # the tracks stage's options a method sets
TRAIN_KEYS = ("mask", "cluster_sampling", "motion")  # the trainer's
RELEASE_MASK = {"trokens": "all"}  # the preset's mask without the fix "trokens-mask"


def with_method(values: dict, keys: tuple[str, ...]) -> dict:
    """`values` without its "method" key, over that method's values of `keys` (explicit
    values win). Without a method, `values` as given: the defaults are TATs'."""
    values = dict(values)
    method = values.pop("method", None)
    if method is None:
        return values
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    preset = {k: METHODS[method][k] for k in keys}
    if "mask" in preset and method in RELEASE_MASK:
        from tats.fixes import parse_fixes

        if "trokens-mask" not in parse_fixes(values.get("fixes")):
            preset["mask"] = RELEASE_MASK[method]
    return {**preset, **values}
