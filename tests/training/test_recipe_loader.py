"""The one recipe loader: SQ-VAE and vocoder recipes by name or path, `base:` overlays, `--set` overrides and
errors that name the key or the choices."""
from __future__ import annotations

import pytest

from sqaudio.codec.vocoders import VocoderConfig
from sqaudio.config import VOCODER_DIR, Recipe, from_saved, list_recipes, load_config, to_dict
from sqaudio.errors import UserError


def test_vocoder_recipes_load_by_name_with_or_without_their_folder():
    tiny = load_config(VocoderConfig, "tiny", ["train.steps=7"])
    assert tiny == load_config(VocoderConfig, "vocoder/tiny.yaml", ["train.steps=7"]) and tiny.train.steps == 7
    assert "tiny" in list_recipes(VOCODER_DIR) and "vocoder/tiny" not in list_recipes()
    assert from_saved(VocoderConfig, to_dict(tiny), ["train.seed=3"]).train.seed == 3


def test_a_user_overlay_takes_a_shipped_base_of_its_own_kind(tmp_path):
    (tmp_path / "voc.yaml").write_text("base: tiny\ntrain:\n  batch_size: 2\n")
    (tmp_path / "sq.yaml").write_text("base: demo/tiny\ntrain:\n  steps: 3\n")
    assert load_config(VocoderConfig, tmp_path / "voc.yaml").train.batch_size == 2
    assert load_config(Recipe, tmp_path / "sq.yaml").train.steps == 3


def test_errors_name_the_key_or_the_choices():
    with pytest.raises(UserError, match="vocoder recipe 'nope' not found: shipped: .*tiny"):
        load_config(VocoderConfig, "nope")
    with pytest.raises(UserError, match="did you mean tiny"):
        load_config(VocoderConfig, "vocoder/tinyy")
    with pytest.raises(UserError, match="unknown config key 'train.colour'"):
        load_config(VocoderConfig, "tiny", ["train.colour=1"])
    with pytest.raises(UserError, match="tiny is a vocoder recipe"):
        load_config(Recipe, "vocoder/tiny")
