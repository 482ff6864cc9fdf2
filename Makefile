# Two entry points for a fresh clone: `make demo` and `make test` (each creates .venv when missing).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

# torch/torchvision wheels come from local disk (pip cap in /etc/xdg/pip); parallel-wavegan 0.6.1 is an
# sdist whose setup.py imports pip, so it must be built without build isolation.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade wheel setuptools
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.0
	$(PY) -m pip install -q --no-build-isolation parallel-wavegan==0.6.1
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sqaudio demo demo_out

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) demo_out
