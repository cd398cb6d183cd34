# One command sets everything up and runs the main job (make demo); one sets up and tests (make test).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench serve clean

setup: $(STAMP)

# The venv is rebuilt only when the requirements change. torch/torchvision are pinned in pyproject.toml
# and requirements.lock; pip takes them from the local package cache.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/cxrlens demo --out runs/demo

test: setup
	bash scripts/install_browser.sh
	$(BIN)/ruff check src tests bench
	$(BIN)/pytest -p no:cacheprovider
	bash scripts/numerics.sh

# Every registered model's demo run (`cxrlens models` lists the registry).
serve: setup
	$(BIN)/cxrlens serve $(addprefix --runs runs/demo/,$(shell $(BIN)/cxrlens models)) --data data/cxr3

lint: setup
	$(BIN)/ruff check src tests bench

bench: setup
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf $(VENV) runs
