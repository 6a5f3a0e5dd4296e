"""The MLflow model of a round: a pyfunc that returns class probabilities and the label map of RGB images.

MLflow logs this file as the model's code ("models from code") with the round's checkpoint as its artifact and
the `pixelpick` package beside it, so `mlflow.pyfunc.load_model("models:/<name>@best")` and
`mlflow models serve` work wherever MLflow and torch are installed.

    model = mlflow.pyfunc.load_model("models:/pixelpick-synthetic-margin@best")
    out = model.predict(images)     # images: uint8 (N, H, W, 3); out["labels"]: (N, H, W), out["probabilities"]
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class SegmentationModel(PythonModel):
    def load_context(self, context) -> None:  # noqa: ANN001 (MLflow's context type)
        from pixelpick.predict import Predictor

        self.predictor = Predictor(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None) -> dict[str, np.ndarray]:  # noqa: ANN001
        return self.predictor.predict(np.asarray(model_input, dtype=np.uint8))


mlflow.models.set_model(SegmentationModel())
