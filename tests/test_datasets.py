"""Dataset loaders on tiny fixtures written in each dataset's real on-disk format."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pixelpick.datasets import (
    CAMVID_CLASSES,
    DATASETS,
    CamVidDataset,
    CityscapesDataset,
    FolderDataset,
    VOCDataset,
    get_dataset,
    load_classes_file,
)
from pixelpick.datasets.cityscapes import LABEL_ID_TO_TRAIN_ID
from pixelpick.datasets.voc import VOC_CLASSES
from pixelpick.errors import (
    ClassesFileError,
    CorruptImageError,
    DatasetError,
    InvalidMaskError,
    MissingMaskError,
    UnknownImageError,
)
from tests.fixtures import (
    CLASSES_YAML,
    cityscapes_stem,
    random_image,
    save_png,
    solid_image,
    voc_palette,
    with_border,
    write_camvid,
    write_cityscapes,
    write_voc,
)

# A 4x6 CamVid label map using every class and void (11).
CAMVID_MASK = np.array([[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11], [3, 3, 3, 4, 4, 11], [0, 0, 1, 1, 2, 2]])


@pytest.fixture
def camvid(tmp_path: Path) -> Path:
    return write_camvid(tmp_path / "camvid", {
        "train": {"b.png": CAMVID_MASK, "a.png": CAMVID_MASK[::-1].copy()},
        "val": {"c.png": CAMVID_MASK},
    })


# --- CamVid and the shared base-class behaviour ----------------------------------------------------------------


def test_camvid_lists_sorted_posix_ids_relative_to_root(camvid: Path) -> None:
    dataset = CamVidDataset(camvid, "train")
    assert dataset.image_ids == ["train/a.png", "train/b.png"]
    assert dataset.image_path("train/b.png") == camvid / "train" / "b.png"
    assert dataset.has_masks and len(dataset) == 2
    assert dataset.label_space.num_classes == 11 and dataset.label_space.ignore_index == 11


def test_camvid_loads_exact_image_and_mask(camvid: Path) -> None:
    dataset = CamVidDataset(camvid, "train")
    image = dataset.load_image("train/b.png")
    assert image.dtype == np.uint8 and image.shape == (4, 6, 3)
    np.testing.assert_array_equal(image, random_image(1, (4, 6)))  # b.png is the second written
    mask = dataset.load_mask("train/b.png")
    assert mask.dtype == np.int64
    np.testing.assert_array_equal(mask, CAMVID_MASK)
    assert dataset.image_size("train/b.png") == (4, 6)


def test_camvid_class_keys_are_the_protocol_mnemonics() -> None:
    keys = "".join(info.key for info in CAMVID_CLASSES)
    assert keys == "kbprvtsfcdi"
    assert [info.name for info in CAMVID_CLASSES][:4] == ["sky", "building", "pole", "road"]


def test_unknown_image_id_is_named(camvid: Path) -> None:
    dataset = CamVidDataset(camvid, "train")
    for call in (dataset.image_path, dataset.load_image, dataset.load_mask, dataset.image_size):
        with pytest.raises(UnknownImageError, match="train/nope.png"):
            call("train/nope.png")
    with pytest.raises(UnknownImageError):
        dataset.image_path("val/c.png")  # exists on disk, but in another split


def test_unknown_split_lists_the_splits_present(camvid: Path) -> None:
    # CamVid's train also offers its fixed tuning split and the rest of train (the benchmark's tuning protocol).
    with pytest.raises(DatasetError, match=r"'test'.*\['train', 'train-tune', 'tune', 'val'\]"):
        CamVidDataset(camvid, "test")


def test_missing_root_is_reported(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        CamVidDataset(tmp_path / "absent", "train")


@pytest.mark.parametrize("content", [b"", b"not a png at all", "truncated"])
def test_corrupt_image_names_the_file(camvid: Path, content) -> None:
    path = camvid / "train" / "a.png"
    path.write_bytes(path.read_bytes()[:40] if content == "truncated" else content)
    dataset = CamVidDataset(camvid, "train")
    with pytest.raises(CorruptImageError, match="a.png"):
        dataset.load_image("train/a.png")


def test_sixteen_bit_image_is_rejected(camvid: Path) -> None:
    Image.fromarray(np.full((4, 6), 40000, np.uint16)).save(camvid / "train" / "a.png")
    with pytest.raises(CorruptImageError, match="mode"):
        CamVidDataset(camvid, "train").load_image("train/a.png")


def test_out_of_range_mask_values_are_listed(camvid: Path) -> None:
    bad = CAMVID_MASK.copy()
    bad[0, 0], bad[1, 1] = 12, 200  # 11 is void and allowed; 12 and 200 are not
    save_png(camvid / "trainannot" / "b.png", bad)
    with pytest.raises(InvalidMaskError, match=r"b\.png.*\[12, 200\]"):
        CamVidDataset(camvid, "train").load_mask("train/b.png")


def test_mask_of_wrong_size_or_mode_is_rejected(camvid: Path) -> None:
    save_png(camvid / "trainannot" / "a.png", CAMVID_MASK[:, :5])
    save_png(camvid / "trainannot" / "b.png", np.zeros((4, 6, 3)))  # a colour-coded mask
    dataset = CamVidDataset(camvid, "train")
    with pytest.raises(InvalidMaskError, match="5x4"):
        dataset.load_mask("train/a.png")
    with pytest.raises(InvalidMaskError, match="mode RGB"):
        dataset.load_mask("train/b.png")


def test_split_without_annotations_has_no_masks(tmp_path: Path) -> None:
    root = write_camvid(tmp_path / "camvid", {"test": {"x.png": CAMVID_MASK}}, annotated=False)
    dataset = CamVidDataset(root, "test")
    assert not dataset.has_masks
    assert dataset.load_image("test/x.png").shape == (4, 6, 3)
    with pytest.raises(MissingMaskError, match="test"):
        dataset.load_mask("test/x.png")


def test_one_missing_mask_is_named(camvid: Path) -> None:
    (camvid / "trainannot" / "a.png").unlink()
    dataset = CamVidDataset(camvid, "train")
    assert dataset.has_masks
    with pytest.raises(MissingMaskError, match="trainannot/a.png"):
        dataset.load_mask("train/a.png")


def test_working_resolution_resizes_images_bilinear_and_masks_nearest(camvid: Path) -> None:
    save_png(camvid / "train" / "a.png", solid_image((10, 20, 30), (4, 6)))
    dataset = CamVidDataset(camvid, "train", image_size=(2, 3))
    assert dataset.image_size("train/a.png") == (2, 3)
    image = dataset.load_image("train/a.png")
    assert image.shape == (2, 3, 3)
    np.testing.assert_array_equal(image, solid_image((10, 20, 30), (2, 3)))
    # Halving with nearest neighbour picks the source pixel under each output centre: rows 1, 3 and cols 1, 3, 5.
    np.testing.assert_array_equal(dataset.load_mask("train/b.png"), CAMVID_MASK[1::2, 1::2])


def test_upscaled_working_resolution_repeats_mask_pixels(camvid: Path) -> None:
    dataset = CamVidDataset(camvid, "train", image_size=(8, 12))
    np.testing.assert_array_equal(dataset.load_mask("train/b.png"), CAMVID_MASK.repeat(2, 0).repeat(2, 1))
    assert dataset.load_image("train/b.png").shape == (8, 12, 3)


@pytest.mark.camvid
def test_real_camvid(camvid_root: Path) -> None:
    train, val = CamVidDataset(camvid_root, "train"), CamVidDataset(camvid_root, "val")
    assert len(train) == 367 and len(val) == 101
    first = train.image_ids[0]
    assert first == "train/0001TP_006690.png"
    assert train.image_size(first) == (360, 480)
    assert train.load_image(first).shape == (360, 480, 3)
    mask = val.load_mask(val.image_ids[0])
    assert mask.shape == (360, 480) and mask.min() >= 0 and mask.max() <= 11


# --- Cityscapes ------------------------------------------------------------------------------------------------

# labelIds including unlabeled (0), ego vehicle (1), license plate stored as 255, and out-of-eval ids (4, 34).
LABEL_IDS = np.array([[7, 8, 11, 12, 13, 17, 19, 20], [21, 22, 23, 24, 25, 26, 27, 28],
                      [31, 32, 33, 0, 1, 255, 4, 34], [7, 7, 26, 26, 24, 24, 0, 0]])
TRAIN_IDS = np.array([[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15],
                      [16, 17, 18, 19, 19, 19, 19, 19], [0, 0, 13, 13, 11, 11, 19, 19]])


@pytest.fixture
def cityscapes(tmp_path: Path) -> Path:
    root = write_cityscapes(tmp_path / "cityscapes", "train", {"aachen": [LABEL_IDS], "bonn": [LABEL_IDS[::-1]]})
    return write_cityscapes(root, "val", {"lindau": [LABEL_IDS]})


def test_cityscapes_label_ids_map_to_train_ids(cityscapes: Path) -> None:
    dataset = CityscapesDataset(cityscapes, "train")
    stem = cityscapes_stem("aachen", 0)
    assert dataset.image_ids == [
        f"leftImg8bit/train/aachen/{stem}_leftImg8bit.png",
        f"leftImg8bit/train/bonn/{cityscapes_stem('bonn', 0)}_leftImg8bit.png",
    ]
    np.testing.assert_array_equal(dataset.load_mask(dataset.image_ids[0]), TRAIN_IDS)
    np.testing.assert_array_equal(dataset.load_mask(dataset.image_ids[1]), TRAIN_IDS[::-1])
    assert dataset.label_space.num_classes == 19 and dataset.label_space.ignore_index == 19


def test_cityscapes_lookup_table_ignores_every_unlisted_id() -> None:
    listed = {7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33}
    assert sorted(LABEL_ID_TO_TRAIN_ID[sorted(listed)]) == list(range(19))
    assert set(LABEL_ID_TO_TRAIN_ID[[i for i in range(256) if i not in listed]]) == {19}


def test_cityscapes_downsampled_cache_is_built_once_and_reused(cityscapes: Path) -> None:
    dataset = CityscapesDataset(cityscapes, "train", downsample=2)
    cache = cityscapes.with_name("cityscapes_d2")
    assert dataset.root == cache
    image_id = f"leftImg8bit/train/aachen/{cityscapes_stem('aachen', 0)}_leftImg8bit.png"
    assert dataset.image_ids[0] == image_id  # ids relative to the root actually read
    assert dataset.image_size(image_id) == (2, 4)
    np.testing.assert_array_equal(dataset.load_image(image_id), solid_image((5, 100, 200), (2, 4)))
    np.testing.assert_array_equal(dataset.load_mask(image_id), TRAIN_IDS[1::2, 1::2])  # trainIds, nearest
    cached_label = cache / f"gtFine/train/aachen/{cityscapes_stem('aachen', 0)}_gtFine_labelTrainIds.png"
    assert cached_label.is_file()

    stamps = {path: path.stat().st_mtime_ns for path in cache.rglob("*")}
    (cityscapes / "leftImg8bit" / "train" / "aachen" / f"{cityscapes_stem('aachen', 0)}_leftImg8bit.png").unlink()
    again = CityscapesDataset(cityscapes, "train", downsample=2)  # would fail if it re-read the originals
    assert len(again) == 2
    assert {path: path.stat().st_mtime_ns for path in cache.rglob("*")} == stamps


def test_cityscapes_validation_uses_the_training_resolution(cityscapes: Path) -> None:
    train = CityscapesDataset(cityscapes, "train", downsample=2)
    val = CityscapesDataset(cityscapes, "val", downsample=2)  # the cache gains the val split
    assert val.root == train.root
    assert {val.image_size(i) for i in val.image_ids} == {train.image_size(i) for i in train.image_ids} == {(2, 4)}


def test_cityscapes_rejects_other_downsample_factors(cityscapes: Path) -> None:
    with pytest.raises(DatasetError, match="downsample"):
        CityscapesDataset(cityscapes, "train", downsample=3)


# --- PASCAL VOC ------------------------------------------------------------------------------------------------

VOC_MASK = with_border(np.array([[0, 0, 0, 0, 0], [0, 15, 15, 12, 0], [0, 15, 20, 12, 0], [0, 0, 0, 0, 0]]))


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    return write_voc(tmp_path / "VOC2012", {"train": {"2007_000032": VOC_MASK}, "val": {"2007_000033": VOC_MASK}})


def test_voc_reads_palette_masks_with_boundary_band(voc: Path) -> None:
    dataset = VOCDataset(voc, "train")
    assert dataset.image_ids == ["JPEGImages/2007_000032.jpg"]
    mask = dataset.load_mask("JPEGImages/2007_000032.jpg")
    np.testing.assert_array_equal(mask, VOC_MASK)
    assert mask[0, 0] == dataset.label_space.ignore_index == 255
    image = dataset.load_image("JPEGImages/2007_000032.jpg")
    assert image.shape == (4, 5, 3)
    assert np.abs(image.astype(int) - [120, 60, 30]).max() <= 8  # JPEG is lossy


def test_voc_palette_and_keys() -> None:
    assert len(VOC_CLASSES) == 21
    assert VOC_CLASSES[1].colour == (128, 0, 0) and VOC_CLASSES[15].colour == (192, 128, 128)
    assert VOC_CLASSES[20].colour == (0, 64, 128)  # tvmonitor
    assert VOC_CLASSES[0].key == "q" and VOC_CLASSES[20].key == "x"


def test_voc_class_out_of_range_is_rejected(voc: Path) -> None:
    bad = VOC_MASK.copy()
    bad[1, 1] = 21
    save_png(voc / "SegmentationClass" / "2007_000032.png", bad, palette=voc_palette())
    with pytest.raises(InvalidMaskError, match=r"\[21\]"):
        VOCDataset(voc, "train").load_mask("JPEGImages/2007_000032.jpg")


def test_voc_splits_come_from_image_sets(voc: Path) -> None:
    with pytest.raises(DatasetError, match=r"\['train', 'val'\]"):
        VOCDataset(voc, "trainaug")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_999999\n")
    with pytest.raises(DatasetError, match="2007_999999"):
        VOCDataset(voc, "val")


# --- Folder of the user's own images ---------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "mine"
    root.mkdir()
    (root / "classes.yaml").write_text(CLASSES_YAML)
    save_png(root / "images" / "b.png", random_image(0, (3, 4)))
    save_png(root / "images" / "day2" / "a.png", random_image(1, (3, 4)))
    Image.fromarray(solid_image((200, 10, 10), (3, 4))).save(root / "images" / "day2" / "c.jpg")
    (root / "images" / "notes.txt").write_text("not an image")
    return root


def test_folder_pool_needs_no_masks(folder: Path) -> None:
    dataset = FolderDataset(folder, "train")
    assert dataset.image_ids == ["images/b.png", "images/day2/a.png", "images/day2/c.jpg"]
    assert not dataset.has_masks
    np.testing.assert_array_equal(dataset.load_image("images/day2/a.png"), random_image(1, (3, 4)))
    with pytest.raises(MissingMaskError):
        dataset.load_mask("images/b.png")
    assert dataset.label_space.names == ("background", "cell", "nucleus")
    assert dataset.label_space.ignore_index == 255


def test_folder_masks_follow_the_image_path(folder: Path) -> None:
    mask = np.array([[0, 1, 2, 255], [1, 1, 2, 2], [0, 0, 0, 255]])
    save_png(folder / "masks" / "day2" / "c.png", mask)
    dataset = FolderDataset(folder, "train")
    assert dataset.has_masks
    np.testing.assert_array_equal(dataset.load_mask("images/day2/c.jpg"), mask)
    with pytest.raises(MissingMaskError, match="masks/b.png"):
        dataset.load_mask("images/b.png")
    save_png(folder / "masks" / "b.png", np.full((3, 4), 3))  # class 3 does not exist
    with pytest.raises(InvalidMaskError, match=r"\[3\]"):
        dataset.load_mask("images/b.png")


def test_folder_other_splits_are_subfolders(folder: Path) -> None:
    save_png(folder / "val" / "images" / "v.png", random_image(2, (3, 4)))
    save_png(folder / "val" / "masks" / "v.png", np.ones((3, 4)))
    val = FolderDataset(folder, "val")
    assert val.image_ids == ["val/images/v.png"] and val.has_masks
    with pytest.raises(DatasetError, match=r"\['train', 'val'\]"):
        FolderDataset(folder, "test")


def test_a_folder_of_photos_without_images_subfolder_is_told_where_they_go(tmp_path: Path) -> None:
    save_png(tmp_path / "photo.png", random_image(0, (8, 8)))
    with pytest.raises(DatasetError, match=r"no .*/images folder: a folder dataset keeps its photos under images/"):
        FolderDataset(tmp_path, "train")


def test_folder_without_classes_file_is_reported(folder: Path) -> None:
    (folder / "classes.yaml").unlink()
    with pytest.raises(DatasetError, match="classes.yaml"):
        FolderDataset(folder, "train")


def test_classes_file_json_with_statistics(tmp_path: Path) -> None:
    path = tmp_path / "classes.json"
    path.write_text(json.dumps({
        "ignore_index": 9, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
        "classes": [{"name": "a", "colour": [1, 2, 3], "key": "A"}, {"name": "b", "colour": [4, 5, 6], "key": "1"}],
    }))
    space = load_classes_file(path)
    assert space.num_classes == 2 and space.ignore_index == 9
    assert space.classes[0].colour == (1, 2, 3) and space.mean == (0.5, 0.5, 0.5)
    assert [info.key for info in space.classes] == ["A", "1"]


CLASS_A = "{name: a, colour: [1, 2, 3], key: a}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("classes: [", "not valid YAML"),
        ("- just a list", "mapping"),
        ("classes: []", "non-empty list"),
        (f"classes: [{CLASS_A}]\ncolours: 1", "unknown top-level keys"),
        (f"classes: [{CLASS_A}, {{name: a, colour: [0, 0, 0], key: b}}]", r"class #1 repeats the name 'a'"),
        (f"classes: [{CLASS_A}, {{name: b, colour: [0, 0, 0], key: A}}]", r"class #1 repeats the key 'a'"),
        ("classes: [{name: a, colour: [256, 0, 0], key: a}]", r"class #0 \('a'\): colour"),
        ("classes: [{name: a, colour: [1, 2], key: a}]", r"class #0 \('a'\): colour"),
        ("classes: [{name: a, colour: red, key: a}]", r"class #0 \('a'\): colour"),
        ("classes: [{name: a, colour: [1, 2, 3], key: ab}]", r"class #0 \('a'\): key"),
        ("classes: [{name: a, colour: [1, 2, 3], key: 1}]", r"class #0 \('a'\): key"),
        ("classes: [{name: a, colour: [1, 2, 3]}]", r"class #0 \('a'\) must have exactly the fields"),
        ("classes: [{name: '', colour: [1, 2, 3], key: a}]", r"class #0 \(''\): name"),
        ("classes: [7]", r"class #0 must be a mapping"),
        (f"classes: [{CLASS_A}]\nignore_index: 0", "ignore_index"),
        (f"classes: [{CLASS_A}]\nstd: [1, 0, 1]", "std must be positive"),
    ],
)
def test_classes_file_errors_name_the_entry(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "classes.yaml"
    path.write_text(text)
    with pytest.raises(ClassesFileError, match=message) as caught:
        load_classes_file(path)
    assert str(path) in str(caught.value)


# --- The registry ----------------------------------------------------------------------------------------------


def data_settings(dataset: str, root: Path, **overrides) -> SimpleNamespace:
    synthetic = SimpleNamespace(num_train=3, num_val=2, height=32, width=48, seed=5)
    values = dict(dataset=dataset, root=root, image_size=None, cityscapes_downsample=1, classes_file=None,
                  synthetic=synthetic)
    return SimpleNamespace(**{**values, **overrides})


def test_registry_opens_every_dataset(camvid: Path, cityscapes: Path, voc: Path, folder: Path,
                                      tmp_path: Path) -> None:
    from pixelpick.datasets import generate_synthetic

    roots = {"camvid": camvid, "cityscapes": cityscapes, "voc": voc, "folder": folder,
             "synthetic": generate_synthetic(tmp_path / "synthetic", num_train=3, num_val=2, height=32, width=48,
                                             seed=5)}
    assert set(DATASETS) == set(roots)
    expected = {"camvid": CamVidDataset, "cityscapes": CityscapesDataset, "voc": VOCDataset,
                "folder": FolderDataset, "synthetic": CamVidDataset}
    for name, root in roots.items():
        dataset = get_dataset(data_settings(name, root, image_size=(2, 2)), "train")
        assert type(dataset) is expected[name]
        assert dataset.image_size(dataset.image_ids[0]) == (2, 2)
    synthetic_val = get_dataset(data_settings("synthetic", roots["synthetic"]), "val")
    assert len(synthetic_val) == 2 and synthetic_val.load_image(synthetic_val.image_ids[0]).shape == (32, 48, 3)


def test_registry_passes_cityscapes_downsample_and_classes_file(cityscapes: Path, folder: Path) -> None:
    dataset = get_dataset(data_settings("cityscapes", cityscapes, cityscapes_downsample=2), "val")
    assert dataset.root.name == "cityscapes_d2"
    other = folder / "other.json"
    other.write_text(json.dumps({"classes": [{"name": "x", "colour": [0, 0, 0], "key": "x"}]}))
    assert get_dataset(data_settings("folder", folder, classes_file=other), "train").label_space.names == ("x",)


def test_registry_rejects_unknown_names(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"'kitti'.*\['camvid', 'cityscapes', 'folder', 'synthetic', 'voc'\]"):
        get_dataset(data_settings("kitti", tmp_path), "train")


def test_registry_accepts_the_settings_model_and_never_generates(tmp_path: Path) -> None:
    from pixelpick.campaign import prepare_data
    from pixelpick.settings import DataSettings, Settings, SyntheticSettings

    settings = DataSettings(dataset="synthetic", root=tmp_path / "synthetic",
                            synthetic=SyntheticSettings(num_train=2, num_val=1, height=32, width=40, seed=1))
    with pytest.raises(DatasetError, match="generated when a new campaign starts"):
        get_dataset(settings, "train")
    prepare_data(Settings(data=settings))
    dataset = get_dataset(settings, "train")
    assert dataset.image_ids == ["train/scene_0000.png", "train/scene_0001.png"]
    assert dataset.image_size(dataset.image_ids[0]) == (32, 40)
