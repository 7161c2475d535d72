# Two commands do all the set-up on a fresh clone: `make demo` and `make test`.
# Both depend on `make setup`, which only creates/updates .venv (idempotent: it reinstalls only when
# requirements.txt changed).

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed

.PHONY: setup demo test lint clean-venv help

help:
	@echo "make demo   - set up .venv, simulate a phantom PET scan at DRF 20 and denoise it with UniPET"
	@echo "make test   - set up .venv, lint (ruff) and run the whole test suite"
	@echo "make lint   - ruff check + ruff format --check (ruff.toml)"
	@echo "make setup  - create/update .venv from requirements.txt (CPU torch, exact pins)"

setup: $(STAMP)

$(STAMP): requirements.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"UniPET needs Python 3.11, found {sys.version.split()[0]}: set PYTHON=/path/to/python3.11"'
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch in any resolver step would pull a multi-GB CUDA build.
	$(VPY) -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
	$(VPY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@$(VPY) -c 'import torch, monai; print(f"setup ok: torch {torch.__version__}, monai {monai.__version__}, cuda={torch.cuda.is_available()}")'
	# the fused CPU kernel built once now (~1 min; g++ and ninja), not in the first inference; without them
	# it says so and inference runs PyTorch's passes (the same numbers)
	cd unipet_bundle && ../$(VPY) -m scripts.networks.fused_pad
	@touch $@

demo: setup
	cd unipet_bundle && ../$(VPY) -m scripts.demo $(ARGS)

test: setup lint
	$(VPY) -m pytest

# ruff.toml: line length 120, pyflakes + pycodestyle + import order; the formatter owns the layout
lint: setup
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .

clean-venv:
	rm -rf $(VENV)
