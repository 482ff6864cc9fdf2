# Two entry points for a fresh clone: `make demo` and `make test` (each creates .venv when missing).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test system check-minimum clean

setup: $(STAMP)

# Exact versions come from requirements/lock.txt (pyproject.toml declares ranges). torch/torchvision wheels come
# from local disk here (pip cap in /etc/xdg/pip). parallel-wavegan 0.6.1 is an sdist whose setup.py imports pip, so
# it is built without build isolation; so is pesq 0.0.4 (a C/Cython sdist without a pyproject.toml: Cython and numpy
# must be in the venv before it is built).
LOCK := requirements/lock.txt
PIP := $(PY) -m pip install -q -c $(LOCK)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade wheel setuptools
	$(PIP) torch torchvision torchaudio Cython numpy
	$(PIP) --no-build-isolation parallel-wavegan pesq
	$(PIP) --no-build-isolation -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sqaudio demo demo_out

# The suite runs in one worker process per CPU core (pytest-xdist): most tests are single-threaded.
test: $(STAMP) system
	$(PY) -m pytest -n auto

# The lowest tested versions (requirements/minimum.txt, pyproject.toml's lower bounds) in a separate .venv-min:
# the whole suite but the golden test (its bit-exact numbers are
# those of the lock file's torch).
VENV_MIN := .venv-min
PIP_MIN := $(VENV_MIN)/bin/python -m pip install -q -c requirements/minimum.txt

check-minimum:
	test -x $(VENV_MIN)/bin/python || $(PYTHON) -m venv $(VENV_MIN)
	$(PIP_MIN) --upgrade wheel setuptools Cython
	$(PIP_MIN) torch torchvision torchaudio numpy
	$(PIP_MIN) --no-build-isolation parallel-wavegan pesq
	$(PIP_MIN) --no-build-isolation -e ".[dev]"
	$(VENV_MIN)/bin/python -m pytest -n auto tests --ignore=tests/test_golden.py -p no:cacheprovider

# Debian packages the tests use, installed when missing and we are root (as CI is): chromium and chromium-driver
# (the listening-page browser test, tests/evaluation/test_report.py) and dataset-fashion-mnist (the real
# Fashion-MNIST files, tests/data/test_images.py), Festival and three voices (the phone-aligned corpus,
# tests/data/test_festival.py). Without them those tests skip (the Fashion-MNIST and browser tests fail under CI=true,
# where they must run).
SYSTEM_PACKAGES := chromium chromium-driver dataset-fashion-mnist festival festvox-kallpc16k festvox-kdlpc16k \
	festvox-us-slt-hts
SYSTEM_FILES := /usr/bin/chromium /usr/bin/chromedriver /usr/share/datasets/fashion-mnist /usr/bin/festival \
	/usr/share/festival/voices/english/kal_diphone /usr/share/festival/voices/english/ked_diphone \
	/usr/share/festival/voices/us/cmu_us_slt_arctic_hts

system:
	@missing=""; for f in $(SYSTEM_FILES); do [ -e $$f ] || missing="$$missing $$f"; done; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSTEM_PACKAGES); \
	else echo "note: missing$$missing (as root: apt-get install $(SYSTEM_PACKAGES)); the tests that need them will skip"; fi

clean:
	rm -rf $(VENV) $(VENV_MIN) demo_out
