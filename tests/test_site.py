"""The documentation site as a newcomer meets it: every page within two clicks of the front page,
no words bound to the machine the docs were written on, a status box true to the benchmark
results, screenshots of the pages as they are, folder layouts that are what the importers do,
and the papers' figures as the recipes hold them."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlparse

import pytest
from test_docs import check_command, commands

from tats.importers import import_splits
from tats.recipes import load_recipe, recipe_names

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "data_manifests" / "README.md"
SPLITS = ROOT / "data_manifests" / "splits"


def tool(name: str):
    """A module of tools/ (scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


status_tool, screenshots_tool = tool("status"), tool("screenshots")

# Words that make sense only on the machine where the docs were written.
MACHINE_BOUND = (
    r"\bhere\b", r"\bthis machine\b", r"\bthis project\b", r"\bdevice tool\b",
    r"\bno weights exist\b", r"\bcarr(?:y|ied)\b", r"\bthis tree\b", r"\bCI-class\b",
    r"\bour (?:machine|cluster|GPU)s?\b",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The built site


class _Article(HTMLParser):
    """The visible text and the links of a page's article (not the navigation around it)."""

    def __init__(self) -> None:
        super().__init__()
        self.depth, self.skip, self.text, self.links = 0, 0, [], []

    def handle_starttag(self, tag, attrs):
        if tag == "article" or self.depth:
            self.depth += tag not in ("br", "img", "hr", "input", "source", "meta", "link")
        if self.depth and tag in ("script", "style"):
            self.skip += 1
        href = dict(attrs).get("href")
        if self.depth and tag == "a" and href:
            self.links.append(href)

    def handle_endtag(self, tag):
        if self.depth and tag in ("script", "style"):
            self.skip -= 1
        if self.depth and tag not in ("br", "img", "hr", "input", "source", "meta", "link"):
            self.depth -= 1

    def handle_data(self, data):
        if self.depth and not self.skip:
            self.text.append(data)


def read_article(path: Path) -> _Article:
    parser = _Article()
    parser.feed(path.read_text())
    assert parser.text, f"{path}: no <article> found"
    return parser


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    return out


def site_pages(site: Path) -> dict[str, Path]:
    """Every page of the built site by its URL path ("", "demo/", ...)."""
    pages = {}
    for path in site.rglob("index.html"):
        url = path.parent.relative_to(site).as_posix()
        if not url.startswith(("search", "assets")):
            pages["" if url == "." else f"{url}/"] = path
    return pages


def linked_pages(url: str, page: Path, pages: dict[str, Path]) -> set[str]:
    """The site's pages that a page's article links to."""
    found = set()
    for href in read_article(page).links:
        target = urldefrag(urljoin(f"http://site/{url}", href)).url
        parsed = urlparse(target)
        if parsed.netloc == "site":
            path = parsed.path.lstrip("/").removesuffix("index.html")
            if path in pages:
                found.add(path)
    return found


def test_every_page_is_within_two_clicks_of_the_front_page(site):
    pages = site_pages(site)
    assert len(pages) >= 10 and "" in pages
    clicks, frontier = {"": 0}, {""}
    for depth in (1, 2):
        frontier = {
            target for url in frontier for target in linked_pages(url, pages[url], pages)
            if target not in clicks
        }  # fmt: skip
        clicks |= dict.fromkeys(frontier, depth)
    far = sorted(set(pages) - set(clicks))
    assert not far, f"pages more than two clicks from the front page (through its text): {far}"
    doors = {"your-videos/", "your-cluster/", "reproduce/"}
    assert all(clicks[door] == 1 for door in doors), "the three doors open from the front page"


def test_no_page_speaks_of_the_machine_it_was_written_on(site):
    texts = {f"site page /{url}": " ".join(read_article(path).text)
             for url, path in site_pages(site).items()}  # fmt: skip
    texts["README.md"] = (ROOT / "README.md").read_text()
    found = []
    for where, text in texts.items():
        text = " ".join(text.split())
        for pattern in MACHINE_BOUND:
            for match in re.finditer(pattern, text, flags=re.I):
                context = text[max(0, match.start() - 60) : match.end() + 60]
                found.append(f"{where}: {match.group(0)!r} in ...{context}...")
    assert not found, "words bound to the machine the docs were written on:\n" + "\n".join(found)


def test_the_demo_has_one_time():
    """README, front page and demo page give the demo's time from one measurement."""
    texts = [(ROOT / name).read_text() for name in ("README.md", "docs/index.md", "docs/demo.md")]
    times = [re.findall(r"(?:in|took) (\d+ min \d+ s) on", t) for t in texts]
    assert all(times) and len({m for found in times for m in found}) == 1, times


def test_the_manifests_page_is_the_manifest_readme(site):
    """docs/manifests.md includes data_manifests/README.md, and its commands exist."""
    text = " ".join(" ".join(read_article(site / "manifests" / "index.html").text).split())
    assert "Folder layouts" in text and "videos/<class>/<video>.avi" in text
    quoted = commands(MANIFESTS.read_text())
    assert any(words[:3] == ["tats", "manifest", "import"] for words in quoted)
    for words in quoted:
        check_command(words)


# ---------------------------------------------------------------------------------------------
# The status box


def test_the_status_box_says_what_the_benchmark_results_hold():
    status = status_tool.read_status()
    for target in status_tool.TARGETS:
        box = status_tool.current((ROOT / target).read_text())
        assert box is not None, f"{target} has no status box"
        assert box == status_tool.render(target, status), (
            f"{target}: the status box is out of date: python tools/status.py --write"
        )
    if not status.gpus:
        assert "| GPU | No run yet." in status_tool.current((ROOT / "README.md").read_text())


def test_a_gpu_or_real_dataset_result_changes_the_status(tmp_path):
    """What the results would have to hold for the box to say more than CPU only."""
    results, readme = tmp_path / "results", tmp_path / "README.md"
    shutil.copytree(status_tool.RESULTS, results)
    readme.write_text((ROOT / "README.md").read_text())
    assert not status_tool.read_status(results, readme).gpus

    check = results / "gpu-check" / "gpu_check.json"
    check.parent.mkdir(exist_ok=True)
    machine = {"cuda": True, "gpus": ["NVIDIA H100 80GB HBM3"]}
    check.write_text(json.dumps({"machine": machine, "steps": [{"status": "failed"}]}))
    assert not status_tool.read_status(results, readme).gpus  # nothing measured
    check.write_text(json.dumps({"machine": machine, "steps": [{"status": "passed"}]}))
    (results / "train-gpu.json").write_text(json.dumps({"device": "cuda:0", "dataset": "HMDB-51"}))
    status = status_tool.read_status(results, readme)
    assert set(status.gpus) == {"NVIDIA H100 80GB HBM3", "CUDA"}
    assert status.datasets == {"hmdb": ["train-gpu.json"]}
    box = status_tool.render("README.md", status)
    assert "| GPU | Measured: NVIDIA H100 80GB HBM3 (gpu-check/gpu_check.json)" in box
    assert "No run yet" not in box and box != status_tool.current(readme.read_text())

    (results / "train-gpu.json").unlink()
    readme.write_text(readme.read_text().replace("| not yet run |", "| 61.0 +- 0.4 |", 1))
    assert "the reproduction table" in status_tool.read_status(results, readme).datasets


# ---------------------------------------------------------------------------------------------
# Screenshots


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_the_screenshots_show_the_pages_as_they_are():
    """The PNGs in docs/screenshots/ were taken of the pages' current sources (no Chromium
    needed here: tools/screenshots.py recorded each page's SHA-256 when it took them)."""
    recorded = json.loads(screenshots_tool.SOURCES.read_text())
    assert set(recorded) == set(screenshots_tool.PAGES)
    stale = []
    for png, (page, width, height) in screenshots_tool.PAGES.items():
        entry, path = recorded[png], screenshots_tool.OUT / png
        assert entry["page"] == f"docs/{page}" and entry["window"] == [width, height]
        assert png_size(path) == (width, height), f"{path}: not a {width}x{height} screenshot"
        if entry["sha256"] != screenshots_tool.page_digest(page):
            stale.append(f"{path.relative_to(ROOT)} (docs/{page})")
    assert not stale, f"screenshots older than their pages: {stale}; run make screenshots"


def test_a_changed_page_makes_its_screenshot_stale(tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs)
    monkeypatch.setattr(screenshots_tool, "DOCS", docs)
    monkeypatch.setattr(screenshots_tool, "ROOT", tmp_path)
    (tmp_path / "data_manifests").mkdir()
    shutil.copy(MANIFESTS, tmp_path / "data_manifests" / "README.md")
    before = screenshots_tool.page_digest("index.md")
    (docs / "pipeline.svg").write_text((docs / "pipeline.svg").read_text().replace("tats", "x"))
    after_picture = screenshots_tool.page_digest("index.md")
    (docs / "index.md").write_text((docs / "index.md").read_text() + "\nMore.\n")
    assert len({before, after_picture, screenshots_tool.page_digest("index.md")}) == 3


# ---------------------------------------------------------------------------------------------
# Manifests: the folder layouts are the importers'


def table(text: str, header: str) -> list[list[str]]:
    """The rows (cells) of the Markdown table whose header row starts with `header`."""
    lines = text[text.index(header) :].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def code_spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def layout_pattern(layout: str) -> re.Pattern:
    """`{train,val}_256/<class>/<video>.mp4` -> a regex: a group per placeholder, the
    alternatives in braces."""
    pattern = ""
    for part in re.split(r"(<\w+>|\{[^}]+\})", layout):
        if part.startswith("<"):
            pattern += f"(?P<{part[1:-1]}>[^/]+)"
        elif part.startswith("{"):
            pattern += "(?:" + "|".join(map(re.escape, part[1:-1].split(","))) + ")"
        else:
            pattern += re.escape(part)
    return re.compile(pattern)


def test_the_folder_layouts_are_what_the_importers_do(tmp_path):
    """Every shipped split list, imported with its documented `--dataset`, names video files
    in the documented layout, with the documented class; and the documented counts hold."""
    text = MANIFESTS.read_text()
    layouts = {}
    for _, option, files, _ in table(text, "| dataset | `--dataset` |"):
        layouts[code_spans(option)[0]] = [layout_pattern(f) for f in code_spans(files)]
    assert set(layouts) == {"ssv2", "kinetics", "hmdb", "ucf"}
    used = set()
    for folder, command, classes, videos in table(text, "| folder | command |"):
        name = code_spans(folder)[0]
        dataset = re.search(r"--dataset (\w+)", command).group(1)
        entries = import_splits("molo", SPLITS / "molo" / name, tmp_path, dataset)
        root = len(str(tmp_path)) + 1
        for entry in entries:
            rel = str(entry.row.path)[root:]
            match = next((m for p in layouts[dataset] if (m := p.fullmatch(rel))), None)
            assert match, f"{entry.where}: {rel} is not in the layout of --dataset {dataset}"
            used.add(match.re.pattern)
            if "class" in match.groupdict():
                assert entry.row.label == match["class"], entry.where
            else:  # SSv2: the list's class token
                assert re.fullmatch(r"(train|val|test)\d+", entry.row.label), entry.where
        counts = {
            split: (len({e.row.label for e in entries if e.row.split == split}),
                    sum(e.row.split == split for e in entries))
            for split in ("train", "val", "test")
        }  # fmt: skip
        documented = [list(map(int, re.findall(r"[\d,]+", cell.replace(",", ""))))
                      for cell in (classes, videos)]  # fmt: skip
        assert [c for c, _ in counts.values()] == documented[0], name
        assert [v for _, v in counts.values()] == documented[1], name
    assert used == {p.pattern for patterns in layouts.values() for p in patterns}
    example = re.search(r"So `--dataset hmdb --video-root (\S+)` reads\s+`(\S+)`", text)
    entries = import_splits("molo", SPLITS / "molo" / "hmdb51", example[1], "hmdb")
    assert example[2] in {str(entry.row.path) for entry in entries}


# ---------------------------------------------------------------------------------------------
# The papers' figures


def paper_cell(cell: str, recipe: str, shot: int) -> None:
    figure = load_recipe(recipe).paper.accuracy(shot)
    if figure is None:
        assert cell.startswith("missing"), f"{recipe} {shot}-shot: {cell!r}, the recipe has none"
    else:
        assert cell == f"{figure:.1f}", f"{recipe} {shot}-shot: {cell!r}, the recipe has {figure}"


def test_the_papers_figures_are_the_recipes():
    """The reproduce page quotes each recipe's figures and says "missing" where tats has none
    (never "not stated": the papers do report them). The README's reproduction table:
    tests/test_recipes.py."""
    readme = (ROOT / "README.md").read_text()
    page = (ROOT / "docs" / "reproduce.md").read_text()
    listed = set()
    for _, _, recipe, shot_1, shot_5, *_ in table(page, "| dataset | method | recipe |"):
        name = code_spans(recipe)[0]
        paper_cell(shot_1, name, 1)
        paper_cell(shot_5, name, 5)
        listed.add(name)
    assert listed == set(recipe_names())
    assert "not stated" not in readme and "not stated" not in page
