from pathlib import Path

import pytest

from pixelpick.errors import SettingsError
from pixelpick.settings import TRAIN_PRESETS, load_settings, parse_override

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_repository_params_load_and_resolve_paths_against_the_file():
    settings = load_settings(REPO / "params.yaml")
    assert settings.data.root == REPO / "data" / "synthetic"
    assert settings.campaign.run_dir == REPO / "data" / "runs" / settings.campaign.name


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(SettingsError, match=r"train\.epochz"):
        load_settings(write(tmp_path, "train:\n  epochz: 3\n"))


def test_invalid_value_is_named(tmp_path):
    with pytest.raises(SettingsError, match=r"acquire\.top_fraction"):
        load_settings(write(tmp_path, "acquire:\n  top_fraction: 1.5\n"))


def test_unknown_preset_lists_the_valid_ones(tmp_path):
    with pytest.raises(SettingsError, match="paper-camvid"):
        load_settings(write(tmp_path, "train:\n  preset: nope\n"))


def test_bald_without_mc_samples_fails_at_start_up(tmp_path):
    with pytest.raises(SettingsError, match="mc_samples"):
        load_settings(write(tmp_path, "acquire:\n  strategy: bald\n"))


def test_preset_fills_keys_and_explicit_keys_win(tmp_path):
    settings = load_settings(write(tmp_path, "train:\n  preset: paper-camvid\n  epochs: 3\n"))
    assert settings.train.epochs == 3
    assert settings.train.lr_backbone == TRAIN_PRESETS["paper-camvid"]["lr_backbone"]
    assert settings.train.milestones == [20, 40]


def test_overrides_are_dotted_keys_parsed_as_yaml(tmp_path):
    key, value = parse_override("train.epochs=2")
    settings = load_settings(write(tmp_path, ""), {key: value, "data.image_size": [48, 64]})
    assert settings.train.epochs == 2
    assert settings.data.image_size == (48, 64)


def test_not_yaml_is_a_clear_error(tmp_path):
    with pytest.raises(SettingsError, match="not valid YAML"):
        load_settings(write(tmp_path, "train: [\n"))
