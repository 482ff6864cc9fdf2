"""`sqaudio vocoder train`: a parallel-wavegan GAN vocoder on the prepared store's features.

The batch of step s is a pure function of (seed, s), and the model RNGs (noise inputs, random discriminator
windows) are saved in every checkpoint, so `--resume` continues exactly where the run stopped. The loop
runs on the training engine (`sqaudio/engine.py`); this module keeps the models, losses and the step.

Under torchrun (WORLD_SIZE > 1) every process takes its slice of each global batch, generator and
discriminator are wrapped in DistributedDataParallel, and only rank 0 writes (docs/distributed.md). All losses
are batch means except spectral convergence, which is computed from sums over all ranks, so N processes follow
the single-process trajectory for models without noise inputs (HiFi-GAN, MelGAN).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from sqaudio import checkpoint, distributed
from sqaudio.codec.vocoders import (
    CHECKPOINT_FORMAT,
    OptimizerConfig,
    VocoderConfig,
    build_generator,
    config_yaml,
    load_vocoder_config,
)
from sqaudio.config import FeatureConfig, from_dict, to_dict
from sqaudio.data.batches import StepBatches
from sqaudio.data.store import Store, open_store
from sqaudio.errors import UserError
from sqaudio.files import atomic_write
from sqaudio.training import engine

console = Console(stderr=True)
OPTIMIZERS = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW, "RAdam": torch.optim.RAdam}
EVAL_MAX_FRAMES = 400


# ------------------------------------------------------------------ data

def entry_audio(store: Store, entry: dict[str, Any]) -> np.ndarray:
    """The 16 kHz waveform behind a manifest entry, peak-normalised as the features see it: float32 (samples,)."""
    wav = store.source_audio(entry)
    return (wav / np.abs(wav).max() * store.features.peak).astype(np.float32)


class CropItems:
    """Crops of training utterances: mel[:, i:i+L] paired with wav[i*hop:(i+L)*hop], L = `frames`.

    Called by `StepBatches` with [(entry index, that position's own RNG), ...] (this rank's slice of a step's
    global batch); returns (mel (b, n_mels, L), wav (b, L * hop)). Decoded audio is cached up to cache_mb.

    Args:
        store: the prepared store; entries: manifest entries to crop from (each with > L frames).
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

    def crop(self, index: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        entry, hop, frames = self.entries[index], self.store.features.hop_length, self.frames
        mel, wav = self.store.load(entry), self.audio(index)
        if abs(mel.shape[1] - (wav.size // hop + 1)) > 1:
            raise UserError(f"entry {entry.get('id')}: {mel.shape[1]} feature frames but its audio has "
                            f"{wav.size} samples ({wav.size // hop + 1} frames): re-run prepare")
        start = int(torch.randint(0, min(mel.shape[1], wav.size // hop) - frames + 1, (1,), generator=g))
        return (torch.from_numpy(np.ascontiguousarray(mel[:, start:start + frames])),
                torch.from_numpy(wav[start * hop:(start + frames) * hop]))

    def __call__(self, pairs: list[tuple[int, torch.Generator]]) -> tuple[torch.Tensor, torch.Tensor]:
        crops = [self.crop(i, g) for i, g in pairs]
        return torch.stack([m for m, _ in crops]), torch.stack([w for _, w in crops])  # (b, M, L), (b, L*hop)


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


# ------------------------------------------------------------------ models, losses, optimisers

class GlobalSpectralConvergence(torch.nn.Module):
    """parallel-wavegan's spectral convergence ||Y - X||_F / ||Y||_F over the *global* batch.

    The ratio of norms is not a batch mean, so an average of per-rank ratios would not be the single-process
    loss; under DDP both squared norms are summed over all ranks (differentiable all-reduce) instead.
    """

    def forward(self, x_mag: torch.Tensor, y_mag: torch.Tensor) -> torch.Tensor:  # (b, frames, bins) each
        if not distributed.active():
            return torch.norm(y_mag - x_mag, p="fro") / torch.norm(y_mag, p="fro")
        error = distributed.sum_all((y_mag - x_mag).square().sum())
        return torch.sqrt(error / distributed.sum_all(y_mag.square().sum()))


class Losses(torch.nn.Module):
    """The generator and discriminator criteria of a recipe (parallel-wavegan's loss classes).

    Args:
        cfg: the vocoder recipe; features: the mel loss uses exactly their analysis settings.
    """

    def __init__(self, cfg: VocoderConfig, features: FeatureConfig):
        super().__init__()
        from sqaudio.codec import parallel_wavegan as pwg
        lc = self.cfg = cfg.loss
        self.stft = pwg.MultiResolutionSTFTLoss(lc.stft.fft_sizes, lc.stft.hop_sizes, lc.stft.win_lengths,
                                                lc.stft.window) if lc.stft.weight > 0 else None
        sub = lc.subband_stft
        self.subband_stft = pwg.MultiResolutionSTFTLoss(sub.fft_sizes, sub.hop_sizes, sub.win_lengths,
                                                        sub.window) if sub.weight > 0 else None
        self.mel = pwg.MelSpectrogramLoss(
            fs=features.sample_rate, fft_size=features.n_fft, hop_size=features.hop_length,
            win_length=features.win_length, window="hann", num_mels=features.n_mels, fmin=features.fmin,
            fmax=features.fmax, log_base=10.0)
        self.gen_adv = pwg.GeneratorAdversarialLoss(lc.average_by_discriminators, lc.adversarial_type)
        self.dis_adv = pwg.DiscriminatorAdversarialLoss(lc.average_by_discriminators, lc.adversarial_type)
        self.feat_match = pwg.FeatureMatchLoss(lc.feat_match_average_by_layers, lc.average_by_discriminators,
                                               lc.feat_match_include_final) if lc.feat_match > 0 else None
        for multi in (self.stft, self.subband_stft):
            for single in multi.stft_losses if multi is not None else []:
                single.spectral_convergence_loss = GlobalSpectralConvergence()


def validate(cfg: VocoderConfig, features: FeatureConfig, generator) -> None:
    """Recipe checks that would otherwise fail deep inside a training step."""
    from sqaudio.codec import parallel_wavegan as pwg
    lc, tc = cfg.loss, cfg.train
    if lc.adversarial_type not in ("mse", "hinge"):
        raise UserError(f"loss.adversarial_type must be mse or hinge, got '{lc.adversarial_type}'")
    if lc.subband_stft.weight > 0 and generator.subbands == 1:
        raise UserError("loss.subband_stft.weight > 0 needs a multi-band generator (generator_params.out_channels > 1)")
    for name, value in (("train.steps", tc.steps), ("train.batch_size", tc.batch_size),
                        ("train.batch_frames", tc.batch_frames), ("train.checkpoint_every", tc.checkpoint_every),
                        ("train.log_every", tc.log_every)):
        if value <= 0:
            raise UserError(f"{name} must be positive, got {value}")
    need = max(pwg.min_discriminator_samples(cfg.discriminator_type, cfg.discriminator_params),
               features.n_fft // 2 + 1, *(n // 2 + 1 for n in lc.stft.fft_sizes if lc.stft.weight > 0))
    if tc.batch_frames * features.hop_length < need:
        raise UserError(f"train.batch_frames {tc.batch_frames} is too short: crops need at least {need} samples "
                        f"({-(-need // features.hop_length)} frames) for these losses/discriminator")
    for opt in (cfg.generator_optimizer, cfg.discriminator_optimizer):
        if opt.type not in OPTIMIZERS:
            raise UserError(f"unknown optimizer '{opt.type}' (valid: {', '.join(OPTIMIZERS)})")
        if opt.schedule not in ("constant", "multistep", "step", "exponential"):
            raise UserError(f"unknown schedule '{opt.schedule}' (valid: constant, multistep, step, exponential)")


def make_optimizer(params, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.type](params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                weight_decay=cfg.weight_decay, **({"amsgrad": True} if cfg.amsgrad else {}))


def learning_rate(cfg: OptimizerConfig, step: int) -> float:
    """The learning rate at a step: a pure function of the step (nothing to save but the step)."""
    if cfg.schedule == "multistep":
        return cfg.lr * cfg.gamma ** sum(step >= m for m in cfg.milestones)
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** (step // cfg.step_size)
    if cfg.schedule == "exponential":
        return cfg.lr * cfg.gamma ** step
    return cfg.lr


def _update(opt: torch.optim.Optimizer, cfg: OptimizerConfig, step: int, loss: torch.Tensor, params) -> None:
    for group in opt.param_groups:
        group["lr"] = learning_rate(cfg, step)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_norm)
    opt.step()


# ------------------------------------------------------------------ training

def train_vocoder(features_dir: str | Path, out_dir: str | Path, recipe: str | Path | None = None,
                  overrides: list[str] | None = None, resume: bool = False, device: str | None = None,
                  quiet: bool = False) -> dict[str, Any]:
    """Train (or with `resume`, continue) a vocoder in `out_dir` on a prepared store. Returns a summary.

    Under torchrun (WORLD_SIZE > 1) each process trains on its slice of every global batch of
    `train.batch_size` crops with DistributedDataParallel; only rank 0 writes to `out_dir`.
    """
    store, out = open_store(features_dir), Path(out_dir)
    if resume and recipe is not None:
        raise UserError("--recipe cannot be combined with --resume (the run's saved config is used; "
                        "change settings such as train.steps with --set)")
    cfg = None if resume else load_vocoder_config(recipe or "hifigan", overrides)
    if cfg is not None:
        _check_world(cfg)  # before joining: every rank fails alike at once
    with engine.session(device) as eng:
        state = eng.resume_state(out, resume, fmt=CHECKPOINT_FORMAT)
        if state is not None:
            cfg = load_vocoder_config(base=state["config"], overrides=overrides)
            _check_world(cfg)
            saved = from_dict(FeatureConfig, state["features"], "features")
            if saved != store.features:
                diff = [k for k in to_dict(saved) if to_dict(saved)[k] != to_dict(store.features)[k]]
                raise UserError(f"{features_dir} has other features than the run in {out}: {', '.join(diff)} differ")
        elif cfg is None:
            engine.fail_together(f"no checkpoint found in {out} to resume (start without --resume)", eng.ctx)
        features, tc = store.features, cfg.train
        with torch.random.fork_rng(devices=[]):  # the same initial weights on every rank, streams untouched
            engine.seed_all(tc.seed)
            generator = build_generator(cfg, features)
            validate(cfg, features, generator)
            from sqaudio.codec.parallel_wavegan import build_discriminator
            discriminator = build_discriminator(cfg.discriminator_type, cfg.discriminator_params)
        losses = Losses(cfg, features)
        entries = usable_entries(store, "train", tc.batch_frames)
        if not entries:
            raise UserError(f"no training utterance in {features_dir} is longer than train.batch_frames="
                            f"{tc.batch_frames} frames")
        eng.seed_streams(tc.seed)
        dev = eng.dev
        generator, discriminator, losses = generator.to(dev), discriminator.to(dev), losses.to(dev)
        g_opt = make_optimizer(generator.parameters(), cfg.generator_optimizer)
        d_opt = make_optimizer(discriminator.parameters(), cfg.discriminator_optimizer)
        step = 0
        if state is not None:
            generator.load_state_dict(state["generator"])
            discriminator.load_state_dict(state["discriminator"])
            g_opt.load_state_dict(state["generator_optimizer"])
            d_opt.load_state_dict(state["discriminator_optimizer"])
            step = int(state["step"])
            eng.restore_rng(state, step)
            if eng.ctx.is_main:  # even with --quiet: where a run continues is never a guess
                console.print(f"resuming from step {step} to step {tc.steps} ({out})", soft_wrap=True)
        if eng.ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            checkpoint.remove_stale_temporaries(out)
            atomic_write(out / "config.yaml", lambda tmp: tmp.write_text(config_yaml(cfg, features)))
        run = _Run(cfg, features, store, out, eng, generator, discriminator, losses, g_opt, d_opt)
        return run.loop(entries, step, quiet or not eng.ctx.is_main)


def _check_world(cfg: VocoderConfig) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.train.batch_size % world:
        raise UserError(f"train.batch_size {cfg.train.batch_size} is not divisible by {world} processes")


class _Run:
    """One training run's state; `loop` is the training loop.

    `G`/`D` are the plain modules (checkpoints, evaluation, no-grad passes); `G_train`/`D_train` the ones whose
    gradients are averaged across processes (DistributedDataParallel under torchrun, else the same modules).
    """

    def __init__(self, cfg, features, store, out, eng: engine.Engine, generator, discriminator, losses, g_opt,
                 d_opt):
        self.cfg, self.features, self.store, self.out, self.dev = cfg, features, store, out, eng.dev
        self.G, self.D, self.losses, self.g_opt, self.d_opt = generator, discriminator, losses, g_opt, d_opt
        self.eng, self.ctx = eng, eng.ctx
        ctx, dev = eng.ctx, eng.dev
        self.G_train, self.D_train = generator, discriminator
        if ctx.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # No BatchNorm in these models; weight/spectral-norm buffers evolve identically on every rank, and
            # re-broadcasting them before each of the two discriminator passes would clobber saved tensors.
            ids = [dev.index] if dev.type == "cuda" else None
            self.G_train = DDP(generator, device_ids=ids, forward_sync_buffers=False)
            self.D_train = DDP(discriminator, device_ids=ids, forward_sync_buffers=False)

    def generator_step(self, mel: torch.Tensor, wav: torch.Tensor, step: int) -> tuple[dict, torch.Tensor]:
        """Generator update; returns the loss terms (device tensors: no host sync) and the generated audio."""
        lc, L = self.cfg.loss, self.losses
        wav_hat, bands_hat = self.G_train(mel, return_subbands=True)  # (B, T), (B, subbands, T / subbands)
        terms: dict[str, torch.Tensor] = {}
        aux = wav.new_zeros(())
        if L.stft is not None:
            sc, mag = L.stft(wav_hat, wav)
            terms["stft"] = sc + mag
            aux = aux + lc.stft.weight * terms["stft"]
        if L.subband_stft is not None:
            sc, mag = L.subband_stft(bands_hat, self.G.pqmf.analysis(wav[:, None]))
            terms["subband_stft"] = sc + mag
            aux = aux + lc.subband_stft.weight * terms["subband_stft"]
        terms["mel"] = L.mel(wav_hat, wav)
        aux = aux + lc.mel * terms["mel"]
        loss = lc.aux_weight * aux
        if step >= self.cfg.train.discriminator_start:
            # The discriminator only passes gradients to wav_hat here: its own would be discarded.
            self.D.requires_grad_(False)
            try:
                fake = self.D(wav_hat[:, None])
                terms["adversarial"] = L.gen_adv(fake)
                adv = terms["adversarial"]
                if L.feat_match is not None:
                    with torch.no_grad():
                        real = self.D(wav[:, None])
                    terms["feat_match"] = L.feat_match(fake, real)
                    adv = adv + lc.feat_match * terms["feat_match"]
            finally:
                self.D.requires_grad_(True)
            loss = loss + lc.adversarial * adv
        terms["generator"] = loss
        _update(self.g_opt, self.cfg.generator_optimizer, step, loss, self.G.parameters())
        return {k: v.detach() for k, v in terms.items()}, wav_hat.detach()

    def discriminator_step(self, mel: torch.Tensor, wav: torch.Tensor, wav_hat: torch.Tensor, step: int):
        if self.cfg.train.recompute_after_generator_update:
            with torch.no_grad():
                wav_hat = self.G(mel)
        real_loss, fake_loss = self.losses.dis_adv(self.D_train(wav_hat[:, None]), self.D_train(wav[:, None]))
        loss = real_loss + fake_loss
        _update(self.d_opt, self.cfg.discriminator_optimizer, step, loss, self.D.parameters())
        return {"real": real_loss.detach(), "fake": fake_loss.detach(), "discriminator": loss.detach()}

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean mel L1 (log10 mel) on up to `eval_utterances` test utterances (first 400 frames each)."""
        entries = sorted(self.store.split("test"), key=lambda e: str(e["id"]))[: self.cfg.train.eval_utterances]
        if not entries:
            return None
        self.G.eval()
        hop, scores = self.features.hop_length, []
        with torch.random.fork_rng(devices=[self.dev] if self.dev.type == "cuda" else []):
            for entry in entries:
                mel = torch.from_numpy(self.store.load(entry)[:, :EVAL_MAX_FRAMES]).to(self.dev)
                wav = torch.from_numpy(entry_audio(self.store, entry)).to(self.dev)
                frames = min(mel.size(1), wav.numel() // hop)
                wav_hat = self.G(mel[None, :, :frames])
                scores.append(float(self.losses.mel(wav_hat, wav[None, : frames * hop])))
        self.G.train()
        return float(np.mean(scores))

    def save(self, step: int) -> Path:
        """All ranks call this (their RNG streams are gathered); rank 0 writes the checkpoint."""
        rngs = self.eng.rng_states()
        path = self.out / f"checkpoint-{step}.pt"
        if self.ctx.is_main:
            state = {"format": CHECKPOINT_FORMAT, "version": 1, "step": step, "config": to_dict(self.cfg),
                     "features": to_dict(self.features), "generator": self.G.state_dict(),
                     "discriminator": self.D.state_dict(), "generator_optimizer": self.g_opt.state_dict(),
                     "discriminator_optimizer": self.d_opt.state_dict(), **rngs}
            path = checkpoint.save_step(state, self.out, step, self.cfg.train.keep_last)
        return path

    def loop(self, entries: list[dict[str, Any]], step: int, quiet: bool) -> dict[str, Any]:
        from torch.utils.tensorboard import SummaryWriter
        tc, ctx = self.cfg.train, self.ctx
        data = crop_batches(self.store, entries, tc.batch_size, tc.batch_frames, tc.seed, tc.cache_mb,
                            ctx.rank, ctx.world)
        start_step, started = step, time.perf_counter()
        last: dict[str, float] = {}
        saved: dict[str, Any] = {"checkpoint": None, "eval_mel": None}

        def step_fn(s: int, batch):
            mel, wav = batch
            row, wav_hat = self.generator_step(mel, wav, s)
            if s >= tc.discriminator_start:
                row.update(self.discriminator_step(mel, wav, wav_hat, s))
            return row["generator"] + row.get("discriminator", 0.0), row

        def on_log(s: int, row: dict[str, float]) -> str:
            nonlocal last
            last = row
            if writer is not None:
                for k, v in row.items():
                    writer.add_scalar(f"train/{k}", v, s)
                writer.add_scalar("train/lr", learning_rate(self.cfg.generator_optimizer, s - 1), s)
            return _describe(row)

        def save(s: int) -> None:
            """Evaluate (rank 0) and save (all ranks take part); a stop at the resumed step saves nothing new."""
            if s == start_step:
                return
            if ctx.is_main and tc.eval_utterances > 0 and (eval_mel := self.evaluate()) is not None:
                writer.add_scalar("eval/mel_loss", eval_mel, s)
                saved["eval_mel"] = eval_mel
            saved["checkpoint"] = self.save(s)

        self.G.train(), self.D.train()
        writer = SummaryWriter(str(self.out / "logs")) if ctx.is_main else None
        try:
            step, signal = self.eng.loop(data, step, tc.steps, workers=tc.num_workers, step=step_fn,
                                         log_every=tc.log_every, checkpoint_every=tc.checkpoint_every,
                                         on_log=on_log, save=save, out=self.out, label="vocoder", quiet=quiet)
        finally:
            if writer is not None:
                writer.close()
        last_ckpt = saved["checkpoint"]
        if signal is not None and ctx.is_main:
            console.print(f"stopped by signal {signal} at step {step}; saved {last_ckpt or 'nothing new'}",
                          soft_wrap=True)
        if last_ckpt is None and step > 0:  # nothing left to train (resumed at the end) or stopped at once
            last_ckpt = checkpoint.latest(self.out) if ctx.is_main else None
        elapsed = time.perf_counter() - started
        summary = {"step": step, "steps_run": step - start_step, "seconds": elapsed,
                   "checkpoint": str(last_ckpt) if last_ckpt else None, "eval_mel_loss": saved["eval_mel"],
                   "interrupted": signal, **{f"loss/{k}": v for k, v in (last or {}).items()}}
        if not quiet:
            _print_summary(summary, self.out)
        return summary

def _describe(row: dict[str, float]) -> str:
    keys = ("generator", "mel", "stft", "adversarial", "discriminator")
    return " ".join(f"{k[:4]} {row[k]:.3f}" for k in keys if k in row)


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    table = Table(title=f"vocoder training: {out}", show_header=False)
    table.add_row("step", str(summary["step"]))
    rate = summary["steps_run"] / summary["seconds"] if summary["seconds"] > 0 else 0.0
    table.add_row("steps run", f"{summary['steps_run']} in {summary['seconds']:.1f} s ({rate:.2f} steps/s)")
    for key, value in summary.items():
        if key.startswith("loss/"):
            table.add_row(key, f"{value:.4f}")
    if summary["eval_mel_loss"] is not None:
        table.add_row("eval mel L1 (log10)", f"{summary['eval_mel_loss']:.4f}")
    table.add_row("checkpoint", str(summary["checkpoint"]))
    console.print(table)
