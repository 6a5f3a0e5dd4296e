"""The benchmark's protocol: a fixed tuning split, more supervision per click (and its precision), paired reports."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

from pixelpick.benchmark import (
    FULL,
    PRESETS,
    STAGES,
    BenchmarkPreset,
    RunSpec,
    benchmark_settings,
    parse_variant,
    read_rows,
    run_benchmark_run,
)
from pixelpick.benchmark_report import paired_comparison, results_frame, summarise, write_report
from pixelpick.datasets import get_dataset
from pixelpick.datasets.camvid import tuning_names
from pixelpick.digests import file_md5
from pixelpick.expansion import Expander, class_embedding, propagate_clicks
from pixelpick.superpixels import SuperpixelCache, SuperpixelParams, segment
from pixelpick.training import LabelledImages
from pixelpick.transforms import TrainTransform
from tests.conftest import TINY_PARAMS
from tests.fixtures import save_png, write_camvid

TINY = BenchmarkPreset(
    # DeepLabv3+: the tiny LR-ASPP stays at chance for a few epochs, so its predictions would sieve every expansion.
    name="tiny", description="a test", overrides={"train.epochs": 1, "model.arch": "deeplabv3plus_mobilenetv2"},
    step=5, rounds=2,
    strategies=("margin", "random"), seeds=(0,), warm_start=True,
)


def _camvid(tmp_path, train=20):
    mask = np.zeros((4, 6), np.uint8)
    root = write_camvid(tmp_path / "camvid", {"train": {f"f{i:03d}.png": mask for i in range(train)},
                                              "val": {"v.png": mask}})
    return SimpleNamespace(dataset="camvid", root=root, image_size=None, cityscapes_downsample=4,
                           classes_file=None, synthetic=None)


# ------------------------------------------------------------------------------------------------- tuning split


def test_the_tuning_split_is_a_fixed_fifth_of_train_never_trained_on(tmp_path):
    data = _camvid(tmp_path)
    train, tune, rest = (set(get_dataset(data, split).image_ids) for split in ("train", "tune", "train-tune"))
    assert len(tune) == 4 and len(rest) == 16
    assert tune.isdisjoint(rest) and tune | rest == train
    assert set(get_dataset(data, "tune").image_ids) == tune  # the same split every time it is opened
    names = [f"f{i:03d}.png" for i in range(20)]
    shuffled = random.Random(1).sample(names, len(names))
    assert tuning_names(shuffled) == tuning_names(names) == {i.removeprefix("train/") for i in tune}
    tune_set = get_dataset(data, "tune")
    assert tune_set.load_mask(tune_set.image_ids[0]).shape == (4, 6)  # masks come from trainannot


def test_the_tune_protocol_trains_on_the_rest_of_train_and_evaluates_on_the_tuning_split(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(TINY_PARAMS)
    tune = benchmark_settings(params, PRESETS["cpu"], tmp_path / "bench", protocol="tune")
    assert (tune.data.train_split, tune.data.eval_split) == ("train-tune", "tune")
    report = benchmark_settings(params, PRESETS["cpu"], tmp_path / "bench")
    assert (report.data.train_split, report.data.eval_split) == ("train", "val")
    assert PRESETS["cpu"].seeds == (0, 1, 2)


# ------------------------------------------------------------------------------------------- expansion options


def _two_regions(height=8, width=10):
    """Probabilities of a model that sees class 0 on the left half and class 1 on the right."""
    probs = np.full((3, height, width), 0.05, np.float32)
    probs[0, :, : width // 2] = 0.9
    probs[1, :, width // 2:] = 0.9
    return probs


def test_propagation_follows_the_embedding_within_the_radius_and_never_relabels_a_click():
    probs = _two_regions()
    embedding = class_embedding(probs)
    clicks, classes = np.array([[2, 1], [5, 8]]), np.array([0, 1])
    pixels, labels, weights = propagate_clicks(embedding, (8, 10), clicks, classes, 11, threshold=0.9)
    assert len(pixels) == 8 * 10 - 2  # every other pixel is close to one click's embedding
    left = pixels[:, 1] < 5
    assert (labels[left] == 0).all() and (labels[~left] == 1).all()
    assert not {tuple(p) for p in pixels} & {tuple(c) for c in clicks}
    assert weights[left].sum() == pytest.approx(0.5) and weights[~left].sum() == pytest.approx(0.5)
    near, _, _ = propagate_clicks(embedding, (8, 10), clicks, classes, 11, threshold=0.9, radius=2)
    assert len(near) and all(min(np.hypot(*(p - c)) for c in clicks) <= 2 for p in near)
    # Two classes clicked on what the model sees as one region: the region is left alone.
    conflict, _, _ = propagate_clicks(embedding, (8, 10), np.array([[0, 0], [7, 4]]), np.array([0, 2]), 11, 0.9)
    assert not (conflict[:, 1] < 5).any()


def test_the_sieve_drops_what_the_previous_model_disagrees_with_and_precision_is_counted():
    probs, truth = _two_regions(), np.zeros((8, 10), np.int64)
    truth[:, 5:] = 1
    expander = Expander(11, teacher=lambda image_id: probs, sieve=0.5, truth=lambda image_id: truth)
    pixels, classes = np.array([[0, 0], [0, 9], [3, 3]]), np.array([0, 0, 0])  # (0, 9) leaks into class 1
    keep = expander.sieve("a", pixels, classes)
    assert keep.tolist() == [True, False, True]
    expander.clicks = 1
    expander.record("superpixel", "a", pixels, classes)
    summary = expander.summary()
    assert summary["superpixel_precision"] == pytest.approx(2 / 3)
    assert summary["superpixel_sieved_share"] == pytest.approx(1 / 4)


def test_propagation_labels_pixels_of_the_clicked_image_only(tmp_path):
    data = _camvid(tmp_path, train=3)
    dataset = get_dataset(data, "train")
    a, b, c = dataset.image_ids
    labels = pd.DataFrame({"image_id": [a, a, b], "y": [0, 3, 1], "x": [0, 5, 2], "class_id": [0, 1, 2]})
    columns = np.eye(3, dtype=np.float32)[np.arange(6) % 3].T  # the model sees class x % 3 in column x
    views = {a: np.broadcast_to(0.03 + 0.9 * columns[:, None, :], (3, 4, 6)),
             b: np.full((3, 4, 6), 1 / 3, np.float32), c: np.full((3, 4, 6), 1 / 3, np.float32)}
    expander = Expander(11, teacher=views.__getitem__, propagation_threshold=0.9, truth=dataset.load_mask)
    transform = TrainTransform(crop_size=(4, 6), scale_range=(1, 1), hflip_p=0, photometric=False,
                               mean=(0, 0, 0), std=(1, 1, 1), ignore_index=11)
    images = LabelledImages(dataset, transform, labels, expander=expander)
    assert sorted(images.pixels) == [a, b]  # an image without clicks gets no propagated labels
    for image_id in (a, b):
        rows = labels[labels["image_id"] == image_id]
        clicks, classes = rows[["y", "x"]].to_numpy(), rows["class_id"].to_numpy()
        expected, _, _ = propagate_clicks(class_embedding(views[image_id]), (4, 6), clicks, classes, 11, 0.9)
        assert len(images.pixels[image_id][0]) == len(clicks) + len(expected)
    assert 0 <= expander.summary()["propagation_precision"] <= 1


def test_superpixels_are_cached_by_content_so_a_photo_changed_under_its_name_is_segmented_anew(tmp_path):
    mask = np.zeros((24, 32), np.uint8)
    dataset = get_dataset(SimpleNamespace(dataset="camvid", root=write_camvid(tmp_path / "camvid", {"train": {
        "a.png": mask}}), image_size=None, cityscapes_downsample=4, classes_file=None, synthetic=None), "train")
    params, (image_id,) = SuperpixelParams(segments=4), dataset.image_ids
    halves = np.zeros((24, 32, 3), np.uint8)

    def photo(left_right: bool) -> None:  # two flat halves: SLIC's segments follow their edge
        halves[...] = 0
        (halves[:, 16:] if left_right else halves[12:])[...] = 255
        save_png(dataset.image_path(image_id), halves)

    def cached() -> np.ndarray:  # as a round's training builds it: from the round's frozen pool's md5s
        contents = {image_id: file_md5(dataset.image_path(image_id))}
        return SuperpixelCache(dataset, params, tmp_path / "cache", contents)(image_id)

    photo(left_right=True)
    before = cached()
    assert np.array_equal(cached(), before)  # read back from the cache
    photo(left_right=False)
    after = cached()
    assert np.array_equal(after, segment(dataset.load_image(image_id), params))
    assert not np.array_equal(after, before)
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 2  # one per content, not one per name


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["sp20+ss0.2", "fp0.5+fr8"])
def test_each_expansion_option_trains_and_logs_its_precision_per_round(tmp_path, variant):
    params = tmp_path / "params.yaml"
    params.write_text(TINY_PARAMS)
    base = benchmark_settings(params, TINY, tmp_path / "bench", protocol="tune")
    rows = read_rows([run_benchmark_run(base, TINY, RunSpec("margin", 0, parse_variant(variant)))])
    kind = "superpixel" if variant.startswith("sp") else "propagation"
    later = rows[1]
    assert later["protocol"] == "tune" and later["miou"] >= 0
    assert 0 <= later[f"{kind}_precision"] <= 1 and later[f"{kind}_per_click"] > 0
    if kind == "propagation":
        assert "propagation_precision" not in rows[0]  # round 0 has no previous model to propagate with
    else:
        assert 0 <= later["superpixel_sieved_share"] <= 1


# ------------------------------------------------------------------------------------------------------ report


def _rows(strategy, budget_miou, seed):
    return [{"dataset": "camvid", "preset": "cpu", "strategy": strategy, "seed": seed, "pixels_per_image": b,
             "miou": m, "round": i, "arch": "lraspp", "image_size": "180x240", "device": "cpu",
             "epochs_per_round": 4, "iou_sky": m, **{f"{s}_s": 1.0 for s in STAGES}}
            for i, (b, m) in enumerate(budget_miou.items())]


def test_the_report_pairs_each_strategy_with_random_seed_by_seed(tmp_path):
    margin = {0: (0.40, 0.52), 1: (0.42, 0.51), 2: (0.44, 0.49)}
    random_ = {0: (0.40, 0.50), 1: (0.42, 0.50), 2: (0.44, 0.50)}
    rows = [row for seed in range(3) for row in (
        _rows("margin", dict(zip((20, 40), margin[seed])), seed)
        + _rows("random", dict(zip((20, 40), random_[seed])), seed)
        + _rows(FULL, {10_000.0: 0.50, 10_001.0: 0.60}, seed))]
    frame = results_frame(rows)
    paired = paired_comparison(frame).set_index("budget")
    assert paired.loc[40, "mean_diff"] == pytest.approx((2 + 1 - 1) / 3)
    assert paired.loc[40, "std_diff"] == pytest.approx(np.std([2, 1, -1], ddof=1))
    assert (paired.loc[40, "wins"], paired.loc[40, "seeds"]) == (2, 3)
    assert paired.loc[20, "mean_diff"] == 0 and paired.loc[20, "wins"] == 0
    summary = summarise(frame).set_index(["strategy", "budget"])
    assert summary.loc[("margin", 20), "mean"] == pytest.approx(42.0)
    assert summary.loc[("margin", 20), "std"] == pytest.approx(2.0)
    assert summary.loc[("margin", 40), "pct_of_final_full"] == pytest.approx(100 * 50.667 / 60, abs=0.01)
    text = write_report(frame, tmp_path, "camvid-cpu")["markdown"].read_text()
    assert "| margin − random | +0.0 ± 0.0 (0/3) | +0.7 ± 1.5 (2/3) |" in text


def test_the_camvid_folder_given_applies_to_camvid_presets_only(tmp_path, monkeypatch):
    from flows.benchmark import BenchmarkChoice, plan_benchmark

    monkeypatch.setitem(PRESETS, "tiny", TINY)  # on params.yaml's synthetic data
    params = tmp_path / "params.yaml"
    params.write_text(TINY_PARAMS)
    camvid = _camvid(tmp_path).root

    def planned_root(preset):
        choice = BenchmarkChoice(preset=preset, params=str(params), workdir=str(tmp_path / "bench"),
                                 camvid_root=str(camvid))
        return json.loads(plan_benchmark.fn(choice)["settings_json"])["data"]["root"]

    assert planned_root("cpu") == str(camvid)
    assert planned_root("tiny") != str(camvid)


@pytest.mark.slow
def test_the_benchmark_command_runs_in_tune_mode(prefect_server, tmp_path, monkeypatch):
    from flows.cli import main

    monkeypatch.setitem(PRESETS, "tiny", TINY)
    # A CamVid folder in the environment is for CamVid presets: this synthetic one keeps its own data.
    monkeypatch.setenv("PIXELPICK_CAMVID_ROOT", str(_camvid(tmp_path).root))
    params = tmp_path / "params.yaml"
    params.write_text(TINY_PARAMS)
    main(["benchmark", "--preset", "tiny", "--protocol", "tune", "--params", str(params), "--strategies",
          "margin,full", "--variant", "fp0.5", "--workdir", str(tmp_path / "bench"),
          "--report-dir", str(tmp_path / "docs")])
    csv = pd.read_csv(tmp_path / "docs" / "synthetic-tiny-tune.csv")
    assert set(csv["strategy"]) == {"margin", "margin+fp0.5", FULL}
    assert set(csv["protocol"]) == {"tune"}
    recorded = yaml.safe_load((tmp_path / "bench" / "tiny-tune" / "margin-s0" / "params.yaml").read_text())
    assert (recorded["data"]["train_split"], recorded["data"]["eval_split"]) == ("train-tune", "tune")
    propagated = csv[(csv["strategy"] == "margin+fp0.5") & (csv["round"] == 1)]
    assert propagated["propagation_precision"].between(0, 1).all()
