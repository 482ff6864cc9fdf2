"""The streaming two-pass log-mel (`MelStream`, `resample_blocks`) gives the one-pass feature's
numbers (`log_mel_spectrogram(load_audio(...))`, the reference definition) in flat memory."""
import tracemalloc

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import harmonic

from sqaudio.config import FeatureConfig
from sqaudio.data.audio import AudioError, load_audio, resample
from sqaudio.data.features import log_mel_spectrogram
from sqaudio.data.stream import MelStream, read_blocks, resample_blocks

CFG = FeatureConfig()


def _signal(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    x = np.concatenate([harmonic(seconds / 3, rate=rate, f0=110 + 35 * i, seed=i) for i in range(3)])
    x[len(x) // 3] = 0.95  # the peak in the middle of the file, far from any block edge
    return x if channels == 1 else np.stack([x, 0.3 * x[::-1]], axis=1)


@pytest.mark.parametrize("rate,channels", [(16000, 1), (22050, 2), (48000, 1), (8000, 1)])
def test_stream_equals_the_one_pass_feature(tmp_path, rate, channels):
    path = tmp_path / "in.wav"
    sf.write(path, _signal(6.01, rate, channels), rate, subtype="FLOAT")  # odd length: reflection at the end
    ref = log_mel_spectrogram(load_audio(path, CFG), CFG)
    stream = MelStream(path, CFG, block_frames=97, read_block=10007)  # many blocks, edges nowhere in particular
    chunks = list(stream.chunks())
    assert len(chunks) > 5 and all(c.shape[-1] <= 97 for c in chunks)
    got = torch.cat(chunks, dim=-1).numpy()
    assert got.shape == ref.shape == (CFG.n_mels, stream.frames)
    assert stream.samples == len(load_audio(path, CFG))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(torch.cat(list(stream.chunks()), dim=-1).numpy(), got, rtol=0, atol=0)  # repeatable


def test_stream_pads_the_ends_as_the_feature_config_says(tmp_path):
    """pad_mode constant: zeros beyond the file's ends, as the one-pass STFT (not the default reflection)."""
    import dataclasses

    cfg = dataclasses.replace(CFG, pad_mode="constant")
    path = tmp_path / "in.wav"
    sf.write(path, _signal(3.01, 16000), 16000, subtype="FLOAT")
    ref = log_mel_spectrogram(load_audio(path, cfg), cfg)
    got = torch.cat(list(MelStream(path, cfg, block_frames=97, read_block=10007).chunks()), dim=-1).numpy()
    assert np.abs(ref - log_mel_spectrogram(load_audio(path, CFG), CFG)).max() > 1e-2  # the modes differ here
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("rate", [22050, 48000, 44100, 8000])
def test_resample_blocks_equals_whole_signal_resample(tmp_path, rate):
    x = _signal(7.3, rate)
    whole = resample(torch.from_numpy(x), rate, CFG.sample_rate).numpy()
    blocks = [x[i:i + 9001] for i in range(0, len(x), 9001)]
    got = torch.cat(list(resample_blocks(blocks, rate, CFG.sample_rate))).numpy()
    assert got.shape == whole.shape
    np.testing.assert_allclose(got, whole, rtol=0, atol=1e-6)
    for end in (slice(0, 2000), slice(-2000, None)):  # the file's ends: the same zero padding as the whole call
        np.testing.assert_allclose(got[end], whole[end], rtol=0, atol=1e-6)


def test_stream_rejects_what_load_audio_rejects_with_the_same_message(tmp_path):
    cases = {"silent.wav": (np.zeros(16000, np.float32), 16000),
             "quiet.wav": (np.full(16000, 0.3, np.float32), 16000),
             "short.wav": (harmonic(0.05), 16000),
             "nan.wav": (np.where(np.arange(80000) == 70000, np.nan, harmonic(5.0)).astype(np.float32), 16000),
             "rate.wav": (harmonic(1.0, rate=2000), 2000)}
    for name, (x, rate) in cases.items():
        sf.write(tmp_path / name, x, rate, subtype="FLOAT")
    (tmp_path / "junk.wav").write_bytes(b"not audio at all")
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    for name in [*cases, "junk.wav", "empty.wav"]:
        with pytest.raises(AudioError) as ref:
            load_audio(tmp_path / name, CFG)
        with pytest.raises(AudioError) as got:
            MelStream(tmp_path / name, CFG, read_block=4096)
        assert str(got.value) == str(ref.value), name
        assert "\n" not in str(got.value)


def test_stream_memory_does_not_grow_with_the_file(tmp_path):
    """numpy/Python allocations (tracemalloc) while streaming a file 6x longer stay within 1.5x (the one-pass
    path holds the whole waveform: 6x)."""
    peaks = []
    for seconds in (8.0, 48.0):
        path = tmp_path / f"in{seconds:g}.wav"
        sf.write(path, np.tile(_signal(8.0, 22050), int(seconds / 8)), 22050)
        tracemalloc.start()
        stream = MelStream(path, CFG)
        frames = sum(c.shape[-1] for c in stream.chunks())
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert frames == stream.frames
    assert peaks[1] < 1.5 * peaks[0], peaks


def test_read_blocks_downmixes_like_read_audio(tmp_path):
    x = _signal(2.0, 16000, channels=2)
    sf.write(tmp_path / "st.wav", x, 16000, subtype="FLOAT")
    rate, blocks = read_blocks(tmp_path / "st.wav", 3000)
    np.testing.assert_array_equal(np.concatenate(list(blocks)), x.mean(axis=1))
    assert rate == 16000
