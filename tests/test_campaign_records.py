"""A campaign's record (its params.yaml) is trusted only whole: an empty, damaged or incomplete record is refused in
one line, never completed with defaults, and nothing is generated inside a campaign folder."""

from __future__ import annotations

import pytest

from pixelpick.campaign import open_campaign, open_recorded
from pixelpick.errors import CampaignError
from tests.conftest import TINY_PARAMS


def _files(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


@pytest.fixture
def started(tmp_path):
    (tmp_path / "params.yaml").write_text(TINY_PARAMS)
    campaign = open_campaign(tmp_path / "params.yaml")
    return tmp_path, campaign


@pytest.mark.parametrize(("damage", "said"), [
    (lambda text: "", "is empty (0 bytes)"),
    (lambda text: "\n   \n", "is empty"),
    # Cut at a line: cut mid-line, the record may read as damaged YAML instead, which is the case below.
    (lambda text: "".join(text.splitlines(keepends=True)[: text.count("\n") // 2]), "is incomplete: it lacks"),
    (lambda text: text.replace("campaign:\n", "campaign: [\n"), "is damaged: not valid YAML"),
    (lambda text: "- just\n- a list\n", "is damaged: it holds a list"),
    (lambda text: "\n".join(line for line in text.splitlines() if "epochs:" not in line), "lacks train.epochs"),
])
def test_an_empty_or_damaged_record_is_refused_in_one_line_and_nothing_is_written(started, damage, said):
    folder, campaign = started
    record = campaign.layout.params
    record.write_text(damage(record.read_text()))
    damaged, before = record.read_bytes(), _files(campaign.layout.dir)
    for opening in (lambda: open_campaign(folder / "params.yaml"), lambda: open_recorded(campaign.layout.dir)):
        with pytest.raises(CampaignError) as refused:
            opening()
        message = str(refused.value)
        assert "\n" not in message and str(record) in message and said in message, message
        assert "never replaced by defaults" in message
    assert record.read_bytes() == damaged
    assert _files(campaign.layout.dir) == before  # no dataset, no nested campaign generated inside it


def test_a_record_pointing_its_generated_dataset_inside_the_campaign_folder_is_refused(started):
    _, campaign = started
    record = campaign.layout.params
    record.write_text(record.read_text().replace("root: ../../synthetic", "root: synthetic"))
    before = _files(campaign.layout.dir)
    with pytest.raises(CampaignError, match="never generated inside a campaign folder"):
        open_recorded(campaign.layout.dir)
    assert _files(campaign.layout.dir) == before


@pytest.mark.parametrize(("overrides", "key"), [
    ({"train.crop_size": [0, 0]}, "train.crop_size"),
    ({"train.crop_size": [48, 500]}, "train.crop_size"),
    ({"acquire.pixels_per_image": 4000}, "acquire.pixels_per_image"),
    ({"train.epochs": True}, "train.epochs"),
])
def test_settings_are_refused_before_the_dataset_is_generated_or_the_campaign_folder_written(tmp_path, overrides,
                                                                                             key):
    from pixelpick.errors import PixelPickError

    (tmp_path / "params.yaml").write_text(TINY_PARAMS)
    with pytest.raises(PixelPickError) as refused:
        open_campaign(tmp_path / "params.yaml", overrides)
    assert "\n" not in str(refused.value) and key in str(refused.value), refused.value
    assert _files(tmp_path) == ["params.yaml"]  # no synthetic dataset, no campaign folder


def test_a_crop_larger_than_the_generated_images_is_refused_once_they_exist(tmp_path):
    (tmp_path / "params.yaml").write_text(TINY_PARAMS)
    open_campaign(tmp_path / "params.yaml")  # generates the 48x64 scenes
    with pytest.raises(CampaignError, match=r"train\.crop_size: \[49, 64\] does not fit .* 48 pixels high"):
        open_campaign(tmp_path / "params.yaml", {"train.crop_size": [49, 64], "campaign.name": "cropped"})
    assert not (tmp_path / "data" / "runs" / "cropped").exists()
