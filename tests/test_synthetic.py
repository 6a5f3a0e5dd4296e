"""The bundled synthetic street scenes: layout, class shares, difficulty, determinism, idempotence, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelpick.datasets import CAMVID_CLASSES, CamVidDataset, generate_synthetic
from pixelpick.datasets import synthetic as synthetic_module
from pixelpick.datasets.synthetic import MANIFEST_NAME, render_scene
from pixelpick.errors import DatasetError

CAMVID_NAMES = [info.name for info in CAMVID_CLASSES] + ["void"]
RARE = ["pole", "sign", "fence", "pedestrian", "bicyclist"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("gen") / "synthetic", num_train=60, num_val=20, seed=3)


def label_maps(root: Path, split: str) -> np.ndarray:
    return np.stack([np.asarray(Image.open(path)) for path in sorted((root / f"{split}annot").glob("*.png"))])


def test_writes_camvid_layout_read_by_the_camvid_loader(generated: Path) -> None:
    assert sorted(path.name for path in generated.iterdir()) == [
        MANIFEST_NAME, "train", "trainannot", "val", "valannot"]
    train, val = CamVidDataset(generated, "train"), CamVidDataset(generated, "val")
    assert len(train) == 60 and len(val) == 20 and train.has_masks
    assert sorted(path.name for path in (generated / "train").iterdir()) == sorted(
        path.name for path in (generated / "trainannot").iterdir())
    image_id = train.image_ids[0]
    assert train.image_size(image_id) == (96, 128)
    assert train.load_image(image_id).shape == (96, 128, 3)
    assert set(np.unique(label_maps(generated, "val"))) <= set(range(12))
    manifest = json.loads((generated / MANIFEST_NAME).read_text())
    assert {key: manifest[key] for key in ("num_train", "num_val", "height", "width", "seed")} == {
        "num_train": 60, "num_val": 20, "height": 96, "width": 128, "seed": 3}


def test_class_shares_resemble_camvid(generated: Path) -> None:
    labels = label_maps(generated, "train")
    shares = dict(zip(CAMVID_NAMES, np.bincount(labels.ravel(), minlength=12) / labels.size, strict=True))
    for name in RARE:
        assert 0.001 < shares[name] < 0.05, (name, shares[name])
    # CamVid: sky 16.8%, building 23.3%, road 31.7%, tree 9.7%, car 5.9%, pavement 4.5%, void 3.9%.
    assert 0.08 < shares["sky"] < 0.30 and 0.12 < shares["building"] < 0.35 and 0.2 < shares["road"] < 0.45
    assert 0.04 < shares["tree"] < 0.16 and 0.02 < shares["car"] < 0.1 and 0.02 < shares["pavement"] < 0.1
    assert 0.005 < shares["void"] < 0.08
    # Most scenes show most classes, but each rare class is absent from some scenes.
    present = np.stack([np.bincount(label.ravel(), minlength=12) > 0 for label in labels])
    assert present.mean(0)[[0, 1, 3, 5]].min() > 0.9  # sky, building, road, tree
    assert present.mean(0)[[7, 9, 10]].max() < 0.95  # fence, pedestrian, bicyclist


def test_colour_alone_does_not_segment_the_scenes(generated: Path) -> None:
    """The best colour-to-class lookup learned on every training pixel is a poor segmenter on val."""

    def colour_codes(split: str) -> np.ndarray:
        images = np.stack([np.asarray(Image.open(p)) for p in sorted((generated / split).glob("*.png"))])
        quantised = images.reshape(-1, 3).astype(int) // 16
        return quantised[:, 0] * 256 + quantised[:, 1] * 16 + quantised[:, 2]

    train_codes, train_labels = colour_codes("train"), label_maps(generated, "train").ravel()
    votes = np.zeros((16**3, 12))
    np.add.at(votes, (train_codes, train_labels), 1)
    predicted = votes[:, :11].argmax(1)[colour_codes("val")]
    truth = label_maps(generated, "val").ravel()
    valid = truth < 11
    ious = [((predicted == c) & (truth == c) & valid).sum() / (((predicted == c) | (truth == c)) & valid).sum()
            for c in range(11)]
    assert np.mean(ious) < 0.4
    assert max(ious[c] for c in (2, 7, 9, 10)) < 0.1  # thin and small classes need shape and context


def test_generation_is_deterministic(tmp_path: Path) -> None:
    first = generate_synthetic(tmp_path / "a", num_train=3, num_val=2, height=40, width=56, seed=7)
    second = generate_synthetic(tmp_path / "b", num_train=3, num_val=2, height=40, width=56, seed=7)
    files = sorted(path.relative_to(first) for path in first.rglob("*") if path.is_file())
    assert len(files) == 11
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    other_seed = generate_synthetic(tmp_path / "c", num_train=3, num_val=2, height=40, width=56, seed=8)
    assert (first / "train/scene_0000.png").read_bytes() != (other_seed / "train/scene_0000.png").read_bytes()


def test_val_scenes_do_not_depend_on_the_train_count(tmp_path: Path) -> None:
    few = generate_synthetic(tmp_path / "few", num_train=1, num_val=2, height=40, width=56)
    many = generate_synthetic(tmp_path / "many", num_train=4, num_val=2, height=40, width=56)
    for name in ("val/scene_0001.png", "valannot/scene_0001.png", "train/scene_0000.png"):
        assert (few / name).read_bytes() == (many / name).read_bytes()


def test_regeneration_with_same_settings_is_a_no_op(tmp_path: Path) -> None:
    root = generate_synthetic(tmp_path / "s", num_train=2, num_val=1, height=40, width=56)
    stamps = {path: path.stat().st_mtime_ns for path in root.rglob("*")}
    assert generate_synthetic(tmp_path / "s", num_train=2, num_val=1, height=40, width=56) == root
    assert {path: path.stat().st_mtime_ns for path in root.rglob("*")} == stamps


def test_regeneration_with_other_settings_is_refused(tmp_path: Path) -> None:
    root = generate_synthetic(tmp_path / "s", num_train=2, num_val=1, height=40, width=56)
    before = sorted(root.rglob("*"))
    with pytest.raises(DatasetError, match=r"other settings.*'num_train': \(2, 5\)"):
        generate_synthetic(root, num_train=5, num_val=1, height=40, width=56)
    assert sorted(root.rglob("*")) == before


def test_foreign_folder_is_not_overwritten(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    root.mkdir()
    (root / "precious.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not a generated synthetic dataset"):
        generate_synthetic(root, num_train=1, num_val=1, height=40, width=56)
    assert (root / "precious.txt").read_text() == "keep me"


def test_empty_folder_is_filled(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    root = generate_synthetic(tmp_path / "empty", num_train=1, num_val=1, height=40, width=56)
    assert (root / MANIFEST_NAME).is_file()


def test_interrupted_generation_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing_render(rng, height, width):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return render_scene(rng, height, width)

    monkeypatch.setattr(synthetic_module, "render_scene", failing_render)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic(tmp_path / "s", num_train=4, num_val=1, height=40, width=56)
    assert list(tmp_path.iterdir()) == []
