"""The served model's `output` parameter: labels only, or probabilities as float16 or uint8; the default unchanged."""

from __future__ import annotations

import io
import runpy
import warnings

import mlflow
import numpy as np
import pytest
from mlflow.pyfunc.scoring_server import predictions_to_json

from pixelpick.errors import PredictionInputError
from tasks.serving import SegmentationModel
from tasks.tracking import model_signature


class FixedPredictor:
    """Stands in for the checkpoint: softmax of fixed random logits, 3 classes."""

    calls = 0

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        FixedPredictor.calls += 1
        logits = np.random.default_rng(0).normal(size=(len(images), 3, *images.shape[1:3])).astype(np.float32)
        probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        return {"probabilities": probabilities, "labels": probabilities.argmax(axis=1)}


class StubModel(SegmentationModel):
    def load_context(self, context) -> None:  # noqa: ANN001
        self.predictor = FixedPredictor()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Saved and loaded through MLflow with the real signature, so its parameter checking is what a request meets."""
    path = tmp_path_factory.mktemp("served") / "model"
    mlflow.pyfunc.save_model(path, python_model=StubModel(), signature=model_signature(3), input_example=IMAGES)
    return mlflow.pyfunc.load_model(str(path))


IMAGES = np.zeros((1, 96, 128, 3), np.uint8)


def served_bytes(prediction: dict[str, np.ndarray]) -> int:
    """The size of the JSON answer `mlflow models serve` sends for this prediction."""
    out = io.StringIO()
    predictions_to_json(prediction, out)
    return len(out.getvalue().encode())


def test_the_default_is_unchanged(model) -> None:
    expected = FixedPredictor().predict(IMAGES)
    for result in (model.predict(IMAGES), model.predict(IMAGES, params={"output": "all"})):
        assert set(result) == {"probabilities", "labels"}
        assert result["probabilities"].dtype == np.float32 and result["labels"].dtype == np.int64
        np.testing.assert_array_equal(result["probabilities"], expected["probabilities"])
        np.testing.assert_array_equal(result["labels"], expected["labels"])


def test_lean_outputs_keep_the_labels_and_shrink_the_answer(model) -> None:
    full = model.predict(IMAGES)
    labels = model.predict(IMAGES, params={"output": "labels"})
    half = model.predict(IMAGES, params={"output": "float16"})
    quantised = model.predict(IMAGES, params={"output": "uint8"})
    assert set(labels) == {"labels"}
    for lean in (labels, half, quantised):
        np.testing.assert_array_equal(lean["labels"], full["labels"])
    assert half["probabilities"].dtype == np.float16
    np.testing.assert_allclose(half["probabilities"], full["probabilities"], atol=1e-3)
    assert quantised["probabilities"].dtype == np.uint8
    assert np.abs(quantised["probabilities"] / 255 - full["probabilities"]).max() <= 1 / 510 + 1e-7
    sizes = {name: served_bytes(result) for name, result in
             {"all": full, "float16": half, "uint8": quantised, "labels": labels}.items()}
    assert sizes["labels"] < sizes["uint8"] < sizes["float16"] < sizes["all"]
    assert sizes["uint8"] * 4 < sizes["all"] and sizes["labels"] * 15 < sizes["all"], sizes
    print(sizes)


def test_an_unknown_output_is_refused_before_predicting(model) -> None:
    before = FixedPredictor.calls
    with pytest.raises(PredictionInputError, match="'png'.*uint8"):
        model.predict(IMAGES, params={"output": "png"})
    assert FixedPredictor.calls == before


def test_the_model_code_loads_without_a_warning() -> None:
    # MLflow runs this file whenever it logs or loads a round's model ("models from code"), and checks predict's
    # input type hint as the class is defined: without one, it warned every time, into every round's log.
    import tasks.serving

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runpy.run_path(tasks.serving.__file__)
    assert not [str(warning.message) for warning in caught]
