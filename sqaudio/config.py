"""Configs as dataclasses: YAML recipes load into them, unknown keys are errors, `a.b=c` overrides apply.

A recipe is a YAML mapping with the sections of `Recipe`. It may name a `base:` recipe (a path relative to
itself or a recipe name); the recipe is deep-merged over its base, so ablations are short overlays.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from sqaudio.errors import UserError

RECIPES_DIR = Path(__file__).parent / "recipes"
VOCODER_DIR = "vocoder"      # recipes/vocoder/: vocoder recipes, not SQ-VAE recipes
Config = TypeVar("Config")


@dataclass
class FeatureConfig:
    """Log-mel features exactly as the reference (sony/sqvae speech, librosa 0.7.2) computes them."""

    sample_rate: int = 16000
    peak: float = 0.999          # scale the waveform so that max |x| = peak
    preemphasis: float = 0.97
    n_fft: int = 2048
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 80
    fmin: float = 50.0
    fmax: float | None = None    # None: sample_rate / 2
    top_db: float = 80.0
    pad_mode: str = "reflect"    # STFT centre padding of librosa 0.7.2 (the paper's features)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length


@dataclass
class TemperatureConfig:
    """Gumbel-softmax temperature tau = max(min, init * exp(-decay * step))."""

    init: float = 1.0
    decay: float = 1e-5
    min: float = 0.0


@dataclass
class QuantizerConfig:
    """Every quantizer behind one interface (see `sqaudio.quantizers`)."""

    kind: str = "gaussian"       # gaussian | fixed_gaussian | vq_ema | vmf
    variant: int = 4             # Gaussian covariance variant: 1 (I), 2 (II), 3 (III), 4 (IV)
    codebook_size: int = 512
    dim: int = 64
    var_init: float = 10.0       # initial sigma_phi^2 scalar; vmf: initial kappa_q - 1
    codebook_init_std: float = 1.0  # SQ codebooks start N(0, std^2) (reference: 1)
    var_combine: str = "log_add"  # log_add: exp(log_var + s) (speech); add: exp(log_var) + exp(s) (images)
    temperature: TemperatureConfig = field(default_factory=TemperatureConfig)
    sample_at_inference: bool = False
    vq_decay: float = 0.99       # VQ-VAE EMA
    vq_epsilon: float = 1e-5
    vq_beta: float = 0.25
    vq_reset_threshold: float = 0.0  # EMA count below which a code is reset to an encoder output; 0 = off
    vq_objective: str = "textbook"  # textbook: MSE + beta * mean commitment | mle_sigma: (D/2) log MSE + beta * sum


@dataclass
class SpeechModelConfig:
    """The reference speech encoder (conv, x2 down) and speaker-conditioned bi-GRU decoder."""

    channels: int = 768
    jitter: float = 0.5
    n_speakers: int = 0          # 0: taken from the prepared data's speaker table
    speaker_dim: int = 64
    rnn_hidden: int = 128


@dataclass
class VisionModelConfig:
    """The reference ResNet encoders/decoders (one per dataset, see `sqaudio.models.vision.NETWORKS`)."""

    network: str = "resnet32"    # resnet28 (MNIST, Fashion) | resnet32 (CIFAR10) | resnet64 (CelebA) | resnet64_label
    image_size: int = 32
    in_channels: int = 3
    channels: int = 64           # network width (the reference: the code dimension)
    n_resblocks: int = 2
    num_classes: int = 0         # vMF class maps: classes (one-hot/vMF channels: rounded up to even); 0 for images
    output_activation: str = "auto"  # auto (sigmoid for images, none for class maps) | sigmoid | softplus | none


@dataclass
class ModelConfig:
    kind: str = "speech"         # speech | vision
    likelihood: str = "gaussian_mle"  # gaussian_mle | gaussian_learned | vmf
    log_var_x_init: float = -2.302585  # learned decoder variance: initial log sigma^2 (log 0.1)
    kappa_inv_init: float = 0.0  # vmf decoder: initial log(1/kappa)
    speech: SpeechModelConfig = field(default_factory=SpeechModelConfig)
    vision: VisionModelConfig = field(default_factory=VisionModelConfig)


@dataclass
class DataConfig:
    kind: str = "speech"         # speech | mnist | fashion_mnist | cifar10 | celeba | celebamask_hq
    root: str = ""               # image datasets: torchvision root (overridden by --data)
    download: bool = False       # image datasets: let torchvision download when the network is there
    mode: str = "crop"           # speech: crop (paper) | utterance (whole utterances, length buckets)
    batch_size: int = 52
    sample_frames: int = 32      # crop length in frames (plus 2 frames of context)
    max_frames: int = 2000       # utterance mode: longer utterances are cropped to this
    num_workers: int = 0


@dataclass
class TrainConfig:
    steps: int = 500_000
    epochs: int = 0              # > 0: steps = epochs * batches per epoch
    lr: float = 4e-4
    lr_schedule: str = "multistep"  # multistep | plateau | constant
    milestones: list[int] = field(default_factory=lambda: [300_000, 400_000])
    gamma: float = 0.5
    grad_clip: float = 1.0
    seed: int = 1234
    checkpoint_every: int = 1000
    keep_last: int = 3
    log_every: int = 50
    amp: str = "none"            # none | bf16 | fp16 (autocast on CUDA; CPU runs stay in fp32)
    deterministic: bool = False  # PyTorch's deterministic algorithms (bit-exact reruns on CUDA, slower)
    calibration_steps: int = 0   # the last N of `steps`: decoder calibration on argmax codes (encoder, codebook
                                 # and variance frozen; docs/training.md); 0 = off


@dataclass
class Recipe:
    name: str = "custom"
    features: FeatureConfig = field(default_factory=FeatureConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types are `UserError`s naming the key."""
    if not isinstance(data, dict):
        raise UserError(f"config section '{where or cls.__name__}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise UserError(f"unknown config key '{path}' (valid: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"config key '{path}' must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        except ValueError:
            raise UserError(f"config key '{path}' must be float, got {value!r}") from None
    if hint in (int, float, str, bool) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise UserError(f"config key '{path}' must be {hint.__name__}, got {value!r}")
    return value


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def list_recipes(folder: str = "") -> list[str]:
    """Shipped recipe names: SQ-VAE recipes (`folder` ""; those under vocoder/ are not), or the recipes of
    one folder by their names inside it (`folder` "vocoder": the vocoder recipes)."""
    root = RECIPES_DIR / folder
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml")
                  if folder or p.relative_to(root).parts[0] != VOCODER_DIR)


def resolve_recipe_path(name_or_path: str | Path, relative_to: Path | None = None, folder: str = "") -> Path:
    """A YAML path, or a shipped recipe name: `vctk/sqvae_gauss4`, or with `folder` "vocoder" `tiny` (also
    `vocoder/tiny`)."""
    candidates = [Path(name_or_path)]
    if relative_to is not None:
        candidates.insert(0, relative_to / name_or_path)
    name = str(name_or_path).removesuffix(".yaml")
    if folder:
        name = name.removeprefix(f"{folder}/")
    candidates.append(RECIPES_DIR / folder / f"{name}.yaml")
    for path in candidates:
        if path.is_file():
            return path
    names = list_recipes(folder)
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = (f"did you mean {' or '.join(close)}?" if close else
            f"shipped: {', '.join(names)}, or a YAML path" if folder else "`sqaudio recipes` lists them")
    raise UserError(f"{folder + ' ' if folder else ''}recipe '{name_or_path}' not found: {hint}")


def _refuse_vocoder_recipe(path: Path) -> None:
    if path.resolve().is_relative_to((RECIPES_DIR / VOCODER_DIR).resolve()):
        raise UserError(f"{path.stem} is a vocoder recipe: train it with `sqaudio vocoder train FEATURES_DIR "
                        f"--recipe {path.stem} --out DIR`")


def load_recipe_dict(name_or_path: str | Path, relative_to: Path | None = None, folder: str = "") -> dict[str, Any]:
    """A recipe's mapping with its `base:` chain merged under it (bases resolve next to it, then by name)."""
    path = resolve_recipe_path(name_or_path, relative_to, folder)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"recipe {path} is not valid YAML: {err}".replace("\n", " ")) from None
    base = data.pop("base", None)
    name = data.pop("name", None) or _recipe_name(path)
    if base is not None:
        data = deep_merge(load_recipe_dict(base, path.parent, folder), data)
    data["name"] = name
    return data


def _recipe_name(path: Path) -> str:
    path = path.resolve()
    root = RECIPES_DIR.resolve()
    return str(path.relative_to(root).with_suffix("")) if path.is_relative_to(root) else path.stem


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=c` overrides; values are parsed as YAML (`train.steps=10`, `model.kind=vision`)."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override '{item}' must look like section.key=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{item}': '{part}' is not a section")
        node[leaf] = yaml.safe_load(raw)
    return data


# Settings that earlier versions saved in checkpoints and this one no longer has: (section, key) -> the value
# that meant "off". quantizer.hard_from_step: late straight-through hard samples, a candidate that
# lost to plain training and was removed (docs/training.md, "Decoder calibration").
RETIRED: dict[tuple[str, str], Any] = {("quantizer", "hard_from_step"): None}


def saved_recipe(saved: dict[str, Any], resuming: bool, overrides: list[str] | None = None) -> Recipe:
    """The recipe a checkpoint saved (by this or an earlier version), with `overrides`. Retired settings are
    dropped: they only acted in training, so any value is fine for evaluation, but a run that used one cannot be
    resumed (it would train on differently)."""
    saved = json.loads(json.dumps(saved))
    for (section, key), off in RETIRED.items():
        value = saved.get(section, {}).pop(key, off)
        if resuming and value != off:
            raise UserError(f"this run was trained with {section}.{key}={value}, a setting this version no longer "
                            f"has (see docs/training.md); it can be evaluated and used, not resumed")
    return from_saved(Recipe, saved, overrides)


def load_config(cls: type[Config], name_or_path: str | Path, overrides: list[str] | None = None) -> Config:
    """The one recipe loader: a shipped name or YAML path of `cls`'s recipes (`cls.RECIPES`, the folder under
    recipes/; SQ-VAE recipes have none), its `base:` chain merged under it, the `--set` overrides applied, and
    the result built into `cls` (unknown keys and wrong types are errors naming the key)."""
    folder = getattr(cls, "RECIPES", "")
    if not folder:
        _refuse_vocoder_recipe(resolve_recipe_path(name_or_path))
    return from_saved(cls, load_recipe_dict(name_or_path, folder=folder), overrides)


def from_saved(cls: type[Config], saved: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """A configuration saved as a mapping (a checkpoint's), with the `--set` overrides applied."""
    return from_dict(cls, apply_overrides(saved, overrides or []))


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """An SQ-VAE recipe (`load_config`)."""
    return load_config(Recipe, name_or_path, overrides)


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise UserError(f"{key} must be {rule}, got {value!r}")


def _choice(key: str, value: Any, valid: tuple[str, ...]) -> None:
    _check(value in valid, key, value, f"one of {', '.join(valid)}")


def validate_recipe(recipe: Recipe) -> None:
    """Every numeric and enumerated training setting, checked before anything is written (UserError)."""
    d, t, q, m = recipe.data, recipe.train, recipe.quantizer, recipe.model
    _choice("data.kind", d.kind, ("speech", "mnist", "fashion_mnist", "cifar10", "celeba", "celebamask_hq"))
    _choice("data.mode", d.mode, ("crop", "utterance"))
    _check(d.batch_size >= 1, "data.batch_size", d.batch_size, ">= 1")
    _check(d.sample_frames >= 4, "data.sample_frames", d.sample_frames, ">= 4 (the encoder needs 6 frames)")
    if d.kind == "speech" and d.mode == "utterance":
        _check(d.max_frames >= 6, "data.max_frames", d.max_frames, ">= 6 in utterance mode (the encoder needs 6)")
    _check(d.num_workers >= 0, "data.num_workers", d.num_workers, ">= 0")
    _check(t.epochs >= 0, "train.epochs", t.epochs, ">= 0")
    _check(t.epochs > 0 or t.steps >= 1, "train.steps", t.steps, ">= 1 (or set train.epochs)")
    _check(t.lr > 0, "train.lr", t.lr, "> 0")
    _choice("train.lr_schedule", t.lr_schedule, ("multistep", "plateau", "constant"))
    _check(all(x >= 0 for x in t.milestones), "train.milestones", t.milestones, "steps >= 0")
    _check(0 < t.gamma <= 1, "train.gamma", t.gamma, "in (0, 1]")
    _check(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, ">= 0 (0 = off)")
    _check(t.checkpoint_every >= 1, "train.checkpoint_every", t.checkpoint_every, ">= 1")
    _check(t.keep_last >= 0, "train.keep_last", t.keep_last, ">= 0 (0 = keep all)")
    _check(t.log_every >= 1, "train.log_every", t.log_every, ">= 1")
    _choice("train.amp", t.amp, ("none", "bf16", "fp16"))
    _check(t.calibration_steps >= 0 and (t.epochs > 0 or t.calibration_steps <= t.steps), "train.calibration_steps",
           t.calibration_steps, f"in [0, train.steps = {t.steps}] (the last steps of the budget)")
    _check(q.variant in (1, 2, 3, 4), "quantizer.variant", q.variant, "1, 2, 3 or 4")
    _check(q.temperature.init > 0, "quantizer.temperature.init", q.temperature.init, "> 0")
    _check(q.temperature.decay >= 0, "quantizer.temperature.decay", q.temperature.decay, ">= 0")
    _check(q.temperature.min >= 0, "quantizer.temperature.min", q.temperature.min, ">= 0")
    _check(0 <= q.vq_decay < 1, "quantizer.vq_decay", q.vq_decay, "in [0, 1)")
    _choice("model.kind", m.kind, ("speech", "vision"))
    _check(0 <= m.speech.jitter <= 1, "model.speech.jitter", m.speech.jitter, "in [0, 1]")
    for key in ("channels", "speaker_dim", "rnn_hidden"):
        _check(getattr(m.speech, key) >= 1, f"model.speech.{key}", getattr(m.speech, key), ">= 1")
    _check(m.speech.n_speakers >= 0, "model.speech.n_speakers", m.speech.n_speakers, ">= 0 (0: the data's speakers)")


def feature_mismatch(expected: FeatureConfig, found: FeatureConfig,
                     names: tuple[str, str] = ("recipe", "data")) -> list[str]:
    """'setting: <names[0]> value vs <names[1]> value' for each feature setting that differs."""
    a, b = to_dict(expected), to_dict(found)
    return [f"{k}: {names[0]} {a[k]!r} vs {names[1]} {b[k]!r}" for k in a if a[k] != b[k]]
