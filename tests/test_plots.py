"""Every figure has titles in words, axis labels with units, readable sizes and the run's
name; one logged point still shows; mel-MSE on a log axis; colour bar on mels; values and "lower is better"
on compare bars, with step counts; image grids with row labels."""
import json

import numpy as np
import torch
from PIL import Image

from sqaudio import plots


def _texts(fig) -> str:
    return " ".join(t.get_text() for t in fig.findobj(lambda o: hasattr(o, "get_text")))


def _history(rows):
    return [{"step": s, "entropy": 4.0 / (1 + s), "var_q": 10.0 / (1 + s), "perplexity": 20.0 + s,
             "mel_mse_db2": 900.0 if s == 0 else 40.0 - s} for s in rows]


def test_annealing_figure_labels_units_log_axis_and_run_name():
    fig = plots.annealing_figure(_history([0, 10, 20, 30]), "vctk_iv")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["entropy of P̂ (code posterior)", "σ²_φ (mean)", "code perplexity",
                                               "mel-MSE"]
    assert [ax.get_ylabel() for ax in axes] == ["nats", "σ²", "codes", "dB²"]
    assert all(ax.get_xlabel() == "training step" for ax in axes)
    assert axes[-1].get_yscale() == "log" and axes[0].get_yscale() == "linear"
    assert "vctk_iv" in fig._suptitle.get_text() and "30 steps" in fig._suptitle.get_text()


def test_one_logged_point_is_visible():
    fig = plots.annealing_figure(_history([5]), "run")
    for ax in (a for a in fig.axes if a.get_visible()):
        (line,) = ax.get_lines()
        assert line.get_marker() == "o" and len(line.get_xdata()) == 1
    assert "1 logged point)" in fig._suptitle.get_text()


def test_annealing_png_of_a_trained_run_is_readable(tiny_model):
    image = Image.open(tiny_model / "annealing.png")
    assert image.size[0] >= 1200 and image.size[1] >= 500
    rows = [json.loads(line) for line in (tiny_model / "history.jsonl").read_text().splitlines()]
    assert rows and plots.annealing_figure(rows, "run") is not None


def test_compare_figure_values_direction_and_step_counts():
    rows = {"a/x": {"mel_mse_db2": 25.25, "perplexity": 310.0, "step": 10000},
            "b/x": {"mel_mse_db2": 31.5, "perplexity": 120.0, "step": 5000}}
    fig = plots.compare_figure(rows)
    mel, ppl = fig.axes
    assert mel.get_title() == "mel-MSE\n(lower is better)" and ppl.get_title() == "code perplexity\n(higher is better)"
    assert mel.get_ylabel() == "mel-MSE (dB²)"
    text = _texts(fig)
    assert "25.25" in text and "31.5" in text and "310" in text  # values on the bars
    assert [t.get_text() for t in mel.get_xticklabels()] == ["a/x\n10,000 steps", "b/x\n5,000 steps"]
    assert "different step counts" in fig._suptitle.get_text()
    same = plots.compare_figure({k: {**v, "step": 7} for k, v in rows.items()})
    assert "different" not in same._suptitle.get_text()


def test_mel_figure_has_a_colour_bar_in_db(tmp_path):
    mel = np.random.default_rng(0).random((80, 102)).astype(np.float32)
    fig = plots.mels_figure(mel, mel[:, 1:-1], "x.wav", top_db=80.0, frame_rate=100.0)
    bars = [ax for ax in fig.axes if ax.get_ylabel() == "level (dB re peak)"]
    assert len(bars) == 1
    image = fig.axes[0].get_images()[0]
    assert image.get_clim() == (-80.0, 0.0) and fig.axes[1].get_xlabel() == "time (s)"
    assert fig.axes[0].get_title() == "x.wav — input"
    path = plots.plot_mels(mel, mel[:, 1:-1], tmp_path / "m.png")
    assert Image.open(path).size[0] >= 1200


def test_image_grid_has_row_labels_and_readable_size(tmp_path):
    images = torch.rand(8, 1, 28, 28)
    fig = plots.grid_figure(images, images, "mnist")
    labels = {ax.get_ylabel() for ax in fig.axes} - {""}
    assert labels == {"original", "reconstruction"}
    path = plots.save_grid(images, images * 0.5, tmp_path / "g.png")
    width, height = Image.open(path).size
    assert width >= 1200 and height >= 350  # not a 242x62 thumbnail
    classes = torch.randint(0, 5, (4, 16, 16))
    assert plots.grid_figure(classes, torch.randn(4, 5, 16, 16)) is not None
