"""Audio metrics against known values (identical signals, white noise at a known SNR) and independent
computations (a least-squares projection for SI-SDR, librosa for the log-mel distance)."""
import librosa
import numpy as np
import pytest
import scipy.signal
from conftest import harmonic

from sqaudio.config import FeatureConfig
from sqaudio.errors import UserError
from sqaudio.evaluation.audio import audio_metrics, mean_metrics, mel_distance_db2, pesq_wb, si_sdr_db, stoi

CFG = FeatureConfig()
SPEECH = harmonic(2.0, seed=3)


def with_noise(x: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    """x plus white Gaussian noise scaled to the given SNR (signal power over noise power, measured)."""
    noise = np.random.default_rng(seed).standard_normal(x.size)
    noise *= np.linalg.norm(x) / np.linalg.norm(noise) / 10 ** (snr_db / 20)
    return (x + noise).astype(np.float32)


def test_identical_signals_reach_each_metric_best_value():
    m = audio_metrics(SPEECH, SPEECH, CFG)
    assert m["pesq_wb"] == pytest.approx(4.644, abs=1e-3)  # the top of the P.862.2 MOS-LQO mapping
    assert m["stoi"] == pytest.approx(1.0, abs=1e-9) and m["estoi"] == pytest.approx(1.0, abs=1e-9)
    assert m["si_sdr_db"] > 100 and m["mel_distance_db2"] == 0.0


@pytest.mark.parametrize("snr", [0.0, 10.0, 20.0])
def test_si_sdr_of_white_noise_is_its_snr(snr):
    assert si_sdr_db(SPEECH, with_noise(SPEECH, snr)) == pytest.approx(snr, abs=0.1)


def test_si_sdr_matches_a_least_squares_projection_and_ignores_scale():
    est = 0.3 * with_noise(SPEECH, 5.0, seed=1) + 0.2 * np.roll(SPEECH, 40)
    ref0, est0 = SPEECH - SPEECH.mean(), est - est.mean()
    coef, *_ = np.linalg.lstsq(ref0[:, None].astype(np.float64), est0.astype(np.float64), rcond=None)
    target = coef[0] * ref0
    expected = 10 * np.log10(np.sum(target**2) / np.sum((est0 - target) ** 2))
    assert si_sdr_db(SPEECH, est) == pytest.approx(expected, abs=1e-6)
    assert si_sdr_db(SPEECH, 7.0 * est) == pytest.approx(expected, abs=1e-6)


def test_pesq_and_stoi_fall_as_noise_rises():
    scores = [audio_metrics(SPEECH, with_noise(SPEECH, snr), CFG) for snr in (30.0, 10.0, -5.0)]
    for key in ("pesq_wb", "stoi", "estoi"):
        values = [s[key] for s in scores]
        assert values[0] > values[1] > values[2], (key, values)
    assert stoi(SPEECH, with_noise(np.zeros_like(SPEECH) + 1e-3, 0.0), CFG.sample_rate) < 0.3  # unrelated signal


def test_pesq_resamples_other_rates():
    at_16k = pesq_wb(SPEECH, with_noise(SPEECH, 15.0), 16000)
    up = [librosa.resample(x, orig_sr=16000, target_sr=24000) for x in (SPEECH, with_noise(SPEECH, 15.0))]
    assert pesq_wb(*up, 24000) == pytest.approx(at_16k, abs=0.15)


def reference_logmel_db(wav: np.ndarray) -> np.ndarray:
    """The feature written independently with librosa, in dB (peak-normalise, pre-emphasis, Slaney mel)."""
    wav = scipy.signal.lfilter([1, -CFG.preemphasis], [1], wav / np.abs(wav).max() * CFG.peak)
    mel = librosa.feature.melspectrogram(y=wav, sr=CFG.sample_rate, n_fft=CFG.n_fft, hop_length=CFG.hop_length,
                                         win_length=CFG.win_length, n_mels=CFG.n_mels, fmin=CFG.fmin, fmax=CFG.fmax,
                                         power=1, pad_mode=CFG.pad_mode)
    return librosa.amplitude_to_db(mel, top_db=CFG.top_db)


def test_mel_distance_matches_librosa():
    noisy = with_noise(SPEECH, 10.0)
    expected = np.mean((reference_logmel_db(noisy.astype(np.float64)) - reference_logmel_db(SPEECH.astype(np.float64))) ** 2)
    assert mel_distance_db2(SPEECH, noisy, CFG) == pytest.approx(expected, rel=1e-3)
    assert mel_distance_db2(SPEECH, 0.5 * SPEECH, CFG) == pytest.approx(0.0, abs=1e-6)  # level-normalised feature


def test_short_signals_leave_pesq_and_stoi_undefined_and_means_count_them():
    short = SPEECH[:3000]
    m = audio_metrics(short, short, CFG)
    assert m["pesq_wb"] is None and m["stoi"] is None and m["si_sdr_db"] > 100
    mean = mean_metrics([m, audio_metrics(SPEECH, SPEECH, CFG)])
    assert mean["pesq_wb"] == pytest.approx(4.644, abs=1e-3) and mean["pesq_wb_undefined"] == 1
    assert "si_sdr_db_undefined" not in mean


@pytest.mark.parametrize("est", [SPEECH[:-1], np.stack([SPEECH, SPEECH]), np.full_like(SPEECH, np.nan)])
def test_mismatched_or_bad_signals_are_user_errors(est):
    with pytest.raises(UserError):
        audio_metrics(SPEECH, est, CFG)
