# Two entry points for a fresh clone: `make demo` and `make test` (each creates .venv when missing).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test system clean

setup: $(STAMP)

# torch/torchvision wheels come from local disk (pip cap in /etc/xdg/pip); parallel-wavegan 0.6.1 is an
# sdist whose setup.py imports pip, so it must be built without build isolation. pesq 0.0.4 is a C/Cython sdist
# without a pyproject.toml: Cython and numpy must be in the venv before it is built (no build isolation).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade wheel setuptools
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.0
	$(PY) -m pip install -q --no-build-isolation parallel-wavegan==0.6.1
	$(PY) -m pip install -q Cython==3.3.1 numpy==2.4.6
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sqaudio demo demo_out

test: $(STAMP) system
	$(PY) -m pytest

# Debian packages the tests use, installed when missing and we are root (as CI is): chromium and chromium-driver
# (the listening-page browser test, tests/evaluation/test_report.py) and dataset-fashion-mnist (the real
# Fashion-MNIST files, tests/data/test_images.py). Without them those tests skip, except under CI=true, where
# they fail.
SYSTEM_PACKAGES := chromium chromium-driver dataset-fashion-mnist
SYSTEM_FILES := /usr/bin/chromium /usr/bin/chromedriver /usr/share/datasets/fashion-mnist

system:
	@missing=""; for f in $(SYSTEM_FILES); do [ -e $$f ] || missing="$$missing $$f"; done; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSTEM_PACKAGES); \
	else echo "note: missing$$missing (as root: apt-get install $(SYSTEM_PACKAGES)); the tests that need them will skip"; fi

clean:
	rm -rf $(VENV) demo_out
