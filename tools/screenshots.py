"""The site's screenshots: build the site, open pages in headless Chromium, and write PNGs
into docs/screenshots/ with the SHA-256 of what each one shows (`sources.json`), which
tests/test_site.py compares with the pages as they are, so a screenshot never goes stale.

    python tools/screenshots.py      # make screenshots

Needs mkdocs (the docs extra) and Chromium (Debian: apt-get install chromium).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
OUT = DOCS / "screenshots"
SOURCES = OUT / "sources.json"
# PNG -> (the page's source in docs/, window width and height in CSS px)
PAGES = {
    "index.png": ("index.md", 1280, 1100),
    "index-narrow.png": ("index.md", 400, 1600),
    "your-videos.png": ("your-videos.md", 1280, 1100),
    "your-cluster.png": ("your-cluster.md", 1280, 1100),
    "reproduce.png": ("reproduce.md", 1280, 1100),
}
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
    "--force-device-scale-factor=1",
)  # fmt: skip
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)|src(?:set)?=\"([^\"]+)\"")
SNIPPET = re.compile(r'^--8<-- "([^"]+)"', re.M)


def page_sources(page: str) -> list[Path]:
    """The files a page's screenshot shows: the page, the snippets it includes and the local
    pictures it draws."""
    path = DOCS / page
    text = path.read_text()
    found = [path] + [ROOT / name for name in SNIPPET.findall(text)]
    for match in IMAGE.finditer(text):
        target = match.group(1) or match.group(2)
        if "://" not in target and (DOCS / target).is_file():
            found.append(DOCS / target)
    return found


def page_digest(page: str) -> str:
    """SHA-256 over the names and bytes of the page's sources."""
    digest = hashlib.sha256()
    for path in page_sources(page):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def chromium() -> str:
    for name in BROWSERS:
        if found := shutil.which(name):
            return found
    raise SystemExit(
        "no Chromium found (chromium, chromium-browser or google-chrome); on Debian or "
        "Ubuntu: apt-get update && apt-get install -y chromium"
    )


def build_site(site: Path) -> None:
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(site)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"mkdocs build failed:\n{done.stdout}{done.stderr}")


def shoot(browser: str, html: Path, png: Path, width: int, height: int, profile: Path) -> None:
    """One screenshot of a built page, in a fresh browser profile."""
    command = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
               f"--window-size={width},{height}", f"--screenshot={png}", html.as_uri()]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    if done.returncode != 0 or not png.is_file():
        raise SystemExit(f"{browser} made no screenshot of {html}:\n{done.stderr[-2000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="Folder for the PNGs.")
    args = parser.parse_args()
    browser = chromium()
    args.out.mkdir(parents=True, exist_ok=True)
    record = {}
    with tempfile.TemporaryDirectory(prefix="tats-site-") as tmp:
        site = Path(tmp) / "site"
        build_site(site)
        for png, (page, width, height) in PAGES.items():
            html = site / ("index.html" if page == "index.md" else f"{page[:-3]}/index.html")
            with tempfile.TemporaryDirectory(prefix="chromium-", dir=tmp) as profile:
                shoot(browser, html, args.out / png, width, height, Path(profile))
            record[png] = {"page": f"docs/{page}", "window": [width, height],
                           "sha256": page_digest(page)}  # fmt: skip
            print(f"{args.out / png}: docs/{page} at {width}x{height}")
    if args.out.resolve() == OUT.resolve():
        SOURCES.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
