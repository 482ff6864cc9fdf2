"""Choosing the compute device: never hard-coded, CUDA when present unless the user says otherwise."""
from __future__ import annotations

import torch

from sqaudio.errors import UserError


def pick_device(name: str | None) -> torch.device:
    """`auto`/None: CUDA when present, else CPU; otherwise the named device (a UserError if it is not there)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}' (e.g. auto, cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"device '{name}' is not available here (CUDA devices: {torch.cuda.device_count()})")
    return device
