"""reconstruct / encode / decode end to end through the CLI on generated audio."""
import json

import numpy as np
import pytest
import soundfile as sf
from conftest import harmonic


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model


def _wav(path, seconds=1.3, rate=16000, channels=1, seed=0):
    x = harmonic(seconds, rate=rate, seed=seed)
    sf.write(path, np.stack([x] * channels, axis=1) if channels > 1 else x, rate)
    return path


@pytest.mark.parametrize("rate,channels", [(16000, 1), (22050, 2), (48000, 1)])
def test_reconstruct_any_rate_gives_16k_of_input_duration(cli, model_dir, tmp_path, rate, channels):
    src = _wav(tmp_path / "spk0_in.wav", rate=rate, channels=channels)
    out = tmp_path / "out.wav"
    result = cli("reconstruct", src, "-o", out, "--model", model_dir, "--plot", tmp_path / "mel.png", "--device", "cpu")
    assert result.exit_code == 0, result.output
    wav, out_rate = sf.read(out)
    assert out_rate == 16000 and wav.ndim == 1
    assert len(wav) == round(1.3 * 16000)
    assert np.abs(wav).max() > 0.01
    assert (tmp_path / "mel.png").stat().st_size > 0
    assert "spk0" in result.output  # speaker taken from the file-name prefix


def test_decode_of_encode_equals_reconstruct(cli, model_dir, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        _wav(folder / f"utt{i}.wav", seconds=0.9 + 0.3 * i, seed=i)
    assert cli("reconstruct", folder, "-o", tmp_path / "rec", "--model", model_dir, "--speaker", "spk1").exit_code == 0
    assert cli("encode", folder, "-o", tmp_path / "codes", "--model", model_dir, "--speaker", "spk1").exit_code == 0
    header = json.loads((tmp_path / "codes" / "utt1.json").read_text())
    codes = np.load(tmp_path / "codes" / "utt1.npy")
    assert header["frame_rate"] == 50 and header["sample_rate"] == 16000 and header["speaker"] == "spk1"
    assert codes.dtype == np.int64 and codes.shape == (header["latent_frames"],)
    assert codes.shape[0] == (120 - 4) // 2 + 1  # 1.2 s -> 121 frames -> 120 even -> 59 latents
    assert cli("decode", tmp_path / "codes", "-o", tmp_path / "dec", "--model", model_dir).exit_code == 0
    for i in range(2):
        a, _ = sf.read(tmp_path / "rec" / f"utt{i}.wav")
        b, _ = sf.read(tmp_path / "dec" / f"utt{i}.wav")
        np.testing.assert_array_equal(a, b)


def test_zerospeech_format_one_vector_per_latent_frame(cli, model_dir, tmp_path):
    src = _wav(tmp_path / "S015_0001.wav")
    assert cli("encode", src, "-o", tmp_path / "zs", "--model", model_dir, "--format", "zerospeech").exit_code == 0
    lines = (tmp_path / "zs" / "S015_0001.txt").read_text().strip().splitlines()
    assert len(lines) == (130 - 4) // 2 + 1 and len(lines[0].split()) == 8  # tiny recipe: d_b = 8


def test_bad_inputs_are_one_line_errors(cli, model_dir, tmp_path):
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000, dtype=np.float32), 16000)
    short = tmp_path / "short.wav"
    sf.write(short, harmonic(0.02), 16000)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00not a wav")
    for path, words in ((silent, "silent"), (short, "short"), (corrupt, "unreadable"), (tmp_path / "none.wav", "not found")):
        result = cli("reconstruct", path, "-o", tmp_path / "o.wav", "--model", model_dir)
        assert result.exit_code == 2 and words in result.output, result.output
        assert "Traceback" not in result.output
    src = _wav(tmp_path / "x.wav")
    result = cli("reconstruct", src, "-o", tmp_path / "o.wav", "--model", model_dir, "--speaker", "nobody")
    assert result.exit_code == 2 and "spk0" in result.output and "spk1" in result.output
    assert not (tmp_path / "o.wav").exists()


def test_codes_from_another_model_are_refused(cli, model_dir, tmp_path):
    src = _wav(tmp_path / "x.wav")
    assert cli("encode", src, "-o", tmp_path / "codes", "--model", model_dir).exit_code == 0
    header = json.loads((tmp_path / "codes" / "x.json").read_text())
    header["model_id"] = "0123456789ab"
    (tmp_path / "codes" / "x.json").write_text(json.dumps(header))
    result = cli("decode", tmp_path / "codes" / "x.npy", "-o", tmp_path / "dec", "--model", model_dir)
    assert result.exit_code == 2 and "another model" in result.output


def test_reconstruct_reads_model_and_input_once(cli, model_dir, tmp_path, monkeypatch):
    """The checkpoint is read once; the input is opened for MelStream's two streaming passes and once more for the
    progress bar's header read, and at no other time."""
    import sys

    import torch

    src = _wav(tmp_path / "spk0_in.wav", seconds=2.0)
    loads, opened, headers = [], [], []
    real_load, real_info = torch.load, sf.info

    def load(path, *args, **kwargs):
        loads.append(str(path))
        return real_load(path, *args, **kwargs)

    class CountingSoundFile(sf.SoundFile):
        def __init__(self, file, *args, **kwargs):
            super().__init__(file, *args, **kwargs)
            self.reads = 0
            if str(file) == str(src):
                opened.append(self)

        def read(self, *args, **kwargs):
            self.reads += 1
            return super().read(*args, **kwargs)

    def info(file, *args, **kwargs):
        headers.append(sys._getframe(1).f_globals["__name__"])
        return real_info(file, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    monkeypatch.setattr(sf, "SoundFile", CountingSoundFile)
    monkeypatch.setattr(sf, "info", info)
    result = cli("reconstruct", src, "-o", tmp_path / "out.wav", "--model", model_dir, "--plot", tmp_path / "m.png")
    assert result.exit_code == 0, result.output
    assert len(loads) == 1  # griffin-lim reads no file
    assert len([f for f in opened if f.reads]) == 2  # the two streaming passes
    assert len(headers) <= 1  # the progress bar's header read
    assert len(opened) <= 3  # the two passes and that header read (soundfile's info opens the file too)
