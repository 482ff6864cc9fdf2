"""`sqaudio vocoder train`: a parallel-wavegan GAN vocoder on the prepared store's features.

The batch of step s is a pure function of (seed, s), and the model RNGs (noise inputs, random discriminator
windows) are saved in every checkpoint, so `--resume` continues exactly where the run stopped. The run (resume,
checkpoints, logging, the loop) is `sqaudio.training.run.Run`'s; this module keeps the crops and the GAN step,
`sqaudio.training.vocoder_losses` the losses and optimizers.

Under torchrun (WORLD_SIZE > 1) every process takes its slice of each global batch, generator and
discriminator are wrapped in DistributedDataParallel, and only rank 0 writes (docs/distributed.md). All losses
are batch means except spectral convergence, which is computed from sums over all ranks, so N processes follow
the single-process trajectory for models without noise inputs (HiFi-GAN, MelGAN).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.console import Console
from rich.table import Table

from sqaudio import distributed
from sqaudio.codec.vocoders import CHECKPOINT_FORMAT, VocoderConfig, build_generator, validate_vocoder_config
from sqaudio.config import FeatureConfig, feature_mismatch, from_dict, from_saved, to_dict
from sqaudio.data.batches import StepBatches
from sqaudio.data.store import Store
from sqaudio.errors import UserError
from sqaudio.training import engine
from sqaudio.training.run import Run, RunResult, Schedule, Trainer
from sqaudio.training.vocoder_losses import Losses, learning_rate, make_optimizer, update

console = Console(stderr=True)
EVAL_MAX_FRAMES = 400


# ------------------------------------------------------------------ data

def entry_audio(store: Store, entry: dict[str, Any]) -> np.ndarray:
    """The 16 kHz waveform behind a manifest entry, peak-normalised as the features see it: float32 (samples,)."""
    wav = store.source_audio(entry)
    return (wav / np.abs(wav).max() * store.features.peak).astype(np.float32)


class CropItems:
    """Crops of training utterances: mel[:, i:i+frames] paired with wav[i*hop:(i+frames)*hop].

    Called by `StepBatches` with [(entry index, that position's own RNG), ...] (this rank's slice of a step's
    global batch); returns (mel (b, n_mels, frames), wav (b, frames * hop)). Decoded audio is cached up to
    cache_mb.

    Args:
        store: the prepared store; entries: manifest entries to crop from (each with > `frames` frames).
        frames: crop length in feature frames; cache_mb: audio cache budget per process (and per worker).
    """

    def __init__(self, store: Store, entries: list[dict[str, Any]], frames: int, cache_mb: int = 0):
        self.store, self.entries, self.frames = store, entries, frames
        self.cache_bytes = cache_mb * 2**20
        self._cache: dict[int, np.ndarray] = {}
        self._cached = 0

    def audio(self, index: int) -> np.ndarray:
        if index in self._cache:
            return self._cache[index]
        wav = entry_audio(self.store, self.entries[index])
        if self._cached + wav.nbytes <= self.cache_bytes:
            self._cache[index] = wav
            self._cached += wav.nbytes
        return wav

    def crop(self, index: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        entry, hop, frames = self.entries[index], self.store.features.hop_length, self.frames
        mel, wav = self.store.load(entry), self.audio(index)
        if abs(mel.shape[1] - (wav.size // hop + 1)) > 1:
            raise UserError(f"entry {entry.get('id')}: {mel.shape[1]} feature frames but its audio has "
                            f"{wav.size} samples ({wav.size // hop + 1} frames): re-run prepare")
        start = int(torch.randint(0, min(mel.shape[1], wav.size // hop) - frames + 1, (1,), generator=rng))
        return (torch.from_numpy(np.ascontiguousarray(mel[:, start:start + frames])),
                torch.from_numpy(wav[start * hop:(start + frames) * hop]))

    def __call__(self, pairs: list[tuple[int, torch.Generator]]) -> tuple[torch.Tensor, torch.Tensor]:
        crops = [self.crop(index, rng) for index, rng in pairs]
        mels, wavs = zip(*crops)
        return torch.stack(mels), torch.stack(wavs)  # (b, n_mels, frames), (b, frames * hop)


def crop_batches(store: Store, entries: list[dict[str, Any]], batch_size: int, frames: int, seed: int,
                 cache_mb: int = 0, rank: int = 0, world: int = 1) -> StepBatches:
    """Item s = this rank's slice (positions rank::world) of training step s's global batch of crops.

    The global batch is a pure function of (seed, s): entries come from seeded epoch permutations and each
    crop offset from an RNG keyed by its position in the global batch (`sqaudio.data.batches.StepBatches`), so the
    data does not depend on the number of processes, and `--resume` continues it exactly.
    """
    return StepBatches(len(entries), batch_size, seed, CropItems(store, entries, frames, cache_mb),
                       rank=rank, world=world)


def usable_entries(store: Store, split: str, frames: int) -> list[dict[str, Any]]:
    """Entries of a split long enough for one crop (more than `frames` feature frames)."""
    return [e for e in store.split(split) if int(e["frames"]) > frames + 1]


# ------------------------------------------------------------------ training

def training_entries(cfg: VocoderConfig, store: Store, world: int) -> list[dict[str, Any]]:
    """The training utterances a run of `cfg` on `world` processes crops from; a UserError when the recipe,
    its batch split or the store does not fit."""
    train = cfg.train
    engine.check_divisible(train.batch_size, world, "train.batch_size")
    validate_vocoder_config(cfg, store.features)
    entries = usable_entries(store, "train", train.batch_frames)
    if not entries:
        raise UserError(f"no training utterance in {store.root} is longer than train.batch_frames="
                        f"{train.batch_frames} frames")
    return entries


def check_launch(store: Store, config: VocoderConfig | None, world: int, device: str | None) -> None:
    """What a run on `world` local processes can be refused for, checked once before any starts (nothing is
    written): the device count; for a new run (`config`) also the recipe against the store and the models'
    sizes (built on the meta device: no memory). Resuming, the saved config is the processes' to check."""
    distributed.check_world(device, world)
    if config is not None:
        training_entries(config, store, world)
        with torch.device("meta"):
            _build_models(config, store.features)


def train_vocoder(store: Store, out: str | Path, config: VocoderConfig | None = None,
                  overrides: list[str] | None = None, resume: bool = False, device: str | None = None,
                  quiet: bool = False) -> RunResult:
    """Train a vocoder with `config` in run directory `out` on a prepared store, or with `resume` continue the
    newest checkpoint there with its saved config changed by `overrides` (`--set` items).

    Under torchrun (WORLD_SIZE > 1) each process trains on its slice of every global batch of
    `train.batch_size` crops with DistributedDataParallel; only rank 0 writes to `out`. Every check runs on
    every rank before anything is written, and a failure is reported once (`engine.together`).
    """
    with engine.session(device) as process:
        run = Run(process, out, resume, fmt=CHECKPOINT_FORMAT, logs="logs", label="vocoder")
        features, dev = store.features, process.dev
        with engine.together(process.ctx):
            cfg = _run_config(run, store, config, overrides)
            train = cfg.train
            entries = training_entries(cfg, store, process.ctx.world)
            generator, discriminator = run.initial(lambda: _build_models(cfg, features), train.seed)
            process.seed_streams(train.seed)
            generator, discriminator = generator.to(dev), discriminator.to(dev)
            losses = Losses(cfg, features).to(dev)
            generator_optimizer = make_optimizer(generator.parameters(), cfg.generator_optimizer)
            discriminator_optimizer = make_optimizer(discriminator.parameters(), cfg.discriminator_optimizer)
            run.restore({"generator": generator, "discriminator": discriminator,
                         "generator_optimizer": generator_optimizer,
                         "discriminator_optimizer": discriminator_optimizer}, train.steps)
        run.set_up(config_yaml(cfg, features), {"format": CHECKPOINT_FORMAT, "version": 1, "config": to_dict(cfg),
                                                "features": to_dict(features)})
        trainer = VocoderTrainer(process, cfg, store, generator, discriminator, losses, generator_optimizer,
                                 discriminator_optimizer)
        batches = crop_batches(store, entries, train.batch_size, train.batch_frames, train.seed, train.cache_mb,
                               process.ctx.rank, process.ctx.world)
        schedule = Schedule(train.steps, train.log_every, train.checkpoint_every, train.keep_last, train.num_workers)
        result = run.train(trainer, batches, schedule, quiet)
        if not quiet and process.ctx.is_main:
            _print_summary(result)
    return result


def _run_config(run: Run, store: Store, config: VocoderConfig | None, overrides: list[str] | None) -> VocoderConfig:
    """The given config of a new run, or the resumed run's saved one with the overrides (same features only)."""
    if run.state is None:
        if config is None:
            raise UserError(f"no checkpoint found in {run.out} to resume (start without --resume)")
        return config
    diff = feature_mismatch(store.features, from_dict(FeatureConfig, run.state["features"], "features"),
                            ("store", "run"))
    if diff:
        raise UserError(f"{store.root} has other features than the run in {run.out}: {'; '.join(diff)}")
    return from_saved(VocoderConfig, run.state["config"], overrides)


def _build_models(cfg: VocoderConfig, features: FeatureConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
    from sqaudio.codec.parallel_wavegan import build_discriminator

    return build_generator(cfg, features), build_discriminator(cfg.discriminator_type, cfg.discriminator_params)


def config_yaml(cfg: VocoderConfig, features: FeatureConfig) -> str:
    """The resolved recipe plus the feature config, as saved in a vocoder dir (config.yaml)."""
    return yaml.safe_dump({**to_dict(cfg), "features": to_dict(features)}, sort_keys=False)


class VocoderTrainer(Trainer):
    """The GAN step on a `Run`: a generator update, then (from train.discriminator_start) a discriminator update;
    scores the generator's mel L1 on test utterances at checkpoints.

    `generator`/`discriminator` are the plain modules (checkpoints, evaluation, no-grad passes); `ddp_generator`/
    `ddp_discriminator` the ones whose gradients are averaged across processes (DistributedDataParallel under
    torchrun, else the same modules).

    Args:
        process: this process; cfg: the vocoder recipe; store: the prepared store (test utterances to score);
        generator, discriminator, losses, generator_optimizer, discriminator_optimizer: built for `cfg`.
    """

    progress_keys = ("generator", "mel", "stft", "adversarial", "discriminator")

    def __init__(self, process: engine.Process, cfg: VocoderConfig, store: Store, generator, discriminator,
                 losses: Losses, generator_optimizer, discriminator_optimizer):
        self.process, self.cfg, self.store, self.features = process, cfg, store, store.features
        self.generator, self.discriminator, self.losses = generator, discriminator, losses
        self.generator_optimizer, self.discriminator_optimizer = generator_optimizer, discriminator_optimizer
        self.ddp_generator, self.ddp_discriminator = generator, discriminator
        if process.ctx.world > 1:
            # No BatchNorm in these models; weight/spectral-norm buffers evolve identically on every rank, and
            # re-broadcasting them before each of the two discriminator passes would clobber saved tensors.
            self.ddp_generator = distributed.wrap_ddp(generator, process.dev, sync_buffers=False)
            self.ddp_discriminator = distributed.wrap_ddp(discriminator, process.dev, sync_buffers=False)
        generator.train(), discriminator.train()

    def step(self, step: int, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        mel, wav = batch  # (B, n_mels, frames), (B, frames * hop)
        row, wav_hat = self.generator_step(mel, wav, step)
        if step >= self.cfg.train.discriminator_start:
            row.update(self.discriminator_step(mel, wav, wav_hat, step))
        return row["generator"] + row.get("discriminator", 0.0), row

    def generator_step(self, mel: torch.Tensor, wav: torch.Tensor, step: int) -> tuple[dict, torch.Tensor]:
        """Generator update; returns the loss terms (device tensors: no host sync) and the generated audio."""
        weights, losses = self.cfg.loss, self.losses
        wav_hat, bands_hat = self.ddp_generator(mel, return_subbands=True)  # (B, T), (B, subbands, T / subbands)
        terms: dict[str, torch.Tensor] = {}
        aux = wav.new_zeros(())
        if losses.stft is not None:
            convergence, magnitude = losses.stft(wav_hat, wav)
            terms["stft"] = convergence + magnitude
            aux = aux + weights.stft.weight * terms["stft"]
        if losses.subband_stft is not None:
            convergence, magnitude = losses.subband_stft(bands_hat, self.generator.pqmf.analysis(wav[:, None]))
            terms["subband_stft"] = convergence + magnitude
            aux = aux + weights.subband_stft.weight * terms["subband_stft"]
        terms["mel"] = losses.mel(wav_hat, wav)
        aux = aux + weights.mel * terms["mel"]
        loss = weights.aux_weight * aux
        if step >= self.cfg.train.discriminator_start:
            loss = loss + weights.adversarial * self._adversarial(wav, wav_hat, terms)
        terms["generator"] = loss
        update(self.generator_optimizer, self.cfg.generator_optimizer, step, loss, self.generator.parameters())
        return {key: value.detach() for key, value in terms.items()}, wav_hat.detach()

    def _adversarial(self, wav: torch.Tensor, wav_hat: torch.Tensor, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """The adversarial (+ feature matching) term; the discriminator only passes gradients to wav_hat here."""
        self.discriminator.requires_grad_(False)
        try:
            fake = self.discriminator(wav_hat[:, None])
            terms["adversarial"] = self.losses.generator_adversarial(fake)
            adversarial = terms["adversarial"]
            if self.losses.feature_matching is not None:
                with torch.no_grad():
                    real = self.discriminator(wav[:, None])
                terms["feat_match"] = self.losses.feature_matching(fake, real)
                adversarial = adversarial + self.cfg.loss.feat_match * terms["feat_match"]
        finally:
            self.discriminator.requires_grad_(True)
        return adversarial

    def discriminator_step(self, mel: torch.Tensor, wav: torch.Tensor, wav_hat: torch.Tensor, step: int):
        """Discriminator update on real and generated audio; returns its loss terms (device tensors)."""
        if self.cfg.train.recompute_after_generator_update:
            with torch.no_grad():
                wav_hat = self.generator(mel)
        real_loss, fake_loss = self.losses.discriminator_adversarial(self.ddp_discriminator(wav_hat[:, None]),
                                                                     self.ddp_discriminator(wav[:, None]))
        loss = real_loss + fake_loss
        update(self.discriminator_optimizer, self.cfg.discriminator_optimizer, step, loss,
               self.discriminator.parameters())
        return {"real": real_loss.detach(), "fake": fake_loss.detach(), "discriminator": loss.detach()}

    def log(self, step: int, averages: dict[str, float]) -> dict[str, float]:
        return {**averages, "lr": learning_rate(self.cfg.generator_optimizer, step - 1)}

    def evaluate(self, step: int) -> dict[str, float]:
        score = self.mel_score() if self.cfg.train.eval_utterances > 0 else None
        return {} if score is None else {"eval/mel_loss": score}

    @torch.no_grad()
    def mel_score(self) -> float | None:
        """Mean mel L1 (log10 mel) on up to `eval_utterances` test utterances (first 400 frames each)."""
        entries = sorted(self.store.split("test"), key=lambda e: str(e["id"]))[: self.cfg.train.eval_utterances]
        if not entries:
            return None
        dev, hop, scores = self.process.dev, self.features.hop_length, []
        self.generator.eval()
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            for entry in entries:
                mel = torch.from_numpy(self.store.load(entry)[:, :EVAL_MAX_FRAMES]).to(dev)
                wav = torch.from_numpy(entry_audio(self.store, entry)).to(dev)
                frames = min(mel.size(1), wav.numel() // hop)
                wav_hat = self.generator(mel[None, :, :frames])
                scores.append(float(self.losses.mel(wav_hat, wav[None, : frames * hop])))
        self.generator.train()
        return float(np.mean(scores))


def _print_summary(result: RunResult) -> None:
    table = Table(title=f"vocoder training: {result.config.parent}", show_header=False)
    table.add_row("step", str(result.step))
    rate = result.steps_run / result.seconds if result.seconds > 0 else 0.0
    table.add_row("steps run", f"{result.steps_run} in {result.seconds:.1f} s ({rate:.2f} steps/s)")
    for key, value in result.statistics.items():
        table.add_row(f"loss/{key}" if key != "lr" else key, f"{value:.4g}")
    if "eval/mel_loss" in result.evaluation:
        table.add_row("eval mel L1 (log10)", f"{result.evaluation['eval/mel_loss']:.4f}")
    table.add_row("checkpoint", str(result.checkpoint))
    console.print(table)
