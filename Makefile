# `make demo` and `make test` work on a fresh clone: both build the virtual environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/femnist/femnist_digits.npz
RUN ?= runs/demo
METHOD ?= completion-gan
export INKFILL_DATA ?= $(DATA)

.PHONY: demo test lint format clean browser

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

# The main job on the bundled FEMNIST digits: fit, fill every empty cell, draw what was filled.
demo: $(VENV)/.installed
	$(BIN)/inkfill data --preview $(RUN)/preview.png
	$(BIN)/inkfill fit --method $(METHOD) --out $(RUN)/$(METHOD) --overwrite
	$(BIN)/inkfill fill --run $(RUN)/$(METHOD) --missing --per-cell 16 --out $(RUN)/filled.npz
	$(BIN)/inkfill data --preview $(RUN)/filled.png --filled $(RUN)/filled.npz --preview-writers 16
	@echo "demo: run in $(RUN)/$(METHOD) (figures/), fills in $(RUN)/filled.npz, preview $(RUN)/filled.png"

lint: $(VENV)/.installed
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# The browser tests drive Debian's chromium; as root, install it if it is missing.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			export DEBIAN_FRONTEND=noninteractive; \
			apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || { apt-get update -q \
			>/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }; \
		else echo "no /usr/bin/chromium: the browser tests will be skipped"; fi; fi

test: lint browser
	$(BIN)/python -m pytest -q

format: $(VENV)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
