"""Property-based: `reconstruct` and the audio loader end in a result or a clear error, never a traceback."""
import io

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sqaudio.config import FeatureConfig
from sqaudio.data.audio import load_audio, min_samples
from sqaudio.errors import UserError

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _encode_wav(samples: np.ndarray, rate: int, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


signals = st.builds(
    lambda n, rate, kind, subtype, seed: (n, rate, kind, subtype, seed),
    st.integers(0, 40000), st.sampled_from([1, 100, 8000, 16000, 44100, 96000, 192000]),
    st.sampled_from(["noise", "silence", "nan", "inf", "huge", "dc"]),
    st.sampled_from(["PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE", "PCM_U8"]), st.integers(0, 1000))


def _make(n, rate, kind, subtype, seed):
    rng = np.random.default_rng(seed)
    x = {"noise": rng.standard_normal(n) * 0.3, "silence": np.zeros(n), "dc": np.full(n, 0.2),
         "nan": np.where(rng.random(n) < 0.01, np.nan, 0.1), "inf": np.where(rng.random(n) < 0.01, np.inf, 0.1),
         "huge": rng.standard_normal(n) * 1e6}[kind]
    if subtype not in ("FLOAT", "DOUBLE"):
        x = np.nan_to_num(np.clip(x, -1, 1))
    return x.astype(np.float64)


@SETTINGS
@given(signals)
def test_loader_gives_valid_audio_or_user_error(tmp_path_factory, case):
    n, rate, kind, subtype, seed = case
    path = tmp_path_factory.mktemp("fuzz") / "x.wav"
    try:
        path.write_bytes(_encode_wav(_make(*case), rate, subtype))
    except (sf.LibsndfileError, ValueError, RuntimeError):
        return  # libsndfile cannot even write this combination
    cfg = FeatureConfig()
    try:
        wav = load_audio(path, cfg)
    except UserError as err:
        assert str(err) and "\n" not in str(err)
        return
    assert wav.dtype == np.float32 and wav.ndim == 1 and np.all(np.isfinite(wav))
    assert len(wav) >= min_samples(cfg) and np.abs(wav).max() > 0


@SETTINGS
@given(st.binary(min_size=0, max_size=2000), st.sampled_from([b"", b"RIFF", b"fLaC", b"OggS"]))
def test_random_bytes_are_refused_cleanly(tmp_path_factory, data, magic):
    path = tmp_path_factory.mktemp("bytes") / "x.wav"
    path.write_bytes(magic + data)
    with pytest.raises(UserError):
        load_audio(path, FeatureConfig())


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(signals, st.integers(0, 3))
def test_reconstruct_result_or_clear_error(cli, model_dir, tmp_path_factory, case, truncate):
    folder = tmp_path_factory.mktemp("rec")
    path, out = folder / "in.wav", folder / "out.wav"
    try:
        data = _encode_wav(_make(*case), case[1], case[3])
    except (sf.LibsndfileError, ValueError, RuntimeError):
        return
    path.write_bytes(data[: len(data) * (4 - truncate) // 4] if truncate else data)  # truncated files too
    result = cli("reconstruct", path, "-o", out, "--model", model_dir, "--device", "cpu")
    assert "Traceback" not in result.output
    if result.exit_code == 0:
        wav, rate = sf.read(out)
        assert rate == 16000 and np.all(np.isfinite(wav))
    else:
        assert result.exit_code == 2 and "error:" in result.output and not out.exists()



@pytest.mark.parametrize("rate", [8000, 16000])
def test_the_shortest_accepted_input_reconstructs(cli, model_dir, tmp_path, rate):
    """An input just long enough to be accepted decodes to fewer frames than Griffin-Lim's inverse STFT can trim
    to; it still gives a wav of the input's duration."""
    n = -(-min_samples(FeatureConfig()) * rate // 16000)  # the fewest samples at `rate` that are accepted
    noise = np.random.default_rng(0).standard_normal(n) * 0.3
    sf.write(tmp_path / "in.wav", noise, rate)
    result = cli("reconstruct", tmp_path / "in.wav", "-o", tmp_path / "out.wav", "--model", model_dir, "--device", "cpu")
    assert result.exit_code == 0, result.output
    wav, out_rate = sf.read(tmp_path / "out.wav")
    assert out_rate == 16000 and abs(len(wav) - n * 16000 // rate) <= 1 and np.all(np.isfinite(wav))
