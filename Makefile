# The README's two commands. Both create .venv with the package and its dev extra first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo

.PHONY: demo test lint clean gpu-check wheels screenshots status-box

$(BIN)/tats: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# The demo: synthetic motion videos, LK tracks, weight-free `pixels` features, a small model
# (configs/demo.json) and the appearance-only baseline trained alike, then
# $(DEMO_DIR)/run/report.md. Under 10 minutes on a 2-core CPU. Rerunning resumes every stage.
DEMO_VIDEOS ?= 10
DEMO_RUN = $(BIN)/tats run --manifest $(DEMO_DIR)/data/manifest.csv --out $(DEMO_DIR)/run \
	--tracker lk --grid 8 --subset 64 --backbone pixels --views 2 --train-config configs/demo.json

demo: $(BIN)/tats
	started=$$(date +%s) && \
	$(MAKE) --no-print-directory $(DEMO_DIR)/data/manifest.csv && \
	$(DEMO_RUN) && \
	$(DEMO_RUN) --tracks-mode frozen --train-out baseline && \
	$(BIN)/tats report $(DEMO_DIR)/run --started $$started

$(DEMO_DIR)/data/manifest.csv: | $(BIN)/tats
	$(BIN)/tats synth --out $(DEMO_DIR)/data --videos-per-class $(DEMO_VIDEOS)

test: $(BIN)/tats
	$(BIN)/python -m pytest -ra

lint: $(BIN)/tats
	$(BIN)/ruff check tats tests benchmarks tools

# The site's screenshots (docs/screenshots/, with the SHA-256 of the pages they show, which
# tests/test_site.py compares): builds the site and opens its pages in headless Chromium
# (Debian: apt-get install chromium).
screenshots: $(BIN)/tats
	$(BIN)/python tools/screenshots.py

# The status box of README.md and docs/index.md, from benchmarks/results/ (tests/test_site.py
# checks it is current).
status-box:
	$(PYTHON) tools/status.py --write

# The GPU check (docs/gpu-check.md): the CUDA tests and the GPU benchmarks in at most 8
# minutes, into $(GPU_CHECK_OUT). It needs no .venv: on a GPU machine it runs with that
# machine's python3 and the wheels `make wheels` fetched into benchmarks/wheels.
GPU_CHECK_OUT ?= benchmarks/results/gpu-check
gpu-check:
	benchmarks/gpu_check.sh $(GPU_CHECK_OUT)

wheels: $(BIN)/tats
	benchmarks/fetch_wheels.sh

clean:
	rm -rf $(VENV) $(DEMO_DIR)
