"""`torchrun --nproc_per_node 2` on CPU (gloo): distinct episodes per rank, a usable checkpoint."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from tats.checkpoints import load_checkpoint
from tats.episodes import EpisodeData, EpisodeSpec, ReadOptions
from tats.evaluate import evaluate

BIN = Path(sys.executable).parent


def test_torchrun_two_ranks_draw_distinct_episodes(synth_stores, tmp_path):
    out = tmp_path / "run"
    options = dict(
        tracks=str(synth_stores.tracks), features=str(synth_stores.features),
        manifest=str(synth_stores.manifest), out=str(out), way=3, shot=1, train_queries=2,
        episodes=6, epochs=2, val_episodes=6, test_episodes=10, width=16, heads=2, lr=1e-3,
        warmup_epochs=0, workers=1, log_every=3, seed=5,
    )  # fmt: skip
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps(options))
    proc = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2",
         str(BIN / "tats-train"), "--train-config", str(config_file)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "on 2 x cpu" in proc.stdout

    # Each rank trained on its own episodes: the ones the library draws for its rank.
    metrics = json.loads((out / "metrics.json").read_text())
    data = EpisodeData.open(synth_stores.tracks, synth_stores.features, synth_stores.manifest)
    spec = EpisodeSpec(3, 1, 2)
    for epoch, record in enumerate(metrics["history"]):
        expected = []
        for rank in range(2):
            dataset = data.dataset("train", spec, ReadOptions(random_view=True), 5, rank)
            digest = hashlib.blake2b(digest_size=8)
            for index in range(6):
                digest.update(dataset.episode(epoch, index).rows.tobytes())
            expected.append(digest.hexdigest())
        assert record["episode_digests"] == expected
        assert expected[0] != expected[1]
    assert metrics["history"][0]["episode_digests"] != metrics["history"][1]["episode_digests"]

    # The test episodes were shared out between the ranks and gathered: all 10, once each,
    # the same as evaluating the best checkpoint in one process.
    test = metrics["test"]
    assert test["episodes"] == 10 and np.sum(test["confusion"]) == 10 * 3
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["epoch"] == 2 and state["config"]["seed"] == 5
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran
    try:
        alone = evaluate(
            out / "checkpoints" / "best.pt", synth_stores.tracks, synth_stores.features,
            synth_stores.manifest, None, episodes=10, seed=5, workers=0,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert alone.confusion.tolist() == test["confusion"]
    assert alone.accuracy == test["accuracy"]

    # Resuming the two-rank run in one process would draw other episodes: refused, one line.
    more = json.dumps({**options, "epochs": 3, "resume": True})
    config_file.write_text(more)
    alone_run = subprocess.run(
        [str(BIN / "tats-train"), "--train-config", str(config_file)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert alone_run.returncode == 2, alone_run.stdout + alone_run.stderr
    errors = [line for line in alone_run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot resume: the run was trained with 2 processes" in errors[0]
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 2
