"""The simulated annotator: exact ground truth, controlled noise, void handling, determinism."""

import numpy as np
import pandas as pd
import pytest

from pixelpick.annotator import simulate_annotations
from pixelpick.errors import AnnotationError
from pixelpick.labels import LABEL_COLUMNS, LabelStore

NUM_CLASSES, VOID = 4, 255
MASKS = {
    "a.png": np.array([[0, 1, 2], [3, VOID, 1]]),
    "b.png": np.arange(NUM_CLASSES * 50).reshape(20, 10) % NUM_CLASSES,
}


def every_pixel(*image_ids) -> pd.DataFrame:
    rows = [(i, y, x) for i in image_ids for y, x in np.ndindex(MASKS[i].shape)]
    return pd.DataFrame(rows, columns=["image_id", "y", "x"])


def annotate(queries, *, error_rate=0.0, seed=0, round_id=1):
    return simulate_annotations(
        queries, MASKS.__getitem__, num_classes=NUM_CLASSES, ignore_index=VOID, round_id=round_id,
        error_rate=error_rate, generator=np.random.default_rng(seed),
    )


def truth_of(labels: pd.DataFrame) -> np.ndarray:
    return np.array([MASKS[i][y, x] for i, y, x in labels[["image_id", "y", "x"]].itertuples(index=False)])


def test_noise_free_answers_equal_the_ground_truth():
    queries = pd.DataFrame({"image_id": ["b.png", "a.png", "a.png"], "y": [3, 1, 0], "x": [7, 1, 2]})
    labels = annotate(queries)
    assert list(labels.columns) == LABEL_COLUMNS
    assert labels[["image_id", "y", "x"]].values.tolist() == queries.values.tolist()  # query order kept
    assert labels["class_id"].tolist() == [MASKS["b.png"][3, 7], VOID, 2]
    assert set(labels["source"]) == {"simulated"} and set(labels["annotator"]) == {"simulator"}
    assert labels["round"].tolist() == [1, 1, 1] and (labels["seconds"] == 0).all()
    assert str(labels["time"].dtype) == "datetime64[us, UTC]"


def test_a_wrong_answer_is_always_another_class_and_void_stays_void():
    labels = annotate(every_pixel("a.png", "b.png"), error_rate=1.0)
    truth = truth_of(labels)
    real = truth != VOID
    assert (labels["class_id"].to_numpy()[real] != truth[real]).all()
    assert labels["class_id"].between(0, NUM_CLASSES - 1)[real].all()
    assert (labels["class_id"].to_numpy()[~real] == VOID).all()


def test_error_rate_sets_the_fraction_of_wrong_answers_and_wrong_classes_are_uniform():
    queries = pd.concat([every_pixel("b.png")] * 25, ignore_index=True)  # 5,000 queries
    labels = annotate(queries, error_rate=0.2, seed=3)
    truth = truth_of(labels)
    wrong = labels["class_id"].to_numpy() != truth
    assert wrong.mean() == pytest.approx(0.2, abs=0.02)  # binomial sd is about 0.006
    # Every wrong class is equally likely: of the wrong answers to class 0, a third each goes to 1, 2 and 3.
    answers = labels["class_id"].to_numpy()[wrong & (truth == 0)]
    shares = np.bincount(answers, minlength=NUM_CLASSES)[1:] / len(answers)
    assert shares == pytest.approx([1 / 3] * 3, abs=0.07)


def test_same_seed_same_answers():
    queries = every_pixel("a.png", "b.png")
    def answers(seed):
        return annotate(queries, error_rate=0.5, seed=seed)[["image_id", "y", "x", "class_id"]]

    assert answers(7).equals(answers(7))
    assert not answers(7).equals(answers(8))


def test_answers_are_a_valid_label_batch(tmp_path):
    store = LabelStore(tmp_path / "labels.parquet", image_sizes={i: m.shape for i, m in MASKS.items()},
                       num_classes=NUM_CLASSES, ignore_index=VOID)
    result = store.append(annotate(every_pixel("a.png"), error_rate=0.3))
    assert result.added == 6


def test_each_mask_is_loaded_once():
    loads = []

    def masks(image_id):
        loads.append(image_id)
        return MASKS[image_id]

    queries = pd.DataFrame({"image_id": ["a.png", "b.png", "a.png"], "y": [0, 0, 1], "x": [0, 0, 1]})
    simulate_annotations(queries, masks, num_classes=NUM_CLASSES, ignore_index=VOID, round_id=0,
                         generator=np.random.default_rng(0))
    assert sorted(loads) == ["a.png", "b.png"]


def test_no_queries_give_an_empty_batch():
    labels = annotate(pd.DataFrame({"image_id": [], "y": [], "x": []}))
    assert len(labels) == 0 and list(labels.columns) == LABEL_COLUMNS


@pytest.mark.parametrize(("y", "x"), [(2, 0), (0, 3), (-1, 0)])
def test_query_outside_the_mask_is_an_error(y, x):
    with pytest.raises(AnnotationError, match="outside the 2x3 mask of 'a.png'"):
        annotate(pd.DataFrame({"image_id": ["a.png"], "y": [y], "x": [x]}))


def test_ground_truth_outside_the_label_space_is_an_error():
    with pytest.raises(AnnotationError, match="is 9, neither a class"):
        simulate_annotations(
            pd.DataFrame({"image_id": ["z.png"], "y": [0], "x": [0]}), lambda _: np.array([[9]]),
            num_classes=NUM_CLASSES, ignore_index=VOID, round_id=0, generator=np.random.default_rng(0),
        )


def test_error_rate_must_be_a_probability():
    with pytest.raises(AnnotationError, match="error_rate"):
        annotate(every_pixel("a.png"), error_rate=1.5)


def test_suggestions_without_trust_change_nothing():
    queries = every_pixel("a.png", "b.png")
    wrong = (truth_of(annotate(queries)) + 1) % NUM_CLASSES
    plain = annotate(queries, error_rate=0.1, seed=4)
    shown = simulate_annotations(
        queries, MASKS.__getitem__, num_classes=NUM_CLASSES, ignore_index=VOID, round_id=1, error_rate=0.1,
        generator=np.random.default_rng(4), suggestions=wrong, suggestion_trust=0.0)
    pd.testing.assert_frame_equal(plain, shown)


def test_a_trusting_annotator_takes_wrong_suggestions_at_the_trust_rate():
    queries = pd.concat([every_pixel("b.png")] * 25, ignore_index=True)  # 5,000 queries
    truth = truth_of(annotate(queries))
    suggested = np.where(np.arange(len(queries)) % 2 == 0, (truth + 1) % NUM_CLASSES, truth)  # every other wrong
    suggested[::10] = -1  # and some pixels without a suggestion
    labels = simulate_annotations(
        queries, MASKS.__getitem__, num_classes=NUM_CLASSES, ignore_index=VOID, round_id=1,
        generator=np.random.default_rng(5), suggestions=suggested, suggestion_trust=0.3)
    answer = labels["class_id"].to_numpy()
    wrongly_suggested = (suggested != truth) & (suggested >= 0)
    assert (answer[wrongly_suggested] == suggested[wrongly_suggested]).mean() == pytest.approx(0.3, abs=0.03)
    assert (answer[~wrongly_suggested] == truth[~wrongly_suggested]).all()  # no error of their own here


def test_suggestion_trust_must_be_a_probability_and_suggestions_one_per_query():
    queries = every_pixel("a.png")
    with pytest.raises(AnnotationError, match="suggestion_trust"):
        simulate_annotations(queries, MASKS.__getitem__, num_classes=NUM_CLASSES, ignore_index=VOID, round_id=1,
                             generator=np.random.default_rng(0), suggestion_trust=1.5)
    with pytest.raises(AnnotationError, match="one per query"):
        simulate_annotations(queries, MASKS.__getitem__, num_classes=NUM_CLASSES, ignore_index=VOID, round_id=1,
                             generator=np.random.default_rng(0), suggestions=np.zeros(2), suggestion_trust=0.5)
