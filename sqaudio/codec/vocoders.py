"""Vocoders: normalised log-mel (B, n_mels, frames) -> 16 kHz waveform (B, frames * hop).

Three kinds behind one `Vocoder` interface, all built by `load_vocoder(path_or_name, device)`:
- `griffin-lim`: inverts the feature definition (normalisation, dB, mel, pre-emphasis); needs no training.
- our own vocoder dirs / checkpoints (`sqaudio vocoder train`): a parallel-wavegan generator trained on
  exactly our features (config and feature config stored in every checkpoint).
- a pretrained parallel-wavegan model directory (config.yml, checkpoint-*steps.pkl, stats.h5|npy).

Compatibility: a vocoder takes features on the same analysis grid (rate, hop, n_fft, window, mel bands,
fmin/fmax) as the ones it was trained on. The rest of the convention converts exactly or nearly so
(`convert_logmel`): top_db and peak level exactly, log10 + z-scoring exactly, pre-emphasis approximately
(the filter's mean gain per mel band). Anything else is a `UserError` naming each differing setting.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchaudio.functional as AF
import yaml

from sqaudio import checkpoint
from sqaudio.config import RECIPES_DIR, FeatureConfig, apply_overrides, from_dict, load_recipe_dict, to_dict
from sqaudio.distributed import pick_device
from sqaudio.errors import UserError

GRIFFIN_LIM = "griffin-lim"
CHECKPOINT_FORMAT = "sqaudio-vocoder"
VOCODER_RECIPES = RECIPES_DIR / "vocoder"


# ------------------------------------------------------------------ config

@dataclass
class OptimizerConfig:
    """Adam-family optimizer and a learning-rate schedule that is a pure function of the step."""

    type: str = "Adam"               # Adam | AdamW | RAdam
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False
    schedule: str = "multistep"      # constant | multistep | step | exponential
    milestones: list[int] = field(default_factory=lambda: [200_000, 400_000, 600_000, 800_000])
    step_size: int = 200_000         # schedule=step: multiply by gamma every step_size steps
    gamma: float = 0.5               # exponential: per-step factor
    grad_norm: float = 10.0          # clip the gradient norm; <= 0: no clipping


@dataclass
class STFTLossConfig:
    """parallel-wavegan MultiResolutionSTFTLoss (spectral convergence + log magnitude); weight 0 = off."""

    weight: float = 0.0
    fft_sizes: list[int] = field(default_factory=lambda: [1024, 2048, 512])
    hop_sizes: list[int] = field(default_factory=lambda: [120, 240, 50])
    win_lengths: list[int] = field(default_factory=lambda: [600, 1200, 240])
    window: str = "hann_window"


@dataclass
class LossConfig:
    """Generator loss = aux_weight * (stft + subband_stft + mel) + adversarial * (adv + feat_match * fm).

    The mel loss (L1 of log10 mel) always uses the features' rate, n_fft, hop, window, bands and fmin/fmax.
    """

    stft: STFTLossConfig = field(default_factory=STFTLossConfig)
    subband_stft: STFTLossConfig = field(default_factory=lambda: STFTLossConfig(
        fft_sizes=[384, 683, 171], hop_sizes=[30, 60, 10], win_lengths=[150, 300, 60]))
    mel: float = 1.0
    aux_weight: float = 45.0
    adversarial: float = 1.0
    adversarial_type: str = "mse"    # mse | hinge
    average_by_discriminators: bool = False
    feat_match: float = 2.0          # 0 = off
    feat_match_average_by_layers: bool = False
    feat_match_include_final: bool = False


@dataclass
class VocoderTrainConfig:
    steps: int = 1_000_000
    batch_size: int = 16
    batch_frames: int = 50           # crop length in frames (x hop = samples)
    discriminator_start: int = 0     # adversarial losses and discriminator updates from this step
    recompute_after_generator_update: bool = True
    seed: int = 1234
    checkpoint_every: int = 10_000
    keep_last: int = 3
    log_every: int = 100
    eval_utterances: int = 8         # test-split crops scored (mel L1) at each checkpoint; 0 = off
    num_workers: int = 2
    cache_mb: int = 2048             # per-process cache of decoded training audio


@dataclass
class VocoderConfig:
    """A vocoder recipe (sqaudio/recipes/vocoder/*.yaml). Types/params are parallel-wavegan's own names.

    Args:
        generator_type / discriminator_type: class names in `sqaudio.codec.parallel_wavegan.GENERATORS` / `DISCRIMINATORS`.
        generator_params / discriminator_params: their constructor arguments (mel channels set from the data).
        pqmf_params: PQMF arguments when the generator has out_channels > 1 (multi-band).
    """

    name: str = "custom"
    generator_type: str = "HiFiGANGenerator"
    generator_params: dict[str, Any] = field(default_factory=dict)
    discriminator_type: str = "HiFiGANMultiScaleMultiPeriodDiscriminator"
    discriminator_params: dict[str, Any] = field(default_factory=dict)
    pqmf_params: dict[str, Any] = field(default_factory=dict)
    loss: LossConfig = field(default_factory=LossConfig)
    generator_optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    discriminator_optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: VocoderTrainConfig = field(default_factory=VocoderTrainConfig)


def list_vocoder_recipes() -> list[str]:
    return sorted(p.stem for p in VOCODER_RECIPES.glob("*.yaml"))


def load_vocoder_config(name_or_path: str | Path = "hifigan", overrides: list[str] | None = None,
                        base: dict[str, Any] | None = None) -> VocoderConfig:
    """A shipped recipe name (`hifigan`, `tiny`, ...) or a YAML path, or `base` (a saved config), + overrides."""
    if base is None:
        shipped = VOCODER_RECIPES / f"{str(name_or_path).removeprefix('vocoder/').removesuffix('.yaml')}.yaml"
        path = Path(name_or_path) if Path(name_or_path).is_file() else shipped
        if not path.is_file():
            raise UserError(f"vocoder recipe '{name_or_path}' not found (shipped: {', '.join(list_vocoder_recipes())}"
                            " or a YAML path)")
        base = load_recipe_dict(path)
    return from_dict(VocoderConfig, apply_overrides(base, overrides or []), "")


# ------------------------------------------------------------------ conventions and conversion

@dataclass(frozen=True)
class MelConvention:
    """What a vocoder's input mel means: the analysis grid plus the log/normalisation convention.

    Args:
        sample_rate, hop_length, n_fft, win_length, window, n_mels, fmin, fmax: the analysis grid.
        scale: "db_normalised" (ours: 20 log10(mel) / top_db + 1, floored at max - top_db) or "log10_zscore".
        preemphasis: the filter applied before the STFT (0 = none).
        top_db, peak: ours only. mean/scale: per-band z-scoring of log10 mel (log10_zscore only).
        layout: how the mel is laid out in the original tool (ours (mels, frames); parallel-wavegan (frames, mels)).
    The STFT padding mode is not part of it: it only changes the first and last frames.
    """

    sample_rate: int
    hop_length: int
    n_fft: int
    win_length: int
    window: str
    n_mels: int
    fmin: float
    fmax: float
    scale: str = "db_normalised"
    preemphasis: float = 0.0
    top_db: float = 80.0
    peak: float = 0.999
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    layout: str = "(mels, frames)"

    GRID = ("sample_rate", "hop_length", "n_fft", "win_length", "window", "n_mels", "fmin", "fmax")

    @classmethod
    def of(cls, cfg: FeatureConfig) -> "MelConvention":
        return cls(cfg.sample_rate, cfg.hop_length, cfg.n_fft, cfg.win_length, "hann", cfg.n_mels,
                   float(cfg.fmin), float(cfg.fmax if cfg.fmax is not None else cfg.sample_rate / 2),
                   "db_normalised", cfg.preemphasis, cfg.top_db, cfg.peak)

    def describe(self) -> dict[str, str]:
        out = {k: f"{getattr(self, k):g}" if isinstance(getattr(self, k), float) else str(getattr(self, k))
               for k in self.GRID}
        out["log scale"] = (f"dB normalised (dB/{self.top_db:g} + 1)" if self.scale == "db_normalised"
                            else "log10, z-scored with stats")
        out["pre-emphasis"] = f"{self.preemphasis:g}" if self.preemphasis else "none"
        out["peak normalisation"] = f"{self.peak:g}" if self.scale == "db_normalised" else "none"
        out["layout"] = self.layout
        return out


def differences(have: MelConvention, want: MelConvention) -> tuple[list[str], list[str]]:
    """(blocking, convertible) lists of 'setting: features X, vocoder Y' between two conventions."""
    a, b = have.describe(), want.describe()
    diff = [k for k in a if a[k] != b[k]]
    line = "{}: features {} vs vocoder {}".format
    return ([line(k, a[k], b[k]) for k in diff if k in MelConvention.GRID],
            [line(k, a[k], b[k]) for k in diff if k not in MelConvention.GRID])


def _fbank(conv: MelConvention) -> torch.Tensor:
    return AF.melscale_fbanks(conv.n_fft // 2 + 1, conv.fmin, conv.fmax, conv.n_mels, conv.sample_rate,
                              norm="slaney", mel_scale="slaney").T  # (mels, freqs)


def preemphasis_gain_db(conv: MelConvention, coef: float) -> torch.Tensor:
    """Per-band mean gain of the filter 1 - coef z^-1 in dB, (n_mels,): how it tilts a flat spectrum's mel."""
    fb = _fbank(conv).double()
    w = torch.linspace(0, torch.pi, fb.size(1), dtype=torch.float64)
    gain = torch.sqrt((1 - coef * torch.cos(w)) ** 2 + (coef * torch.sin(w)) ** 2)
    return (20 * torch.log10((fb @ gain) / fb.sum(1).clamp(min=1e-12))).float()


def convert_logmel(x: torch.Tensor, src: MelConvention, dst: MelConvention) -> torch.Tensor:
    """Re-express a mel (B, n_mels, frames) given in `src` in `dst` (same grid). Identity when equal."""
    if src == dst:
        return x
    db = (x - 1.0) * src.top_db if src.scale == "db_normalised" else \
        20.0 * (x * _col(src.std, x) + _col(src.mean, x))  # 20 log10(mel)
    if src.preemphasis != dst.preemphasis:
        tilt = preemphasis_gain_db(dst, dst.preemphasis) - preemphasis_gain_db(src, src.preemphasis)
        db = db + tilt.to(db)[:, None]
    if dst.scale == "log10_zscore":
        return (db / 20.0 - _col(dst.mean, x)) / _col(dst.std, x)
    if src.scale == "db_normalised":
        db = db + 20.0 * np.log10(dst.peak / src.peak)
    db = torch.maximum(db, db.amax(dim=(-2, -1), keepdim=True) - dst.top_db)
    return db / dst.top_db + 1.0


def _col(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]  # (n_mels, 1)


# ------------------------------------------------------------------ vocoders

class Vocoder:
    """Base class: `synthesize` turns a normalised log-mel in `self.features` into a waveform.

    Args:
        features: the feature definition `synthesize` expects (rebound by a successful `check_compatible`).
        device: where synthesis runs.
        name: shown in messages and reports.
    """

    def __init__(self, features: FeatureConfig, device: str | torch.device = "cpu", name: str = ""):
        self.features = features
        self.device = torch.device(device)
        self.name = name

    def native(self) -> MelConvention:
        """The convention the underlying model takes (features outside it are converted)."""
        return MelConvention.of(self.features)

    def check_compatible(self, features: FeatureConfig) -> None:
        """Raise UserError naming each differing setting unless `features` can feed this vocoder."""
        blocking, convertible = differences(MelConvention.of(features), self.native())
        if blocking:
            also = f"; convertible: {'; '.join(convertible)}" if convertible else ""
            raise UserError(f"vocoder {self.name} cannot take these features (no conversion across analysis "
                            f"grids): {'; '.join(blocking)}{also}")
        self.features = features

    def synthesize(self, logmel: torch.Tensor) -> torch.Tensor:
        """logmel (B, n_mels, frames) in `self.features` -> waveform (B, frames * hop) at its sample rate."""
        return self.finish(self.generate(logmel))

    def generate(self, logmel: torch.Tensor) -> torch.Tensor:
        """The waveform before `finish`: what runs window by window on long inputs (B, frames * hop)."""
        raise NotImplementedError

    whole_signal_finish = False  # True: `finish` depends on the whole signal (its peak), see `finish_with`

    def finish(self, wav: torch.Tensor) -> torch.Tensor:
        """Whole-signal post-processing after stitching windows (none by default)."""
        return self.finish_with(wav, wav.abs().amax(dim=-1, keepdim=True)) if self.whole_signal_finish else wav

    def finish_with(self, wav: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
        """`finish` of a block of the signal, given the whole signal's peak |sample| (B, 1): blockwise output."""
        return wav

    def _check_input(self, logmel: torch.Tensor) -> torch.Tensor:
        if logmel.dim() != 3 or logmel.size(1) != self.features.n_mels:
            raise UserError(f"vocoder input must be (batch, {self.features.n_mels} mels, frames), "
                            f"got {tuple(logmel.shape)}")
        return logmel.to(self.device, torch.float32)


class GriffinLimVocoder(Vocoder):
    """Inverts the feature definition: (x - 1) * top_db dB -> amplitude mel -> linear magnitude (pseudo-inverse
    of the Slaney filterbank, clamped at 0) -> fast Griffin-Lim -> de-emphasis 1 / (1 - p z^-1) -> peak.

    Args:
        n_iter: Griffin-Lim iterations (32: spectral convergence ~0.10 on a harmonic test signal, 64: ~0.08).
        momentum: fast Griffin-Lim momentum.
    """

    def __init__(self, features: FeatureConfig | None = None, device: str | torch.device = "cpu",
                 n_iter: int = 32, momentum: float = 0.99):
        super().__init__(features or FeatureConfig(), device, GRIFFIN_LIM)
        self.n_iter, self.momentum = n_iter, momentum

    def check_compatible(self, features: FeatureConfig) -> None:
        self.features = features  # inverts any feature definition

    def mel_to_linear(self, mel: torch.Tensor) -> torch.Tensor:
        """Amplitude mel (B, mels, frames) -> magnitude (B, freqs, frames): clamp(pinv(fbank) @ mel, 0).

        (A non-negative least-squares refinement fits the mel better but did not lower the spectral
        convergence of the result, so the plain pseudo-inverse is used.)"""
        fb = _fbank(MelConvention.of(self.features)).to(mel)  # (mels, freqs)
        return (torch.linalg.pinv(fb) @ mel).clamp(min=0)

    @torch.no_grad()
    def generate(self, logmel: torch.Tensor) -> torch.Tensor:
        cfg = self.features
        logmel = self._check_input(logmel)
        mel = 10.0 ** ((logmel - 1.0) * cfg.top_db / 20.0)  # (B, mels, frames) amplitude
        spec = self.mel_to_linear(mel)  # (B, freqs, frames)
        frames = logmel.size(-1)
        window = torch.hann_window(cfg.win_length, device=self.device)
        wav = AF.griffinlim(spec, window, cfg.n_fft, cfg.hop_length, cfg.win_length, power=1.0,
                            n_iter=self.n_iter, momentum=self.momentum, length=(frames - 1) * cfg.hop_length,
                            rand_init=False)
        wav = torch.nn.functional.pad(wav, (0, cfg.hop_length))  # (B, frames * hop), like the neural vocoders
        if cfg.preemphasis:
            a = torch.tensor([1.0, -cfg.preemphasis], device=self.device)
            b = torch.tensor([1.0, 0.0], device=self.device)
            wav = AF.lfilter(wav, a, b, clamp=False)
        return wav

    whole_signal_finish = True

    def finish_with(self, wav: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
        """Peak-normalise to the features' peak level (the peak over the whole signal)."""
        return wav / peak.clamp(min=1e-8) * self.features.peak


class NeuralVocoder(Vocoder):
    """A parallel-wavegan generator (ours or pretrained) with the conversion into its native convention.

    Args:
        generator: `sqaudio.codec.parallel_wavegan.Generator` (weight norm already removed, eval mode).
        native: the convention the generator was trained on.
        features: the features it is fed (default: ours on the native grid).
        info: checkpoint facts for `vocoder info` (step, recipe, ...).
    """

    def __init__(self, generator: torch.nn.Module, native: MelConvention, features: FeatureConfig,
                 device: str | torch.device = "cpu", name: str = "", info: dict[str, Any] | None = None):
        super().__init__(features, device, name)
        self.generator = generator.to(self.device).eval()
        self._native = native
        self.info = info or {}

    def native(self) -> MelConvention:
        return self._native

    @torch.no_grad()
    def generate(self, logmel: torch.Tensor) -> torch.Tensor:
        x = convert_logmel(self._check_input(logmel), MelConvention.of(self.features), self._native)
        return self.generator(x)  # (B, frames * hop)


def load_vocoder(path_or_name: str | Path, device: str | torch.device = "cpu",
                 features: FeatureConfig | None = None) -> Vocoder:
    """`griffin-lim`, one of our vocoder dirs (newest checkpoint) or checkpoint files, or a pretrained
    parallel-wavegan directory. With `features`, also `check_compatible(features)`."""
    device = pick_device(str(device)) if not isinstance(device, torch.device) else device
    path = Path(path_or_name)
    if str(path_or_name) == GRIFFIN_LIM:
        vocoder: Vocoder = GriffinLimVocoder(features, device)
    elif (path.is_dir() and (path / "config.yml").is_file()) or (path.is_file() and path.suffix == ".pkl"):
        vocoder = _load_pwg_dir(path, device)
    elif path.exists():
        vocoder = _load_own(checkpoint.latest(path), device)
    else:
        raise UserError(f"vocoder '{path_or_name}' not found: expected '{GRIFFIN_LIM}', a vocoder directory or "
                        "checkpoint-<step>.pt from `sqaudio vocoder train`, or a parallel-wavegan model directory")
    if features is not None:
        vocoder.check_compatible(features)
    return vocoder


def _load_own(path: Path, device: torch.device) -> NeuralVocoder:
    state = checkpoint.load(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a vocoder checkpoint (train one with `sqaudio vocoder train`)")
    cfg = load_vocoder_config(base=state["config"])
    features = from_dict(FeatureConfig, state["features"], "features")
    generator = build_generator(cfg, features)
    generator.load_state_dict(state["generator"])
    generator.remove_weight_norm()
    info = {"checkpoint": str(path), "step": state["step"], "recipe": cfg.name, "generator": cfg.generator_type,
            "checkpoint size": _size(path.stat().st_size),
            "contents": "generator only (exported)" if "discriminator" not in state else
                        "generator, discriminator, optimizer states (`sqaudio vocoder export` makes it smaller)"}
    return NeuralVocoder(generator, MelConvention.of(features), features, device, str(path), info)


def export_generator(src: str | Path, out: Path) -> Path:
    """Write a generator-only copy of one of our vocoder checkpoints (no discriminator or optimizer states) that
    `load_vocoder` takes like the original. `src`: a vocoder dir (newest checkpoint) or checkpoint file."""
    path = checkpoint.latest(Path(src))
    state = checkpoint.load(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a vocoder checkpoint of `sqaudio vocoder train` (nothing to export)")
    slim = {key: state[key] for key in ("format", "version", "step", "config", "features", "generator") if key in state}
    checkpoint.save({**slim, "exported_from": str(path)}, out)
    return path


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def build_generator(cfg: VocoderConfig, features: FeatureConfig) -> torch.nn.Module:
    from sqaudio.codec.parallel_wavegan import Generator
    return Generator(cfg.generator_type, cfg.generator_params, features.n_mels, features.hop_length,
                     cfg.pqmf_params)


def config_yaml(cfg: VocoderConfig, features: FeatureConfig) -> str:
    """The resolved recipe plus the feature config, as saved in a vocoder dir (config.yaml)."""
    return yaml.safe_dump({**to_dict(cfg), "features": to_dict(features)}, sort_keys=False)


def _load_pwg_dir(path: Path, device: torch.device) -> NeuralVocoder:
    """A parallel-wavegan model directory (or one of its checkpoint-*.pkl files) as a vocoder."""
    from sqaudio.codec.parallel_wavegan import load_pretrained
    model = load_pretrained(path)
    g = model.grid
    native = MelConvention(g["sample_rate"], g["hop_length"], g["n_fft"], g["win_length"], g["window"], g["n_mels"],
                           g["fmin"], g["fmax"], "log10_zscore", 0.0, mean=tuple(map(float, model.mean)),
                           std=tuple(map(float, model.scale)), layout="(frames, mels)")
    features = FeatureConfig(sample_rate=g["sample_rate"], hop_length=g["hop_length"], n_fft=g["n_fft"],
                             win_length=g["win_length"], n_mels=g["n_mels"], fmin=g["fmin"], fmax=g["fmax"])
    info = {"checkpoint": str(model.checkpoint), "generator": model.generator.kind, "format": "parallel-wavegan"}
    return NeuralVocoder(model.generator, native, features, device, str(model.root), info)
