# The two commands of the README:  `make run`  (the product)  and  `make test`  (the whole suite).
# Each sets itself up: a virtual environment in .venv with everything installed.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: run serve test test-sweep lint typecheck contracts pytest venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU-only hosts: the local CPU wheel first, so nothing pulls a CUDA build of torch.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

# The end-to-end demo once it exists; until then the receiver with embedded defaults.
run: $(STAMP)
	@if $(BIN)/pacs-triage demo --help >/dev/null 2>&1; then \
		$(BIN)/pacs-triage demo; \
	else \
		$(BIN)/pacs-triage serve; \
	fi

serve: $(STAMP)
	$(BIN)/pacs-triage serve

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# The rooms of DESIGN.md: [tool.importlinter] in pyproject.toml (layers, independence, no cycles).
contracts: $(STAMP)
	$(BIN)/lint-imports --no-logo

pytest: $(STAMP)
	$(BIN)/pytest -m 'not sweep'

# The demo's volume sweep (issue 13 item 8): 40 phantoms through the demo pipeline, ~20 min on 2 cores.
test-sweep: $(STAMP)
	$(BIN)/pytest -m sweep

test: lint typecheck contracts pytest

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .import_linter_cache
