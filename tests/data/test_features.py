"""The log-mel feature against an independent librosa computation of the reference recipe (sony/sqvae preprocess.py
on librosa 0.7.2 + resampy), audio reading of every PCM/float format, and bad-input errors."""
from __future__ import annotations

import librosa
import numpy as np
import pytest
import resampy
import scipy.signal
import soundfile as sf
import torch
from conftest import harmonic

from sqaudio.config import FeatureConfig
from sqaudio.data.audio import AudioError, load_audio, min_samples, prepare_waveform, read_audio
from sqaudio.data.features import LogMel, check_config, log_mel_spectrogram, logmel_to_db
from sqaudio.data.synthetic import make_voices, synthesize
from sqaudio.errors import UserError

CFG = FeatureConfig()


def reference_logmel(wav: np.ndarray, cfg: FeatureConfig = CFG) -> np.ndarray:
    """The reference recipe, written with librosa (reflect padding as in librosa 0.7.2)."""
    wav = wav / np.abs(wav).max() * cfg.peak
    wav = scipy.signal.lfilter([1, -cfg.preemphasis], [1], wav)
    mel = librosa.feature.melspectrogram(y=wav, sr=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length,
                                         win_length=cfg.win_length, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax,
                                         power=1, pad_mode=cfg.pad_mode)
    return librosa.amplitude_to_db(mel, top_db=cfg.top_db) / cfg.top_db + 1


def resampy_kaiser_best(x: np.ndarray, sr_orig: int, sr_new: int) -> np.ndarray:
    """numpy transcription of resampy's `kaiser_best` resampling as librosa 0.7.2's load used it (length fixed to
    ceil(len * ratio)). Checked against resampy 0.4.3 itself: max difference 1.4e-7 on white noise."""
    num_zeros, num_bits, rolloff, beta = 50, 2**13, 0.9173473712608761, 12.9846
    n = num_bits * num_zeros
    taper = scipy.signal.windows.kaiser(2 * n + 1, beta)[n:]
    win = rolloff * np.sinc(rolloff * np.linspace(0, num_zeros, n + 1)) * taper
    ratio = sr_new / sr_orig
    scale = min(1.0, ratio)
    win = win * scale
    delta = np.diff(win, append=win[-1])
    step = int(scale * num_bits)
    time = np.arange(int(len(x) * ratio)) / ratio
    base = time.astype(np.int64)
    taps = np.arange(len(win) // step + 1)
    y = np.zeros(len(time))
    frac = scale * (time - base)
    for left, f in ((True, frac), (False, scale - frac)):
        index = f * num_bits
        offset = index.astype(np.int64)
        pos = offset[:, None] + taps * step
        src = base[:, None] - taps if left else base[:, None] + 1 + taps
        ok = (pos + step <= len(win)) & (src >= 0) & (src < len(x))
        pos, src = np.where(ok, pos, 0), np.where(ok, src, 0)
        y += np.sum(np.where(ok, (win[pos] + (index - offset)[:, None] * delta[pos]) * x[src], 0.0), axis=1)
    return np.pad(y, (0, int(np.ceil(len(x) * ratio)) - len(y)))


def signals(rate: int) -> list[np.ndarray]:
    """A harmonic vowel-like tone, the same with clicks and noise bursts, and (16 kHz only) a synthetic voice."""
    rng = np.random.default_rng(rate)
    out = [harmonic(1.3, rate=rate, f0=120, seed=1)]
    noisy = harmonic(0.9, rate=rate, f0=210, seed=2)
    noisy += (0.1 * rng.standard_normal(noisy.size) * (rng.random(noisy.size) < 0.05)).astype(np.float32)
    out.append(noisy)
    if rate == 16000:
        out.append(synthesize(make_voices(2)[1], 1.7, seed=5))
    return out


@pytest.mark.parametrize("method", ["frames", "stft"])
def test_16k_matches_librosa_reference(method):
    module = LogMel(CFG, method)
    for wav in signals(16000):
        ours = module(torch.from_numpy(wav)[None])[0].numpy()
        ref = reference_logmel(wav.astype(np.float64))
        assert ours.shape == ref.shape == (80, len(wav) // 160 + 1)
        assert np.abs(ours - ref).max() < 1e-4


@pytest.mark.parametrize("rate", [8000, 22050, 48000])
def test_resampled_matches_reference_pipeline(rate):
    """Against librosa 0.7.2's load (resampy kaiser_best): max 5e-3 (0.4 dB, the top bands near 8 kHz where the
    two resamplers' table stepping differs), mean 2e-4. Measured: max 2e-3 (48 kHz), 5e-4 (22.05 kHz), 7e-5 (8 kHz)."""
    for wav in signals(rate):
        ours = log_mel_spectrogram(prepare_waveform(wav, rate, CFG), CFG)
        ref = reference_logmel(resampy_kaiser_best(wav.astype(np.float64), rate, 16000))
        assert ours.shape == ref.shape
        diff = np.abs(ours - ref)
        assert diff.max() < 5e-3 and diff.mean() < 2e-4, (diff.max(), diff.mean())


@pytest.mark.parametrize("rate", [8000, 22050, 48000])
def test_resampled_close_to_librosa_default_resampler(rate):
    """librosa >= 0.10 loads with soxr_hq, a different filter: mean |difference| below 0.015 (1.2 dB)
    and, in bands below 85% of the lower Nyquist frequency, max below 0.06. Measured: mean <= 9e-3."""
    upper = librosa.mel_frequencies(CFG.n_mels + 2, fmin=CFG.fmin, fmax=8000)[2:]
    in_band = upper < 0.85 * min(rate, 16000) / 2
    for wav in signals(rate):
        ours = log_mel_spectrogram(prepare_waveform(wav, rate, CFG), CFG)
        resampled = librosa.resample(wav.astype(np.float64), orig_sr=rate, target_sr=16000, res_type="soxr_hq")
        ref = reference_logmel(resampled)
        diff = np.abs(ours - ref)
        assert diff.mean() < 0.015 and diff[in_band].max() < 0.06


def test_resampler_matches_resampy():
    x = np.random.default_rng(0).standard_normal(44100)
    ours = prepare_waveform(x.astype(np.float32), 44100, CFG)
    theirs = resampy.resample(x, 44100, 16000, filter="kaiser_best")
    assert np.abs(ours[: len(theirs)] - theirs).max() < 3e-3


@pytest.mark.parametrize("cfg", [
    FeatureConfig(n_mels=40, n_fft=1024, win_length=401, hop_length=128, fmin=0.0, fmax=7000.0, top_db=60.0),
    FeatureConfig(n_fft=512, win_length=512, hop_length=100, pad_mode="constant", preemphasis=0.0),
])
def test_other_settings_match_librosa(cfg):
    wav = harmonic(1.0, f0=170, seed=4)
    for method in ("frames", "stft"):
        ours = LogMel(cfg, method)(torch.from_numpy(wav)[None])[0].numpy()
        ref = reference_logmel(wav.astype(np.float64), cfg)
        assert ours.shape == ref.shape and np.abs(ours - ref).max() < 1e-4


def test_frame_count_and_batch_equals_single():
    module = LogMel(CFG)
    for n in (min_samples(CFG), 1600, 16159, 16160):
        assert module(torch.randn(1, n)).shape == (1, 80, n // 160 + 1)
    a, b = harmonic(1.0, f0=100, seed=1), harmonic(1.0, f0=230, seed=2)
    batch = module(torch.from_numpy(np.stack([a, b])))
    assert torch.allclose(batch[1], module(torch.from_numpy(b)[None])[0], atol=1e-6)
    assert not torch.allclose(batch[0], batch[1], atol=1e-2)  # rows are normalised independently


def test_logmel_to_db_gives_librosa_decibels():
    wav = harmonic(0.5, seed=3)
    db = logmel_to_db(torch.from_numpy(log_mel_spectrogram(wav, CFG)), CFG).numpy()
    w = scipy.signal.lfilter([1, -0.97], [1], wav / np.abs(wav).max() * 0.999)
    mel = librosa.feature.melspectrogram(y=w, sr=16000, n_fft=2048, hop_length=160, win_length=400, n_mels=80,
                                         fmin=50, power=1, pad_mode="reflect")
    assert np.abs(db - librosa.amplitude_to_db(mel, top_db=80)).max() < 1e-2


@pytest.mark.parametrize("subtype,tol", [("PCM_U8", 1 / 64), ("PCM_16", 1e-4), ("PCM_24", 1e-6), ("PCM_32", 1e-6),
                                         ("FLOAT", 0), ("DOUBLE", 1e-7)])
def test_read_audio_formats(tmp_path, subtype, tol):
    wav = harmonic(0.3, rate=22050, seed=6)
    path = tmp_path / f"x_{subtype}.wav"
    sf.write(path, wav, 22050, subtype=subtype)
    got, rate = read_audio(path)
    assert rate == 22050 and got.dtype == np.float32 and np.abs(got - wav).max() <= tol


def test_stereo_is_averaged_and_segments_are_cut(tmp_path):
    left, right = harmonic(1.0, f0=100, seed=1), harmonic(1.0, f0=300, seed=2)
    path = tmp_path / "stereo.flac"
    sf.write(path, np.stack([left, right], axis=1), 16000, subtype="PCM_24")
    got, _ = read_audio(path)
    assert np.abs(got - (left + right) / 2).max() < 1e-5
    segment, _ = read_audio(path, offset=0.25, duration=0.5)
    assert np.array_equal(segment, got[4000:12000])
    assert len(load_audio(path, CFG, offset=0.5)) == 8000


def _bad_files(tmp_path) -> dict[str, str]:
    sf.write(tmp_path / "silent.wav", np.zeros(16000), 16000)
    sf.write(tmp_path / "dc.wav", np.full(16000, 0.3), 16000)
    sf.write(tmp_path / "nan.wav", np.where(np.arange(16000) == 500, np.nan, 0.1).astype(np.float32), 16000,
             subtype="FLOAT")
    sf.write(tmp_path / "short.wav", harmonic(0.05, seed=1), 16000)
    sf.write(tmp_path / "zero_frames.wav", np.zeros(0), 16000)
    sf.write(tmp_path / "low_rate.wav", harmonic(1.0, rate=1000, seed=1), 1000)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage" * 3)
    (tmp_path / "empty.flac").write_bytes(b"")
    return {"silent.wav": "silent", "dc.wav": "silent", "nan.wav": "NaN", "short.wav": "too short",
            "zero_frames.wav": "empty", "low_rate.wav": "sample rate", "corrupt.wav": "unreadable",
            "empty.flac": "unreadable"}


def test_bad_audio_raises_one_line_audio_errors(tmp_path):
    for name, words in _bad_files(tmp_path).items():
        with pytest.raises(AudioError) as err:
            load_audio(tmp_path / name, CFG)
        assert words in str(err.value) and "\n" not in str(err.value), (name, str(err.value))


@pytest.mark.parametrize("changes", [dict(win_length=4096), dict(hop_length=0), dict(n_mels=0), dict(fmin=9000.0),
                                     dict(fmax=9000.0), dict(pad_mode="edge"), dict(peak=1.5)])
def test_impossible_feature_configs_are_user_errors(changes):
    import dataclasses

    with pytest.raises(UserError):
        check_config(dataclasses.replace(CFG, **changes))


def test_batched_log_mel_of_long_recordings_is_chunked_and_exact():
    """Rows longer than FRAME_CHUNK frames (20 s) go through the chunked path and equal one-by-one features."""
    from conftest import harmonic

    from sqaudio.config import FeatureConfig
    from sqaudio.data.features import FRAME_CHUNK, LogMel

    cfg = FeatureConfig()
    logmel = LogMel(cfg, method="frames")
    long = torch.from_numpy(harmonic(FRAME_CHUNK * cfg.hop_length / cfg.sample_rate + 2.5, seed=1))
    short = torch.from_numpy(harmonic(1.0, seed=2))
    batched = logmel.batch([long, short])
    assert batched[0].shape[-1] > FRAME_CHUNK
    for got, wav in zip(batched, (long, short)):
        torch.testing.assert_close(got, logmel(wav[None])[0], atol=1e-5, rtol=0)
