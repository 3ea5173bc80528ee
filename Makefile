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

demo: $(BIN)/tats
	$(BIN)/python -m tats.demo --out $(DEMO_DIR)

test: $(BIN)/tats
	$(BIN)/python -m pytest -ra

lint: $(BIN)/tats
	$(BIN)/ruff check tats tests benchmarks

clean:
	rm -rf $(VENV) $(DEMO_DIR)
