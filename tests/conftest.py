"""Shared fixtures: real synthetic videos (rendered once per session) and their manifests."""

from pathlib import Path

import pytest

from tats.synth import SynthConfig, generate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> Path:
    """A small `tats synth` dataset: every motion class, 2 videos each, default video size."""
    out = tmp_path_factory.mktemp("synth_small")
    return generate(SynthConfig(videos_per_class=2), out, progress=False)
