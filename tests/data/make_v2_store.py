"""Made tests/data/v2_store (a store of schema version 2, the layout before version 3: Zarr's
"/" chunk keys, one chunk per row in every array, no units map) with tats at commit 828b202:

    git worktree add /tmp/oldmain 828b202
    PYTHONPATH=/tmp/oldmain:/tmp/oldmain/tests python tests/data/make_v2_store.py OUT

Five videos in units of two; unit 0 done, unit 1 done but for row 2 (a video that fails to
load), unit 2 never computed. tests/test_scale.py opens, resumes and verifies it."""

import shutil
import sys
from pathlib import Path

from fault_stages import CountingRecipe, CountingStage, fake_videos

from tats.pipeline.runner import RunOptions, run_stage

IDS = ["a", "b", "bad-load", "c", "d"]

if __name__ == "__main__":
    out = Path(sys.argv[1])
    videos = out.parent / "v2_videos"
    videos.mkdir(parents=True)
    manifest = fake_videos(videos, IDS)
    store = CountingRecipe(2).open_store(out, manifest, None)
    run_stage(CountingStage(), store, manifest, [0, 1], RunOptions(workers=0, progress=False))
    shutil.rmtree(videos)
