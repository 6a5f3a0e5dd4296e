"""The MLflow model of a round: a pyfunc that returns class probabilities and the label map of RGB images.

MLflow logs this file as the model's code ("models from code") with the round's checkpoint as its artifact and
the `pixelpick` package beside it, so `mlflow.pyfunc.load_model("models:/<name>@best")` and
`mlflow models serve` work wherever MLflow and torch are installed.

    model = mlflow.pyfunc.load_model("models:/pixelpick-synthetic-margin@best")
    out = model.predict(images)     # images: uint8 (N, H, W, 3); out["labels"]: (N, H, W), out["probabilities"]
    out = model.predict(images, params={"output": "labels"})    # the label maps only

The `output` parameter (a request's `"params": {"output": ...}` when served) chooses how much comes back:
"all" (the default: float32 probabilities and int64 labels), "labels" (labels only), "float16" (probabilities
as float16) or "uint8" (probabilities as round(p * 255), so p = value / 255 to within 1/510). Served as JSON, one
96x128 image of 3 classes is about 790 kB with "all", 610 kB with "float16", 200 kB with "uint8" and 37 kB
with "labels".
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

OUTPUTS = ("all", "labels", "float16", "uint8")
DEFAULT_OUTPUT = "all"


def encode_output(result: dict[str, np.ndarray], output: str = DEFAULT_OUTPUT) -> dict[str, np.ndarray]:
    """The prediction in the form `output` asks for (see the module's docstring)."""
    check_output(output)
    if output == "all":
        return result
    if output == "labels":
        return {"labels": result["labels"]}
    probabilities = np.asarray(result["probabilities"])
    if output == "float16":
        return {"probabilities": probabilities.astype(np.float16), "labels": result["labels"]}
    scaled = np.rint(np.clip(probabilities, 0.0, 1.0) * 255).astype(np.uint8)
    return {"probabilities": scaled, "labels": result["labels"]}


def check_output(output: str) -> None:
    if output not in OUTPUTS:
        from pixelpick.errors import PredictionInputError

        raise PredictionInputError(f"unknown output {output!r}; choose one of {list(OUTPUTS)}")


class SegmentationModel(PythonModel):
    def load_context(self, context) -> None:  # noqa: ANN001 (MLflow's context type)
        from pixelpick.predict import Predictor

        self.predictor = Predictor(context.artifacts["checkpoint"])

    # The input's type hint tells MLflow the model takes an array: without one it warns at every logging and loading.
    def predict(self, context, model_input: np.ndarray, params=None) -> dict[str, np.ndarray]:  # noqa: ANN001
        output = (params or {}).get("output", DEFAULT_OUTPUT)
        check_output(output)  # before the forward pass is paid for
        return encode_output(self.predictor.predict(np.asarray(model_input, dtype=np.uint8)), output)


mlflow.models.set_model(SegmentationModel())
