"""Long inputs run window by window (bounded memory) and the stitched result equals the one-pass result
closely: exact codes, a crossfaded decoder mel and vocoder waveform without seams."""
import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import harmonic

from sqaudio.codec.chunking import overlap_apply, spans
from sqaudio.codec.codec import VOCODER_CONTEXT, Codec
from sqaudio.codec.mel_conventions import MelConvention
from sqaudio.codec.vocoders import GriffinLimVocoder, NeuralVocoder, build_generator, load_vocoder_config
from sqaudio.config import FeatureConfig
from sqaudio.models.sqvae import load_model


class RecordingVocoder(NeuralVocoder):
    """The untrained `tiny` recipe generator, remembering the longest input it was given."""

    def __init__(self, features: FeatureConfig):
        torch.manual_seed(0)  # the same weights in every instance
        generator = build_generator(load_vocoder_config("tiny"), features)
        generator.remove_weight_norm()
        super().__init__(generator, MelConvention.of(features), features, "cpu", "tiny (untrained)")
        self.longest = 0

    def generate(self, logmel):
        self.longest = max(self.longest, logmel.shape[-1])
        return super().generate(logmel)


@pytest.fixture(scope="module")
def long_wav(tmp_path_factory):
    path = tmp_path_factory.mktemp("long") / "spk0_long.wav"
    x = np.concatenate([harmonic(2.3, f0=110 + 30 * i, seed=i) for i in range(4)])  # 9.2 s, pitch changes
    sf.write(path, x, 16000)
    return path


@pytest.fixture(scope="module")
def loaded(tiny_model):
    """The tiny model and its checkpoint state, read once for every codec of this module."""
    return load_model(tiny_model, "cpu")


def _codec(loaded, chunk_seconds, vocoder="neural"):
    """A codec of the loaded tiny model with an untrained neural vocoder or Griffin-Lim."""
    model, state = loaded
    codec = Codec(model, state, None, chunk_seconds=chunk_seconds)
    codec.vocoder = RecordingVocoder(codec.features) if vocoder == "neural" else GriffinLimVocoder(codec.features)
    return codec


def test_chunked_reconstruction_equals_one_pass(loaded, long_wav):
    whole, chunked = _codec(loaded, 60.0), _codec(loaded, 2.0)
    a = whole.reconstruct(long_wav)
    wav_a, enc_a, mel_a = a.wav, a.encoded, a.mel_hat
    steps = []
    b = chunked.reconstruct(long_wav, step=lambda: steps.append(1))
    wav_b, enc_b, mel_b = b.wav, b.encoded, b.mel_hat
    assert len(steps) == chunked.windows(len(wav_a)) > 3  # several windows, each reported
    np.testing.assert_array_equal(enc_a.codes, enc_b.codes)  # the encoder's windows cover its receptive field
    assert mel_a.shape == mel_b.shape
    assert (mel_a - mel_b).abs().max().item() < 1e-3 * mel_a.abs().max().item()
    assert wav_a.shape == wav_b.shape == (len(sf.read(long_wav)[0]),)
    err = np.abs(wav_a - wav_b)
    assert err.max() < 1e-3 * np.abs(wav_a).max()  # no seam: the largest difference is tiny
    steps.clear()
    again = chunked.decode(enc_b.codes, enc_b.speaker, len(wav_a), step=lambda: steps.append(1))
    np.testing.assert_array_equal(again, wav_b)  # decode of the codes is the same stitched path
    assert len(steps) == chunked.windows(len(wav_a), encode=False)
    frames = 2 * chunked.chunk_latents + 2 * VOCODER_CONTEXT
    assert chunked.vocoder.longest <= frames < whole.vocoder.longest  # memory bounded by the window


def test_overlap_apply_crossfade_is_a_partition_of_unity():
    x = torch.linspace(-1, 1, 1000)[None]
    for chunk, context, fade in ((100, 10, 16), (333, 40, 60), (50, 5, 10), (2000, 10, 10)):
        y = overlap_apply(lambda s, e: x[:, s:e].repeat_interleave(3, dim=-1), 1000, chunk, context, scale=3,
                          fade=fade)
        torch.testing.assert_close(y, x.repeat_interleave(3, dim=-1))
    cores = spans(1001, 100, 7)
    assert cores[0][2] == 0 and cores[-1][3] == 1001 and all(a[3] == b[2] for a, b in zip(cores, cores[1:]))
    assert min(b - a for _, _, a, b in cores) >= 50


def test_reconstruct_of_a_long_file_through_the_cli(cli, tiny_model, tmp_path):
    src = tmp_path / "spk1_long.wav"
    sf.write(src, np.tile(harmonic(3.0), 8), 16000)  # 24 s: three 10 s windows per stage
    result = cli("reconstruct", src, "-o", tmp_path / "out.wav", "--model", tiny_model, "--device", "cpu")
    assert result.exit_code == 0, result.output
    wav, rate = sf.read(tmp_path / "out.wav")
    assert rate == 16000 and len(wav) == 24 * 16000 and np.abs(wav).max() > 0.01
    sf.write(tmp_path / "spk0_short.wav", harmonic(1.0), 16000)  # one long and one short file: bars take turns
    result = cli("encode", src, tmp_path / "spk0_short.wav", "-o", tmp_path / "codes", "--model", tiny_model)
    assert result.exit_code == 0, result.output
    result = cli("decode", tmp_path / "codes", "-o", tmp_path / "dec", "--model", tiny_model)
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(sf.read(tmp_path / "dec" / "spk1_long.wav")[0], wav)


def test_chunked_griffin_lim_has_no_seams(loaded, long_wav):
    whole = _codec(loaded, 60.0, "griffin-lim")
    chunked = _codec(loaded, 2.0, "griffin-lim")
    mel = whole.encode(long_wav)
    a = whole.decode(mel.codes, mel.speaker, mel.samples)
    b = chunked.decode(mel.codes, mel.speaker, mel.samples)
    # Griffin-Lim's phase depends on how much it sees, so compare the level (100 ms RMS), not samples: a seam
    # where two windows' phases cancel over the 160 ms crossfade would show as a dip; one peak scaling over the
    # stitched signal keeps every window at one level.
    def rms(x):
        return np.sqrt(np.convolve(x**2, np.ones(1600) / 1600, mode="valid"))

    ratio = rms(b) / np.maximum(rms(a), 1e-4)
    assert np.abs(a).max() == pytest.approx(np.abs(b).max(), rel=1e-4)
    assert 0.85 < ratio.min() and ratio.max() < 1.15, (ratio.min(), ratio.max())


@pytest.mark.parametrize("vocoder", ["griffin-lim", "neural"])
def test_streamed_reconstruction_file_equals_the_in_memory_one(loaded, long_wav, tmp_path, vocoder):
    """`reconstruct_to` (what the CLI runs: features in two passes, windows chained, the wav written in blocks;
    Griffin-Lim's whole-signal peak through a spool file) writes exactly `reconstruct` + `write_wav`."""
    import os

    from sqaudio.codec.waveform import write_wav

    codec = _codec(loaded, 2.0, vocoder)
    rec = codec.reconstruct(long_wav)
    enc = rec.encoded
    write_wav(tmp_path / "a.wav", rec.wav, 16000)
    old = os.umask(0o027)
    try:
        streamed = codec.reconstruct_to(long_wav, tmp_path / "out" / "b.wav")
    finally:
        os.umask(old)
    assert streamed.mel_hat is None and streamed.encoded.mel is None  # nothing kept unless asked (a plot)
    np.testing.assert_array_equal(sf.read(tmp_path / "out" / "b.wav")[0],
                                  sf.read(tmp_path / "a.wav")[0])
    np.testing.assert_array_equal(enc.codes, streamed.encoded.codes)
    assert streamed.encoded.speaker == enc.speaker == "spk0" and not streamed.encoded.speaker_fallback
    assert (streamed.codes_used, streamed.latent_frames, streamed.bitrate_bps) == (
        rec.codes_used, rec.latent_frames, rec.bitrate_bps)
    assert streamed.mel_mse_db2 == pytest.approx(rec.mel_mse_db2, rel=1e-5)  # summed by window, not over the whole
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.wav"]  # no temporary or spool left
    assert (tmp_path / "out" / "b.wav").stat().st_mode & 0o777 == 0o640  # the umask, as every output
    steps = []
    kept = codec.reconstruct_to(long_wav, tmp_path / "out" / "c.wav", keep_mels=True, step=lambda: steps.append(1))
    torch.testing.assert_close(kept.mel_hat, rec.mel_hat, rtol=0, atol=0)
    np.testing.assert_array_equal(kept.encoded.mel, enc.mel)
    assert len(steps) == codec.windows(enc.samples) > 3  # the progress bar's count, though readers stop early
    steps.clear()
    codec.decode_to(enc.codes, enc.speaker, enc.samples, tmp_path / "out" / "d.wav", step=lambda: steps.append(1))
    assert len(steps) == codec.windows(enc.samples, encode=False)
    np.testing.assert_array_equal(sf.read(tmp_path / "out" / "d.wav")[0], sf.read(tmp_path / "a.wav")[0])


def test_streamed_reconstruction_of_bad_input_writes_nothing(loaded, tmp_path):
    from sqaudio.errors import UserError

    codec = _codec(loaded, 2.0, "griffin-lim")
    bad = tmp_path / "spk0_nan.wav"
    sf.write(bad, np.where(np.arange(100000) == 90000, np.nan, np.tile(harmonic(1.0), 7)[:100000]), 16000,
             subtype="FLOAT")
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="NaN"):
        codec.reconstruct_to(bad, tmp_path / "out" / "x.wav")
    with pytest.raises(UserError, match="codebook"):
        codec.decode_to(np.array([10**6]), "spk0", 16000, tmp_path / "out" / "y.wav")
    assert list((tmp_path / "out").iterdir()) == []
