# Two commands from a fresh clone: `make run` and `make test`. Both create .venv with the
# pinned set (constraints.txt) when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bank clean-venv

# TORCH_INDEX=https://download.pytorch.org/whl/cpu installs PyTorch's CPU build first (no CUDA libraries);
# the pinned install then keeps it, as it meets the same version pins.
TORCH_INDEX ?=

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH_INDEX),$(PY) -m pip install --quiet -c constraints.txt --index-url $(TORCH_INDEX) torch torchvision)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) scripts/svi_fit.py $(ARGS)

bank: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) scripts/build_bank.py

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
