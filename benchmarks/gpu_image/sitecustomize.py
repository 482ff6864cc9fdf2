"""Hide from this Python the modules the GPU image lacks and .whl/ does not bring (docs/gpu.md): with this folder
on PYTHONPATH, the CPU smoke mode of benchmarks/gpu_check.sh shows whether the wheel list covers every import.

    PYTHONPATH=benchmarks/gpu_image GPU_CHECK_CPU=1 PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh OUTDIR
"""
import sys

HIDDEN = {"audioread", "soxr", "requests", "pesq", "pystoi", "kaldiio", "tensorboardX", "torchvision", "yq",
          "typeguard", "pycparser", "resampy", "gdown"}


class HideMissing:
    """A meta path finder that fails the import of a hidden top-level module as if it were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named '{name}' (hidden: not on the GPU image)", name=name)
        return None


sys.meta_path.insert(0, HideMissing())
