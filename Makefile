# The README's two commands. Both create .venv with the package and its dev extra first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo

.PHONY: demo test lint clean

$(BIN)/tats: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# The demo: synthetic motion videos, LK tracks, weight-free `pixels` features, a small model
# (configs/demo.json); about 10 minutes on a 2-core CPU. Rerunning resumes every stage.
demo: $(BIN)/tats $(DEMO_DIR)/data/manifest.csv
	$(BIN)/tats run --manifest $(DEMO_DIR)/data/manifest.csv --out $(DEMO_DIR)/run --tracker lk --grid 8 \
		--backbone pixels --views 2 --train-config configs/demo.json

$(DEMO_DIR)/data/manifest.csv: | $(BIN)/tats
	$(BIN)/tats synth --out $(DEMO_DIR)/data --videos-per-class 10

test: $(BIN)/tats
	$(BIN)/python -m pytest -ra

lint: $(BIN)/tats
	$(BIN)/ruff check tats tests benchmarks

clean:
	rm -rf $(VENV) $(DEMO_DIR)
