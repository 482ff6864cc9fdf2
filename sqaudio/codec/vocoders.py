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
from typing import Any, ClassVar

import torch
import torchaudio.functional as AF

from sqaudio import checkpoint
from sqaudio.codec.mel_conventions import MelConvention, convert_logmel, differences, mel_filterbank
from sqaudio.config import VOCODER_DIR, FeatureConfig, from_dict, from_saved, load_config
from sqaudio.distributed import pick_device
from sqaudio.errors import UserError

GRIFFIN_LIM = "griffin-lim"
CHECKPOINT_FORMAT = "sqaudio-vocoder"


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

    RECIPES: ClassVar[str] = VOCODER_DIR  # shipped recipes: recipes/vocoder/*.yaml

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


def load_vocoder_config(name_or_path: str | Path = "hifigan", overrides: list[str] | None = None) -> VocoderConfig:
    """A shipped vocoder recipe (`hifigan`, `tiny`, ...) or a YAML path, with overrides (`config.load_config`)."""
    return load_config(VocoderConfig, name_or_path, overrides)


OPTIMIZER_TYPES = ("Adam", "AdamW", "RAdam")
SCHEDULES = ("constant", "multistep", "step", "exponential")


def validate_vocoder_config(cfg: VocoderConfig, features: FeatureConfig) -> None:
    """Recipe checks that would otherwise fail deep inside a training step (UserError)."""
    from sqaudio.codec.parallel_wavegan import min_discriminator_samples

    loss, train = cfg.loss, cfg.train
    if loss.adversarial_type not in ("mse", "hinge"):
        raise UserError(f"loss.adversarial_type must be mse or hinge, got '{loss.adversarial_type}'")
    if loss.subband_stft.weight > 0 and cfg.generator_params.get("out_channels", 1) == 1:
        raise UserError("loss.subband_stft.weight > 0 needs a multi-band generator (generator_params.out_channels > 1)")
    for name in ("steps", "batch_size", "batch_frames", "checkpoint_every", "log_every"):
        if getattr(train, name) <= 0:
            raise UserError(f"train.{name} must be positive, got {getattr(train, name)}")
    need = max(min_discriminator_samples(cfg.discriminator_type, cfg.discriminator_params),
               features.n_fft // 2 + 1, *(n // 2 + 1 for n in loss.stft.fft_sizes if loss.stft.weight > 0))
    if train.batch_frames * features.hop_length < need:
        raise UserError(f"train.batch_frames {train.batch_frames} is too short: crops need at least {need} samples "
                        f"({-(-need // features.hop_length)} frames) for these losses/discriminator")
    for optimizer in (cfg.generator_optimizer, cfg.discriminator_optimizer):
        if optimizer.type not in OPTIMIZER_TYPES:
            raise UserError(f"unknown optimizer '{optimizer.type}' (valid: {', '.join(OPTIMIZER_TYPES)})")
        if optimizer.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule '{optimizer.schedule}' (valid: {', '.join(SCHEDULES)})")


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
        fb = mel_filterbank(MelConvention.of(self.features)).to(mel)  # (mels, freqs)
        return (torch.linalg.pinv(fb) @ mel).clamp(min=0)

    @torch.no_grad()
    def generate(self, logmel: torch.Tensor) -> torch.Tensor:
        cfg = self.features
        logmel = self._check_input(logmel)
        mel = 10.0 ** ((logmel - 1.0) * cfg.top_db / 20.0)  # (B, mels, frames) amplitude
        spec = self.mel_to_linear(mel)  # (B, freqs, frames)
        frames = logmel.size(-1)
        window = torch.hann_window(cfg.win_length, device=self.device)
        length = (frames - 1) * cfg.hop_length
        # torch's inverse STFT cannot trim below half a window: run a few frames' worth longer, then cut
        wav = AF.griffinlim(spec, window, cfg.n_fft, cfg.hop_length, cfg.win_length, power=1.0,
                            n_iter=self.n_iter, momentum=self.momentum, length=max(length, cfg.n_fft // 2 + 1),
                            rand_init=False)[..., :length]
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
    cfg = from_saved(VocoderConfig, state["config"])
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
