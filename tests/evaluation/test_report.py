"""`sqaudio report` and `evaluate --audio` on the shared tiny model, with the page opened in headless Chromium.

The browser test needs the Debian packages chromium and chromium-driver (`make test` installs them when run as
root). Without them it skips, except under CI=true, where it fails.
"""
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import harmonic

from sqaudio.evaluation.report import RunPage, choose_utterances, corpus_of, metrics_table

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def wav_store(tmp_path_factory, tiny_model) -> Path:
    """Prepared features of generated speech on disk (the tiny model's speakers spk0, spk1), with a test split."""
    from typer.testing import CliRunner

    from sqaudio.cli import app

    root = tmp_path_factory.mktemp("report_data")
    for s in range(2):
        for u in range(6):
            path = root / "corpus" / f"spk{s}" / f"spk{s}_{u}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, harmonic(0.9 + 0.1 * u, f0=110 + 40 * s + 7 * u, seed=10 * s + u), 16000)
    result = CliRunner().invoke(app, ["prepare", str(root / "corpus"), str(root / "features"), "--corpus", "folder",
                                      "--workers", "1", "--test-fraction", "0.5", "--seed", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    return root / "features"


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, tiny_model, wav_store) -> Path:
    """A report of two runs (the tiny model and a copy of it) over three utterances."""
    from typer.testing import CliRunner

    from sqaudio.cli import app

    root = tmp_path_factory.mktemp("report")
    other = shutil.copytree(tiny_model, root / "runs" / "copy")
    out = root / "page"
    result = CliRunner().invoke(app, ["report", str(tiny_model), str(other), "--data", str(wav_store), "--out",
                                      str(out), "--utterances", "3", "--quiet", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return out


def test_report_writes_page_audio_and_metrics(report_dir, wav_store):
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert len(metrics) == 2
    for row in metrics.values():
        assert 1.0 <= row["pesq_wb"] <= 4.65 and -1 <= row["stoi"] <= 1 and row["mel_distance_db2"] > 0
        assert row["audio_utterances"] == row["utterances"] > 0
    originals = sorted(report_dir.glob("audio/*/original.wav"))
    assert len(originals) == 3
    speakers = {p.parent.name.split("_")[0] for p in originals}
    assert speakers == {"spk0", "spk1"}  # spread over speakers
    for original in originals:
        for wav in original.parent.glob("*.wav"):
            assert sf.info(wav).frames == sf.info(original).frames
    page = (report_dir / "index.html").read_text()
    assert "http://" not in page and "https://" not in page  # no external assets
    assert page.count("<audio") == 3 * 3 and "class='strip'" in page and "full training configuration" in page


def test_utterances_are_spread_over_speakers_deterministically():
    entries = [{"id": f"{s}_{u}", "speaker": s} for s in ("b", "a", "c") for u in (3, 1, 2)]
    chosen = [e["id"] for e in choose_utterances(entries, 5)]
    assert chosen == ["a_1", "b_1", "c_1", "a_2", "b_2"]
    assert [e["id"] for e in choose_utterances(list(reversed(entries)), 5)] == chosen
    assert len(choose_utterances(entries, 50)) == 9


def test_paper_reference_row_only_on_vctk_or_zerospeech(tmp_path):
    assert corpus_of([{"source": "/c/wav48_silence_trimmed/p225/p225_001_mic1.flac"}]) == "vctk"
    assert corpus_of([{"source": "/z/english/test/S002_0379088085.wav"}]) == "zerospeech2019"
    assert corpus_of([{"source": "/f/spk0/a.wav"}]) is None
    pages = [RunPage("sq", tmp_path, {"quantizer": {"kind": "gaussian", "variant": 4}}, {"mel_mse_db2": 40.0}),
             RunPage("vq", tmp_path, {"quantizer": {"kind": "vq_ema", "variant": 4}}, {"mel_mse_db2": 45.0})]
    table = metrics_table(pages, "vctk")
    assert "24.68 ± 0.21" in table and "29.59 ± 0.25" in table and "class='best'>40.00" in table
    assert "paper" not in metrics_table(pages, None)


def test_evaluate_audio_json_keys(cli, tiny_model, wav_store, tmp_path):
    out = tmp_path / "eval.json"
    result = cli("evaluate", tiny_model, "--data", wav_store, "--audio", "--json", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    row = json.loads(out.read_text())
    for key in ("pesq_wb", "stoi", "estoi", "si_sdr_db", "mel_distance_db2"):
        assert np.isfinite(row[key]), key
    assert row["vocoder"] == "griffin-lim" and row["audio_utterances"] == row["utterances"]


def _count_reads(monkeypatch) -> dict[str, list]:
    """Records every torch.load (checkpoints) and every feature store opened while the test runs."""
    import torch

    from sqaudio.data.store import Store

    seen: dict[str, list] = {"checkpoints": [], "stores": []}
    real_load, real_init = torch.load, Store.__init__

    def load(path, *args, **kwargs):
        seen["checkpoints"].append(str(path))
        return real_load(path, *args, **kwargs)

    def init(self, *args, **kwargs):
        seen["stores"].append(self)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    monkeypatch.setattr(Store, "__init__", init)
    return seen


def test_each_checkpoint_and_store_is_read_once(cli, tiny_model, wav_store, tmp_path, monkeypatch):
    seen = _count_reads(monkeypatch)
    result = cli("evaluate", tiny_model, "--data", wav_store, "--audio", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert len(seen["checkpoints"]) == 1 and len(seen["stores"]) == 1, seen
    seen["checkpoints"].clear(), seen["stores"].clear()
    other = shutil.copytree(tiny_model, tmp_path / "runs" / "copy")
    result = cli("report", tiny_model, other, "--data", wav_store, "--out", tmp_path / "page", "--utterances", "1",
                 "--quiet", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert sorted(seen["checkpoints"]) == sorted({*seen["checkpoints"]}) and len(seen["checkpoints"]) == 2, seen
    assert len(seen["stores"]) == 1


def _one_red_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.output
    return lines[0]


def test_bad_inputs_get_one_line_and_exit_2(cli, tiny_model, tiny_store, wav_store, tmp_path):
    # features whose source audio is not on disk (tiny_store's sources are made-up paths)
    assert "source audio" in _one_red_line(cli("evaluate", tiny_model, "--data", tiny_store, "--audio"))
    assert "source audio" in _one_red_line(cli("report", tiny_model, "--data", tiny_store, "--out", tmp_path / "r"))
    _one_red_line(cli("report", tmp_path / "no_run", "--data", wav_store, "--out", tmp_path / "r"))
    _one_red_line(cli("report", tiny_model, "--out", tmp_path / "r"))  # speech without --data
    _one_red_line(cli("report", tiny_model, "--data", tmp_path, "--out", tmp_path / "r"))  # not a store
    _one_red_line(cli("report", tiny_model, tiny_model, "--data", wav_store, "--out", tmp_path / "r"))  # twice
    (tmp_path / "file").write_text("x")
    _one_red_line(cli("report", tiny_model, "--data", wav_store, "--out", tmp_path / "file"))
    _one_red_line(cli("evaluate", tiny_model, "--data", wav_store, "--audio", "--vocoder", tmp_path / "nothing"))
    assert not (tmp_path / "r").exists()  # nothing is written before the inputs are validated


def _browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if os.environ.get("CI"):
            pytest.fail("CI needs headless Chromium: run `make system` (apt-get install chromium chromium-driver)")
        pytest.skip("no /usr/bin/chromium or /usr/bin/chromedriver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,900",
                "--allow-file-access-from-files"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))


def _wait(driver, script: str, seconds: float = 20.0):
    deadline = time.monotonic() + seconds
    while not (value := driver.execute_script(script)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return value


def check_in_browser(page_dir: Path, runs: int, players: int, min_images: int) -> None:
    """Open page_dir/index.html in headless Chromium: every player loads with its file's duration, every image
    loads, the table has one column per run, the console has no error; save screenshot.png beside the page."""
    driver = _browser()
    try:
        driver.get((page_dir / "index.html").as_uri())
        assert _wait(driver, "return [...document.querySelectorAll('audio')].every(a => a.readyState >= 1 || a.error)")
        audio = driver.execute_script("return [...document.querySelectorAll('audio')].map(a => "
                                      "[a.getAttribute('src'), a.duration, a.error && a.error.code])")
        assert len(audio) == players
        for src, duration, error in audio:
            info = sf.info(page_dir / src)
            assert error is None and duration > 0, (src, error)
            assert duration == pytest.approx(info.frames / info.samplerate, abs=2e-3), src
        assert _wait(driver, "return [...document.images].every(i => i.complete)")
        images = driver.execute_script("return [...document.images].map(i => [i.getAttribute('src'), i.naturalWidth])")
        assert len(images) >= min_images and all(width > 0 for _, width in images), images
        header = driver.execute_script("return [...document.querySelectorAll('table.metrics thead th')].length")
        cells = driver.execute_script("return [...document.querySelectorAll('table.metrics tbody tr')]"
                                      ".map(r => r.querySelectorAll('td').length)")
        assert header == 1 + runs and cells and set(cells) == {runs}
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1400, min(height + 100, 8000))
        driver.save_screenshot(str(page_dir / "screenshot.png"))
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert not errors, errors
    finally:
        driver.quit()


def test_speech_page_in_headless_chromium(report_dir):
    check_in_browser(report_dir, runs=2, players=3 * 3, min_images=3 * 2 + 2 * 2)


def test_image_runs_get_grids(cli, tmp_path):
    from factories import mnist_arrays, write_idx_tree

    root = tmp_path / "data"
    write_idx_tree(root / "MNIST" / "raw", mnist_arrays())
    tiny = ["--set", "train.epochs=0", "--set", "train.steps=2", "--set", "data.batch_size=4",
            "--set", "model.vision.channels=8", "--quiet", "--device", "cpu"]
    for name, recipe in (("sq", "mnist/sqvae_gauss1"), ("vq", "mnist/vqvae_ema")):
        assert cli("train", recipe, "--data", root, "--out", tmp_path / name, *tiny).exit_code == 0
    result = cli("report", tmp_path / "sq", tmp_path / "vq", "--data", root, "--out", tmp_path / "page", "--quiet")
    assert result.exit_code == 0, result.output
    page = (tmp_path / "page" / "index.html").read_text()
    assert "<audio" not in page and page.count("img/grid_") == 2 and "image MSE" in page
    check_in_browser(tmp_path / "page", runs=2, players=0, min_images=2 * 2)
