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


def test_a_missing_settings_file_is_named_with_the_folder_searched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SettingsError, match=f"settings file not found: {tmp_path / 'params.yaml'}$"):
        load_settings("params.yaml")


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


@pytest.mark.parametrize(("override", "key"), [
    ("train.epochs=true", "train.epochs"),
    ("train.batch_size=8.0", "train.batch_size"),
    ("train.epochs='3'", "train.epochs"),
    ("train.photometric=1", "train.photometric"),
    ("train.lr_head=true", "train.lr_head"),
    ("data.cityscapes_downsample=true", "data.cityscapes_downsample"),
    ("campaign.rounds=false", "campaign.rounds"),
    ("train.crop_size=[0,0]", "train.crop_size.0"),
    ("train.crop_size=[32,-1]", "train.crop_size.1"),
    ("data.image_size=[48,0]", "data.image_size.1"),
    ("train.milestones=[true]", "train.milestones.0"),
])
def test_a_value_of_the_wrong_type_or_size_is_refused_in_one_line_naming_the_key(tmp_path, override, key):
    with pytest.raises(SettingsError) as refused:
        load_settings(write(tmp_path, ""), dict([parse_override(override)]))
    message = str(refused.value)
    assert "\n" not in message and f"{key}:" in message, message


def test_numbers_of_the_right_kind_are_still_accepted(tmp_path):
    settings = load_settings(write(tmp_path, "train:\n  lr_head: 1e-3\n  epochs: 3\n  crop_size: [32, 48]\n"),
                             {"train.weight_decay": 0, "train.photometric": True})
    assert (settings.train.lr_head, settings.train.epochs, settings.train.crop_size) == (1e-3, 3, (32, 48))
    assert settings.train.weight_decay == 0.0 and settings.train.photometric is True
