#!/usr/bin/env bash
# Fill .whl/ with exactly the wheels the GPU image lacks for benchmarks/gpu_check.sh and gpu_comparison.sh
# (docs/gpu.md): CPython 3.12, manylinux x86-64, one version each, no dependencies (the image has the rest:
# torch 2.11.0+cu130, numpy, scipy, numba, scikit-learn, joblib, msgpack, lazy-loader, filelock, h5py, ...).
# Run it where pip reaches PyPI; the GPU machine installs them offline (gpu_check.py install).
#
#   bash benchmarks/gpu_wheels.sh            PYTHON: the interpreter whose pip downloads and builds (default
#                                            .venv/bin/python); WHEELS: the folder (default .whl)
#
# Why each one (what sqaudio imports on the measured paths):
#   torchaudio 2.11.0   data/features, data/audio, codec/vocoders (torchaudio.functional); the +cu130 build of
#                       the image's torch 2.11.0
#   soundfile 0.14.0    data/audio, data/store, data/synthetic (wheel bundles libsndfile)
#   cffi 2.1.1          soundfile's binding (_cffi_backend; its precompiled ABI module needs no pycparser)
#   librosa 0.11.0      parallel-wavegan's losses (librosa.filters.mel), with what that import path needs and
#   decorator 5.3.2,    the image lacks: decorator, pooch (librosa.util.files imports it at load time) and
#   pooch 1.9.0,        platformdirs; not audioread, soxr or requests, which only loading and downloading audio
#   platformdirs 4.14.9 import (checked by hiding every module the image lacks and running the CPU smoke mode)
#   parallel-wavegan 0.6.1  codec/parallel_wavegan (the vocoders): an sdist, built here into a py3-none-any wheel
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WHEELS=${WHEELS:-.whl}
mkdir -p "$WHEELS"
rm -f "$WHEELS"/*.whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$WHEELS" torchaudio==2.11.0 soundfile==0.14.0 cffi==2.1.1 librosa==0.11.0 \
  decorator==5.3.2 pooch==1.9.0 platformdirs==4.14.9
"$PY" -m pip wheel -q --no-deps --no-build-isolation parallel-wavegan==0.6.1 -w "$WHEELS"
ls -l "$WHEELS"
du -sh "$WHEELS"
