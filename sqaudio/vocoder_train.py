"""`sqaudio vocoder train`: a parallel-wavegan GAN vocoder on the prepared store's features.

The batch of step s is a pure function of (seed, s), and the model RNGs (noise inputs, random discriminator
windows) are saved in every checkpoint, so `--resume` continues exactly where the run stopped.

Under torchrun (WORLD_SIZE > 1) every process takes its slice of each global batch, generator and
discriminator are wrapped in DistributedDataParallel, and only rank 0 writes (docs/distributed.md). All losses
are batch means except spectral convergence, which is computed from sums over all ranks, so N processes follow
the single-process trajectory for models without noise inputs (HiFi-GAN, MelGAN).
"""
from __future__ import annotations

import math
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from sqaudio import checkpoint, distributed
from sqaudio.checkpoint import atomic_write
from sqaudio.config import FeatureConfig, from_dict, to_dict
from sqaudio.data import StepBatches, step_generator
from sqaudio.device import pick_device
from sqaudio.distributed import StopSignals
from sqaudio.errors import UserError
from sqaudio.features import AudioError, load_audio, prepare_waveform
from sqaudio.store import Store, open_store
from sqaudio.vocoder import (CHECKPOINT_FORMAT, OptimizerConfig, VocoderConfig, build_generator, config_yaml,
                             load_vocoder_config)

console = Console(stderr=True)
OPTIMIZERS = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW, "RAdam": torch.optim.RAdam}
EVAL_MAX_FRAMES = 400


# ------------------------------------------------------------------ data

def entry_audio(store: Store, entry: dict[str, Any]) -> np.ndarray:
    """The 16 kHz waveform behind a manifest entry (honouring offset/duration), peak-normalised as the
    features see it. Returns float32 (samples,)."""
    cfg = store.features
    source = Path(entry["source"])
    if not source.is_absolute() and not source.exists():
        source = store.root / source
    try:
        if "offset" in entry or "duration" in entry:
            info = sf.info(str(source))
            start = int(round(float(entry.get("offset") or 0.0) * info.samplerate))
            stop = start + int(round(float(entry["duration"]) * info.samplerate)) if entry.get("duration") else None
            data, rate = sf.read(str(source), start=start, stop=stop, dtype="float32", always_2d=True)
            wav = prepare_waveform(data.mean(axis=1), rate, cfg)
        else:
            wav = load_audio(source, cfg)
    except AudioError as err:
        raise UserError(f"training audio {source} (entry {entry.get('id')}): {err}") from None
    except (OSError, RuntimeError) as err:
        raise UserError(f"training audio {source} (entry {entry.get('id')}) cannot be read: {err}") from None
    return (wav / np.abs(wav).max() * cfg.peak).astype(np.float32)


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
    crop offset from an RNG keyed by its position in the global batch (`sqaudio.data.StepBatches`), so the
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
        from sqaudio import pwg
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
    from sqaudio import pwg
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


# ------------------------------------------------------------------ RNG state (weights_only-safe)

def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, _ = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64)}}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate((state["python"]["version"], tuple(int(v) for v in state["python"]["state"]), None))


def seed_all(seed: int) -> None:
    """Seed the torch (CPU and CUDA), numpy and Python RNGs the models draw from."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rank_seed(seed: int, rank: int, step: int) -> int:
    """Seed of the model RNG stream of a rank > 0 started (or restarted without its saved state) at `step`.

    Rank 0 continues the single-process stream; the others get their own, so noise inputs and random
    discriminator windows differ between the ranks' slices of a batch.
    """
    return step_generator(seed, 3, rank, step).initial_seed()


def gather_rng_states(ctx: distributed.Context) -> list[dict[str, Any]]:
    """Every rank's `rng_state()`, in rank order (a collective: all ranks call it)."""
    if ctx.world == 1:
        return [rng_state()]
    import torch.distributed as dist

    states: list[Any] = [None] * ctx.world
    dist.all_gather_object(states, rng_state())
    return states


def restore_rng(state: dict[str, Any], ctx: distributed.Context, seed: int) -> None:
    """Each rank takes its own saved stream when the checkpoint has one per rank of this world size;
    otherwise rank 0 takes the saved (rank-0) stream and the others start fresh ones (`rank_seed`)."""
    ranks = state.get("rng_ranks") or []
    if len(ranks) == ctx.world:
        set_rng_state(ranks[ctx.rank])
    elif ctx.rank == 0:
        set_rng_state(state["rng"])
    else:
        seed_all(rank_seed(seed, ctx.rank, int(state["step"])))


# ------------------------------------------------------------------ training

def train_vocoder(features_dir: str | Path, out_dir: str | Path, recipe: str | Path | None = None,
                  overrides: list[str] | None = None, resume: bool = False, device: str | None = None,
                  quiet: bool = False) -> dict[str, Any]:
    """Train (or with `resume`, continue) a vocoder in `out_dir` on a prepared store. Returns a summary.

    Under torchrun (WORLD_SIZE > 1) each process trains on its slice of every global batch of
    `train.batch_size` crops with DistributedDataParallel; only rank 0 writes to `out_dir`.
    """
    store, out, dev = open_store(features_dir), Path(out_dir), pick_device(device)
    state = None
    if resume:
        if recipe is not None:
            raise UserError("--recipe cannot be combined with --resume (the run's saved config is used; "
                            "change settings such as train.steps with --set)")
        state = checkpoint.load(checkpoint.latest(out))
        if state.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"{out} does not hold vocoder checkpoints")
        cfg = load_vocoder_config(base=state["config"], overrides=overrides)
        saved = from_dict(FeatureConfig, state["features"], "features")
        if saved != store.features:
            diff = [k for k in to_dict(saved) if to_dict(saved)[k] != to_dict(store.features)[k]]
            raise UserError(f"{features_dir} has other features than the run in {out}: {', '.join(diff)} differ")
    else:
        if checkpoint.list_checkpoints(out):
            raise UserError(f"{out} already has checkpoints: pass --resume to continue, or choose another --out")
        cfg = load_vocoder_config(recipe or "hifigan", overrides)
    features, tc = store.features, cfg.train
    seed_all(tc.seed)
    generator = build_generator(cfg, features)
    validate(cfg, features, generator)
    from sqaudio.pwg import build_discriminator
    discriminator = build_discriminator(cfg.discriminator_type, cfg.discriminator_params)
    losses = Losses(cfg, features)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # checked before joining, so every rank fails alike at once
    if tc.batch_size % world:
        raise UserError(f"train.batch_size {tc.batch_size} is not divisible by {world} processes")
    entries = usable_entries(store, "train", tc.batch_frames)
    if not entries:
        raise UserError(f"no training utterance in {features_dir} is longer than train.batch_frames="
                        f"{tc.batch_frames} frames")
    ctx = distributed.init_from_env(dev)
    try:
        if dev.type == "cuda" and ctx.world > 1:
            dev = torch.device("cuda", ctx.local_rank)
            torch.cuda.set_device(dev)
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
            restore_rng(state, ctx, tc.seed)
        elif ctx.rank > 0:
            seed_all(rank_seed(tc.seed, ctx.rank, 0))
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            checkpoint.remove_stale_temporaries(out)
            atomic_write(out / "config.yaml", lambda tmp: tmp.write_text(config_yaml(cfg, features)))
        run = _Run(cfg, features, store, out, dev, generator, discriminator, losses, g_opt, d_opt, ctx)
        return run.loop(entries, step, quiet or not ctx.is_main)
    finally:
        distributed.shutdown()


class _Run:
    """One training run's state; `loop` is the training loop.

    `G`/`D` are the plain modules (checkpoints, evaluation, no-grad passes); `G_train`/`D_train` the ones whose
    gradients are averaged across processes (DistributedDataParallel under torchrun, else the same modules).
    """

    def __init__(self, cfg, features, store, out, dev, generator, discriminator, losses, g_opt, d_opt,
                 ctx: distributed.Context):
        self.cfg, self.features, self.store, self.out, self.dev = cfg, features, store, out, dev
        self.G, self.D, self.losses, self.g_opt, self.d_opt = generator, discriminator, losses, g_opt, d_opt
        self.ctx = ctx
        self.G_train, self.D_train = generator, discriminator
        if ctx.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # No BatchNorm in these models; weight/spectral-norm buffers evolve identically on every rank, and
            # re-broadcasting them before each of the two discriminator passes would clobber saved tensors.
            ids = [dev.index] if dev.type == "cuda" else None
            self.G_train = DDP(generator, device_ids=ids, forward_sync_buffers=False)
            self.D_train = DDP(discriminator, device_ids=ids, forward_sync_buffers=False)

    def generator_step(self, mel: torch.Tensor, wav: torch.Tensor, step: int) -> tuple[dict[str, float], torch.Tensor]:
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
        return {k: float(v.detach()) for k, v in terms.items()}, wav_hat.detach()

    def discriminator_step(self, mel: torch.Tensor, wav: torch.Tensor, wav_hat: torch.Tensor, step: int):
        if self.cfg.train.recompute_after_generator_update:
            with torch.no_grad():
                wav_hat = self.G(mel)
        real_loss, fake_loss = self.losses.dis_adv(self.D_train(wav_hat[:, None]), self.D_train(wav[:, None]))
        loss = real_loss + fake_loss
        _update(self.d_opt, self.cfg.discriminator_optimizer, step, loss, self.D.parameters())
        return {"real": float(real_loss.detach()), "fake": float(fake_loss.detach()), "discriminator": float(loss.detach())}

    def agree(self, row: dict[str, float], signum: int | None) -> tuple[dict[str, float], bool, int | None]:
        """One all-reduce per step: whether any rank's loss is non-finite or any rank was signalled, and the
        loss terms averaged over ranks (the global-batch means that are logged). Identity in one process."""
        bad = not all(math.isfinite(v) for v in row.values())
        if self.ctx.world == 1:
            return row, bad, signum
        keys = sorted(row)
        flags = [float(bad), float(signum == signal.SIGINT), float(signum == signal.SIGTERM)]
        total = distributed.sum_all(torch.tensor(flags + [row[k] for k in keys], dtype=torch.float64,
                                                 device=self.dev)).tolist()
        agreed = signal.SIGTERM if total[2] > 0 else signal.SIGINT if total[1] > 0 else None
        return {k: v / self.ctx.world for k, v in zip(keys, total[3:])}, total[0] > 0, agreed

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
        rngs = gather_rng_states(self.ctx)
        path = self.out / f"checkpoint-{step}.pt"
        if self.ctx.is_main:
            state = {"format": CHECKPOINT_FORMAT, "version": 1, "step": step, "config": to_dict(self.cfg),
                     "features": to_dict(self.features), "generator": self.G.state_dict(),
                     "discriminator": self.D.state_dict(), "generator_optimizer": self.g_opt.state_dict(),
                     "discriminator_optimizer": self.d_opt.state_dict(), "rng": rngs[0],
                     **({"rng_ranks": rngs} if self.ctx.world > 1 else {})}
            path = checkpoint.save_step(state, self.out, step, self.cfg.train.keep_last)
        return path

    def loop(self, entries: list[dict[str, Any]], step: int, quiet: bool) -> dict[str, Any]:
        from torch.utils.tensorboard import SummaryWriter
        tc, ctx = self.cfg.train, self.ctx
        data = crop_batches(self.store, entries, tc.batch_size, tc.batch_frames, tc.seed, tc.cache_mb,
                            ctx.rank, ctx.world)
        loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=range(step, tc.steps),
                                             num_workers=tc.num_workers, generator=torch.Generator(),
                                             pin_memory=self.dev.type == "cuda")
        start_step, started, last_ckpt, sums, count = step, time.perf_counter(), None, {}, 0
        last: dict[str, float] = {}
        eval_mel, interrupted = None, None
        self.G.train(), self.D.train()
        progress = Progress(TextColumn("vocoder"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TimeRemainingColumn(), TextColumn("{task.description}"), console=console,
                            disable=quiet)
        with StopSignals() as stop, progress:  # before the writer and the loader's workers (they inherit it)
            writer = SummaryWriter(str(self.out / "logs")) if ctx.is_main else None
            try:
                task = progress.add_task("", total=tc.steps, completed=step)
                for mel, wav in loader:
                    mel, wav = mel.to(self.dev, non_blocking=True), wav.to(self.dev, non_blocking=True)
                    row, wav_hat = self.generator_step(mel, wav, step)
                    if step >= tc.discriminator_start:
                        row.update(self.discriminator_step(mel, wav, wav_hat, step))
                    row, bad, interrupted = self.agree(row, stop.signal)  # the same decision on every rank
                    if bad:
                        good = checkpoint.list_checkpoints(self.out)
                        raise UserError(f"non-finite loss at step {step + 1} ({_describe(row)}); stopped without "
                                        f"saving (last good checkpoint: {good[-1] if good else 'none'})")
                    step += 1
                    for k, v in row.items():
                        sums[k] = sums.get(k, 0.0) + v
                    count += 1
                    if writer is not None and (step % tc.log_every == 0 or step == tc.steps):
                        last = {k: v / count for k, v in sums.items()}
                        for k, v in last.items():
                            writer.add_scalar(f"train/{k}", v, step)
                        writer.add_scalar("train/lr", learning_rate(self.cfg.generator_optimizer, step - 1), step)
                        sums, count = {}, 0
                    progress.update(task, completed=step, description=_describe(last or row))
                    if step % tc.checkpoint_every == 0 or step == tc.steps or interrupted is not None:
                        if ctx.is_main and tc.eval_utterances > 0 and (eval_mel := self.evaluate()) is not None:
                            writer.add_scalar("eval/mel_loss", eval_mel, step)
                        last_ckpt = self.save(step)
                    if interrupted is not None:
                        if ctx.is_main:
                            console.print(f"stopped by signal {interrupted} at step {step}; saved {last_ckpt}")
                        break
            finally:
                if writer is not None:
                    writer.close()
        distributed.barrier()  # rank 0 has finished writing before any rank reports
        if last_ckpt is None and step > 0:  # nothing left to train (resumed at the end)
            last_ckpt = checkpoint.latest(self.out)
        elapsed = time.perf_counter() - started
        summary = {"step": step, "steps_run": step - start_step, "seconds": elapsed,
                   "checkpoint": str(last_ckpt) if last_ckpt else None, "eval_mel_loss": eval_mel,
                   "interrupted": interrupted, **{f"loss/{k}": v for k, v in (last or {}).items()}}
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
