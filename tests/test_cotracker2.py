"""CoTracker2, the tracker of the TATs paper's numbers: tats runs it only through the official
package (`--tracker official --tracker-option model=cotracker2`); its checkpoints given to tats'
own CoTracker3 are named as what they are. No weights are downloaded: state dicts here have
the official key names and shapes with random values (tests/test_cotracker2_parity.py checks
the layout against the official model where the package is installed)."""

import subprocess

import pytest
import torch
from stage_helpers import EXTRACT
from test_cotracker3 import block_shapes, official_shapes

from tats.pipeline.trackers import create_tracker
from tats.pipeline.trackers.cotracker3 import (
    CheckpointError,
    build_model,
    check_state_dict,
    checkpoint_family,
)
from tats.synth import SynthConfig, generate


def cotracker2_shapes(window: int = 8, model_resolution=(384, 512)) -> dict[str, tuple]:
    """Key -> shape of the official CoTracker2 state dict (`CoTracker2(stride=4,
    window_len=window)`, facebookresearch/co-tracker `cotracker/models/core/cotracker/
    cotracker.py`): CoTracker3's feature CNN, a 456-wide input, 6 blocks of each attention kind
    and a 130-wide head, and the CoTracker2-only track feature and visibility heads."""
    h, w = model_resolution
    shapes = {"time_emb": (1, window, 456), "pos_emb": (1, 456, h // 4, w // 4)}
    shapes |= {k: v for k, v in official_shapes().items() if k.startswith("fnet.")}

    def linear(name, out, inp):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp), (out,)

    shapes["updateformer.virual_tracks"] = (1, 64, 1, 384)
    linear("updateformer.input_transform", 384, 456)
    linear("updateformer.flow_head", 130, 384)
    shapes |= block_shapes(depth=6)
    shapes["norm.weight"] = shapes["norm.bias"] = (128,)
    linear("track_feat_updater.0", 128, 128)
    linear("vis_predictor.0", 1, 128)
    return shapes


def random_cotracker2_state(window: int = 8, dtype=torch.float32) -> dict[str, torch.Tensor]:
    torch.manual_seed(window)
    return {k: torch.randn(shape, dtype=dtype) for k, shape in cotracker2_shapes(window).items()}


@pytest.mark.parametrize("window, name", [(8, "cotracker2"), (16, "cotracker2v1")])
def test_a_cotracker2_checkpoint_given_to_cotracker3_is_named(window, name):
    state = random_cotracker2_state(window)
    assert checkpoint_family(state) == name
    with pytest.raises(CheckpointError) as err:
        check_state_dict(build_model("offline"), state, "weights.pth")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"weights.pth: a CoTracker2 checkpoint ({name})")
    assert f"--tracker official --tracker-option model={name}" in message
    assert "cotracker package" in message and "online checkpoint" not in message


def test_cotracker3_checkpoints_are_told_apart():
    for window in (60, 16):  # offline, online
        state = {k: torch.zeros(1) for k in official_shapes(window)}
        assert checkpoint_family(state) == "cotracker3"
    assert checkpoint_family({"head.weight": torch.zeros(1)}) is None


def test_tats_extract_with_a_cotracker2_checkpoint_exits_2_naming_it(tmp_path):
    manifest = generate(
        SynthConfig(classes=3, videos_per_class=1, frames=4, width=64, height=48),
        tmp_path / "synth",
        progress=False,
    )
    # half precision: the same keys and shapes in half the bytes (the check reads no values)
    torch.save(random_cotracker2_state(8, torch.float16), tmp_path / "cotracker2.pth")
    out = tmp_path / "tracks.zarr"
    run = subprocess.run(
        [EXTRACT, "tracks", "--manifest", str(manifest), "--out", str(out),
         "--tracker", "cotracker3", "--tracker-weights", str(tmp_path / "cotracker2.pth"),
         "--workers", "0", "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "a CoTracker2 checkpoint (cotracker2)" in lines[0], lines
    assert "--tracker official --tracker-option model=cotracker2" in lines[0]
    assert not out.exists()


def test_the_official_adapter_knows_its_models(tmp_path):
    with pytest.raises(ValueError, match="model must be one of .*cotracker2"):
        create_tracker("official", model="cotracker1")
