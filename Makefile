# Two commands from a fresh clone: `make run` and `make test`. Both create .venv with the
# pinned set (constraints.txt) when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bank clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
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
