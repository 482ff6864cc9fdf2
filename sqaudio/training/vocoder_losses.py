"""The vocoder's losses and optimizers: parallel-wavegan's criteria (with a spectral convergence over the global
batch under DDP) and Adam-family optimizers whose learning rate is a pure function of the step."""
from __future__ import annotations

import torch

from sqaudio import distributed
from sqaudio.codec.vocoders import OPTIMIZER_TYPES, OptimizerConfig, VocoderConfig
from sqaudio.config import FeatureConfig

OPTIMIZERS = {name: getattr(torch.optim, name) for name in OPTIMIZER_TYPES}


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
        loss = self.cfg = cfg.loss
        self.stft = pwg.MultiResolutionSTFTLoss(loss.stft.fft_sizes, loss.stft.hop_sizes, loss.stft.win_lengths,
                                                loss.stft.window) if loss.stft.weight > 0 else None
        sub = loss.subband_stft
        self.subband_stft = pwg.MultiResolutionSTFTLoss(sub.fft_sizes, sub.hop_sizes, sub.win_lengths,
                                                        sub.window) if sub.weight > 0 else None
        self.mel = pwg.MelSpectrogramLoss(
            fs=features.sample_rate, fft_size=features.n_fft, hop_size=features.hop_length,
            win_length=features.win_length, window="hann", num_mels=features.n_mels, fmin=features.fmin,
            fmax=features.fmax, log_base=10.0)
        self.generator_adversarial = pwg.GeneratorAdversarialLoss(loss.average_by_discriminators,
                                                                  loss.adversarial_type)
        self.discriminator_adversarial = pwg.DiscriminatorAdversarialLoss(loss.average_by_discriminators,
                                                                          loss.adversarial_type)
        self.feature_matching = pwg.FeatureMatchLoss(
            loss.feat_match_average_by_layers, loss.average_by_discriminators,
            loss.feat_match_include_final) if loss.feat_match > 0 else None
        for multi in (self.stft, self.subband_stft):
            for single in multi.stft_losses if multi is not None else []:
                single.spectral_convergence_loss = GlobalSpectralConvergence()


def make_optimizer(params, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimizer `cfg` names, over `params`."""
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


def update(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, step: int, loss: torch.Tensor, params) -> None:
    """One optimizer step on `loss` at the schedule's learning rate of `step`, clipping the gradient norm."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(cfg, step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_norm)
    optimizer.step()
