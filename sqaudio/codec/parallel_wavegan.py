"""The one place that imports parallel-wavegan (0.6.1) and handles its quirks.

Quirks handled here, without forking the package:
- `parallel_wavegan/layers/pqmf.py` does `from scipy.signal import kaiser`, which scipy >= 1.13 removed
  (every `parallel_wavegan.models` import goes through it). `scipy.signal.windows.kaiser` is the same
  function, so we alias it on `scipy.signal` before the first parallel-wavegan import.
- Its losses call `torch.stft(return_complex=False)` and `distutils.LooseVersion`, and its models use the old
  `torch.nn.utils.weight_norm`: those deprecation warnings are silenced (they are not ours to fix).
- Several constructors mutate their dict arguments (`upsample_params.update(...)`), so params are deep-copied.
- The generators have different calling conventions (noise inputs, context windows, sub-bands):
  `Generator` gives them all one: normalised mel (B, n_mels, frames) -> waveform (B, frames * hop).
"""
from __future__ import annotations

import copy
import inspect
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.signal
import scipy.signal.windows
import torch
import torch.nn.functional as F
import yaml

from sqaudio.errors import UserError

if not hasattr(scipy.signal, "kaiser"):  # removed in scipy 1.13; parallel-wavegan's PQMF still imports it
    scipy.signal.kaiser = scipy.signal.windows.kaiser

for _pattern in (r"distutils Version classes are deprecated", r"stft with return_complex=False",
                 r"torch\.nn\.utils\.weight_norm is deprecated"):
    warnings.filterwarnings("ignore", message=_pattern)

from parallel_wavegan import losses as pwg_losses  # noqa: E402  (after the kaiser alias)
from parallel_wavegan import models as pwg_models  # noqa: E402
from parallel_wavegan.layers import PQMF  # noqa: E402

GENERATORS: dict[str, type[torch.nn.Module]] = {
    "HiFiGANGenerator": pwg_models.HiFiGANGenerator,
    "ParallelWaveGANGenerator": pwg_models.ParallelWaveGANGenerator,
    "MelGANGenerator": pwg_models.MelGANGenerator,
    "StyleMelGANGenerator": pwg_models.StyleMelGANGenerator,
}
DISCRIMINATORS: dict[str, type[torch.nn.Module]] = {
    "HiFiGANMultiScaleMultiPeriodDiscriminator": pwg_models.HiFiGANMultiScaleMultiPeriodDiscriminator,
    "HiFiGANMultiScaleDiscriminator": pwg_models.HiFiGANMultiScaleDiscriminator,
    "HiFiGANMultiPeriodDiscriminator": pwg_models.HiFiGANMultiPeriodDiscriminator,
    "ParallelWaveGANDiscriminator": pwg_models.ParallelWaveGANDiscriminator,
    "ResidualParallelWaveGANDiscriminator": pwg_models.ResidualParallelWaveGANDiscriminator,
    "MelGANMultiScaleDiscriminator": pwg_models.MelGANMultiScaleDiscriminator,
    "StyleMelGANDiscriminator": pwg_models.StyleMelGANDiscriminator,
}
# Which constructor argument receives the mel channels, per generator.
_MEL_CHANNELS_ARG = {"HiFiGANGenerator": "in_channels", "MelGANGenerator": "in_channels",
                     "ParallelWaveGANGenerator": "aux_channels", "StyleMelGANGenerator": "aux_channels"}

MultiResolutionSTFTLoss = pwg_losses.MultiResolutionSTFTLoss
MelSpectrogramLoss = pwg_losses.MelSpectrogramLoss
GeneratorAdversarialLoss = pwg_losses.GeneratorAdversarialLoss
DiscriminatorAdversarialLoss = pwg_losses.DiscriminatorAdversarialLoss
FeatureMatchLoss = pwg_losses.FeatureMatchLoss


def _defaults(cls: type) -> dict[str, Any]:
    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
            if name != "self" and p.default is not inspect.Parameter.empty}


def build(registry: dict[str, type], kind: str, params: dict[str, Any], what: str) -> torch.nn.Module:
    """Instantiate registry[kind](**params) with one-line errors for unknown names, keys or bad values."""
    if kind not in registry:
        raise UserError(f"unknown {what} type '{kind}' (valid: {', '.join(registry)})")
    cls = registry[kind]
    valid = _defaults(cls)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise UserError(f"{what}_params: unknown key(s) {', '.join(unknown)} for {kind} (valid: {', '.join(valid)})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return cls(**copy.deepcopy(params))
    except (AssertionError, ValueError, TypeError, AttributeError) as err:
        reason = str(err) or traceback.extract_tb(err.__traceback__)[-1].line or type(err).__name__
        raise UserError(f"invalid {what}_params for {kind}: {' '.join(reason.split())}") from None


def upsample_factor(kind: str, params: dict[str, Any]) -> int:
    """Samples per input frame of one output channel (times the sub-bands it is the hop size)."""
    merged = {**_defaults(GENERATORS[kind]), **params}
    if kind == "ParallelWaveGANGenerator":
        if not merged.get("upsample_conditional_features", True):
            return 1
        return int(np.prod(merged["upsample_params"]["upsample_scales"]))
    return int(np.prod(merged["upsample_scales"]))


class Generator(torch.nn.Module):
    """A parallel-wavegan generator behind one convention: mel (B, n_mels, frames) -> wav (B, frames * hop).

    Args:
        kind: a `GENERATORS` key (parallel-wavegan class name).
        params: constructor arguments; the mel-channel argument defaults to `n_mels`.
        n_mels: mel bands of the input.
        hop_length: samples per frame; must equal the generator's upsampling times its sub-bands.
        pqmf_params: extra PQMF arguments (taps, cutoff_ratio, beta) for multi-band output (out_channels > 1).
    """

    def __init__(self, kind: str, params: dict[str, Any], n_mels: int, hop_length: int,
                 pqmf_params: dict[str, Any] | None = None):
        super().__init__()
        params = dict(params)
        arg = _MEL_CHANNELS_ARG.get(kind)
        if arg is not None and params.setdefault(arg, n_mels) != n_mels:
            raise UserError(f"generator_params.{arg} is {params[arg]} but the features have {n_mels} mel bands")
        self.net = build(GENERATORS, kind, params, "generator")
        self.kind = kind
        self.hop_length = hop_length
        self.subbands = int({**_defaults(GENERATORS[kind]), **params}.get("out_channels", 1))
        factor = upsample_factor(kind, params) * self.subbands
        if factor != hop_length:
            raise UserError(f"generator upsampling x{factor} (upsample scales x sub-bands) must equal the "
                            f"features' hop_length {hop_length}")
        self.pqmf = PQMF(subbands=self.subbands, **(pqmf_params or {})) if self.subbands > 1 else None

    def forward(self, mel: torch.Tensor, return_subbands: bool = False):
        """mel (B, n_mels, frames) -> wav (B, frames * hop) [, sub-band output (B, subbands, samples / subbands)]."""
        frames = mel.size(-1)
        net = self.net
        if self.kind == "ParallelWaveGANGenerator":
            context = net.aux_context_window
            cond = F.pad(mel, (context, context), mode="replicate") if context else mel
            noise = torch.randn(mel.size(0), 1, frames * self.hop_length, device=mel.device, dtype=mel.dtype)
            out = net(noise, cond)  # (B, 1, samples)
        elif self.kind == "StyleMelGANGenerator":
            # As its own `inference`: noise for whole noise-upsampling blocks, mel padded to match, then cropped.
            blocks = (frames - 1) // int(net.noise_upsample_factor) + 1
            noise = torch.randn(mel.size(0), net.in_channels, blocks, device=mel.device, dtype=mel.dtype)
            padded = blocks * int(net.noise_upsample_factor)
            out = net(F.pad(mel, (0, padded - frames), mode="replicate"), noise)
        else:
            out = net(mel)  # (B, out_channels, samples / subbands)
        bands = out
        if self.pqmf is not None:
            out = self.pqmf.synthesis(bands)
        wav = out[:, 0, : frames * self.hop_length]  # (B, samples)
        return (wav, bands) if return_subbands else wav

    def remove_weight_norm(self) -> None:
        """Fold weight norm into plain weights (faster inference; parallel-wavegan's own method)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.net.remove_weight_norm()


def build_discriminator(kind: str, params: dict[str, Any]) -> torch.nn.Module:
    return build(DISCRIMINATORS, kind, params, "discriminator")


def min_discriminator_samples(kind: str, params: dict[str, Any]) -> int:
    """Shortest waveform crop a discriminator accepts (StyleMelGAN draws random windows from it)."""
    if kind == "StyleMelGANDiscriminator":
        return max({**_defaults(DISCRIMINATORS[kind]), **params}["window_sizes"]) + 1
    return 1


# ---- pretrained parallel-wavegan model directories (config.yml, checkpoint-*steps.pkl, stats.h5|npy) ----

@dataclass
class Pretrained:
    """A loaded parallel-wavegan model directory.

    Args:
        root / checkpoint: the directory and the checkpoint used; config: its config.yml.
        generator: the generator (weights loaded, weight norm folded); mean / scale: the log10-mel statistics.
        grid: sample_rate, hop_length, n_fft, win_length, window, n_mels, fmin, fmax of its features.
    """

    root: Path
    checkpoint: Path
    config: dict[str, Any]
    generator: Generator
    mean: np.ndarray
    scale: np.ndarray
    grid: dict[str, Any]


def load_pretrained(path: Path) -> Pretrained:
    """A parallel-wavegan model directory: config.yml + newest checkpoint-*.pkl (or the given one) + stats."""
    root = path if path.is_dir() else path.parent
    checkpoint_path = path if path.is_file() else find_checkpoint(root)
    if checkpoint_path is None:
        raise UserError(f"{root} has config.yml but no checkpoint-*.pkl")
    conf = read_config(root / "config.yml")
    stats = read_stats(root)
    if stats is None:
        raise UserError(f"{root} has no stats.h5 or stats.npy (the mean/scale its log-mel was normalised with)")
    grid = feature_grid(conf, root)
    if stats[0].size != grid["n_mels"] or stats[1].size != grid["n_mels"]:
        raise UserError(f"{root}: stats have {stats[0].size} bands but config.yml says num_mels {grid['n_mels']}")
    kind = str(conf.get("generator_type", "ParallelWaveGANGenerator"))
    if kind not in GENERATORS:
        raise UserError(f"{root}: generator_type {kind} is not supported (supported: {', '.join(GENERATORS)})")
    generator = Generator(kind, conf.get("generator_params") or {}, grid["n_mels"], grid["hop_length"],
                          pqmf_params(conf))
    state = load_generator_state(checkpoint_path)
    state = {k: v for k, v in state.items() if k not in ("mean", "scale")}  # stats buffers, if registered
    try:
        generator.net.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"{checkpoint_path} does not match the generator in config.yml: "
                        f"{str(err).splitlines()[0]}") from None
    generator.remove_weight_norm()
    return Pretrained(root, checkpoint_path, conf, generator.eval(), stats[0], stats[1], grid)


def feature_grid(conf: dict[str, Any], root: Path) -> dict[str, Any]:
    """The analysis settings of a parallel-wavegan config (its defaults for win_length, fmin, fmax)."""
    try:
        rate, hop, n_fft, n_mels = (int(conf[k]) for k in ("sampling_rate", "hop_size", "fft_size", "num_mels"))
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{root / 'config.yml'}: missing or invalid setting {err}") from None
    return {"sample_rate": rate, "hop_length": hop, "n_fft": n_fft, "win_length": int(conf.get("win_length") or n_fft),
            "window": str(conf.get("window") or "hann"), "n_mels": n_mels, "fmin": float(conf.get("fmin") or 0.0),
            "fmax": float(conf.get("fmax") or rate / 2)}


def read_config(path: Path) -> dict[str, Any]:
    try:
        conf = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not plain YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(conf, dict):
        raise UserError(f"{path} is not a parallel-wavegan config (expected a mapping)")
    return conf


def pqmf_params(conf: dict[str, Any]) -> dict[str, Any]:
    """parallel-wavegan's own rule: config pqmf_params, or the pre-0.4.3 defaults for old configs."""
    if "pqmf_params" in conf:
        return dict(conf["pqmf_params"])
    version = tuple(int(p) for p in str(conf.get("version", "0.1.0")).split(".")[:3] if p.isdigit())
    return dict(taps=62, cutoff_ratio=0.15, beta=9.0) if version <= (0, 4, 2) else {}


def find_checkpoint(root: Path) -> Path | None:
    """Newest `checkpoint-<N>steps.pkl` in a directory, or None."""
    found = []
    for path in root.glob("checkpoint-*.pkl"):
        digits = "".join(ch for ch in path.stem.removeprefix("checkpoint-") if ch.isdigit())
        found.append((int(digits) if digits else -1, path))
    return max(found)[1] if found else None


def read_stats(root: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean, scale) of the log10 mel the model was trained on, from stats.h5 or stats.npy; None if absent."""
    if (root / "stats.h5").is_file():
        import h5py
        with h5py.File(root / "stats.h5", "r") as f:
            return np.asarray(f["mean"]).reshape(-1), np.asarray(f["scale"]).reshape(-1)
    if (root / "stats.npy").is_file():
        stats = np.load(root / "stats.npy", allow_pickle=False)
        return stats[0].reshape(-1), stats[1].reshape(-1)
    return None


def load_generator_state(path: Path) -> dict[str, torch.Tensor]:
    """The generator state_dict of a parallel-wavegan checkpoint, loaded with weights_only=True."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load {path} safely (weights_only=True refused it: {first}); "
                        "re-save it with only tensors and dicts") from None
    try:
        return dict(state["model"]["generator"])
    except (KeyError, TypeError):
        raise UserError(f"{path} has no ['model']['generator'] entry: not a parallel-wavegan checkpoint") from None


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

