"""Segmentation networks, built by name, randomly initialised unless a local weights file is given.

Every model maps an image batch ``N x 3 x H x W`` to logits ``N x C x H x W`` at the input resolution, and has a
dropout layer right before its classifier with probability ``dropout_p``, so MC-dropout inference
(:func:`set_mc_dropout`) works the same way whatever the architecture. Nothing is ever downloaded.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models import mobilenet_v2
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation import deeplabv3_resnet50, lraspp_mobilenet_v3_large
from torchvision.models.segmentation.deeplabv3 import ASPP

from pixelpick.errors import PretrainedWeightsError, UnknownArchitectureError

logger = logging.getLogger(__name__)

_flushing = threading.local()


@contextmanager
def subnormals_flushed() -> Iterator[None]:
    """Run the block (or the decorated function) with subnormal floats flushed to zero, then restore IEEE arithmetic
    in this thread.

    The backward pass of a network trained for a while produces subnormal values, on which x86 CPUs are many times
    slower: a fine-tuning round's training batch on CamVid took 4 to 6 times as long as with them flushed
    (benchmarks/subnormals.py). Values below 1.2e-38 are far under the rounding of the weights they update. The flag
    is per thread and torch's worker threads copy it when they are created, so the steps that run torch use this
    from their start, before their thread first computes in parallel. It is never left set in the calling thread:
    the flag changes all float arithmetic there, numpy's included.
    """
    depth = getattr(_flushing, "depth", 0)
    torch.set_flush_denormal(True)
    _flushing.depth = depth + 1
    try:
        yield
    finally:
        _flushing.depth = depth
        if depth == 0:
            torch.set_flush_denormal(False)


DROPOUT_LAYERS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


class DeepLabV3Plus(nn.Module):
    """DeepLabv3+ on MobileNetV2 at output stride 16, the paper's default model.

    Encoder: MobileNetV2 features up to the 320-channel block, dilated rather than strided past 1/16, then ASPP
    (1x1, 3x3 at rates 6/12/18, image pooling; 256 channels; dropout 0.5). Decoder: the 24-channel features at 1/4
    projected to 48, concatenated with the upsampled ASPP output, two 3x3 convs of 256 each followed by dropout
    (0.5, then ``dropout_p``), a 1x1 classifier, and a bilinear upsample to the input size.
    """

    def __init__(self, num_classes: int, dropout_p: float = 0.2) -> None:
        super().__init__()
        self.backbone = IntermediateLayerGetter(
            _mobilenet_v2_features_os16(), return_layers={"3": "low_level", "17": "out"}
        )
        self.aspp = ASPP(in_channels=320, atrous_rates=[6, 12, 18], out_channels=256)
        self.low_level_projection = _conv_bn_relu(24, 48, kernel_size=1)
        self.decoder = nn.Sequential(
            _conv_bn_relu(256 + 48, 256, kernel_size=3),
            nn.Dropout(0.5),
            _conv_bn_relu(256, 256, kernel_size=3),
            nn.Dropout(dropout_p),
        )
        self.classifier = nn.Conv2d(256, num_classes, kernel_size=1)
        _kaiming_init([self.aspp, self.low_level_projection, self.decoder, self.classifier])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images)
        low_level = self.low_level_projection(features["low_level"])  # N,48,H/4,W/4
        context = self.aspp(features["out"])  # N,256,H/16,W/16
        context = F.interpolate(context, size=low_level.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.classifier(self.decoder(torch.cat([context, low_level], dim=1)))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


class LogitsOnly(nn.Module):
    """Adapts a torchvision segmentation model, which returns an OrderedDict, to return the logits tensor."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)["out"]


def _mobilenet_v2_features_os16() -> nn.Sequential:
    """MobileNetV2's feature blocks 0..17 (up to 320 channels) with output stride 16 instead of 32.

    Block 14 would halve the resolution a fifth time: it keeps stride 1, and the blocks after it dilate their
    depthwise 3x3 conv by 2 to keep the receptive field (the DeepLab / torchvision ``replace_stride_with_dilation``
    convention).
    """
    features = mobilenet_v2(weights=None).features[:18]
    _depthwise_conv(features[14]).stride = (1, 1)
    for block in features[15:]:
        conv = _depthwise_conv(block)
        conv.dilation, conv.padding = (2, 2), (2, 2)
    return features


def _depthwise_conv(block: nn.Module) -> nn.Conv2d:
    return next(m for m in block.modules() if isinstance(m, nn.Conv2d) and m.groups > 1)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _kaiming_init(modules: list[nn.Module]) -> None:
    """The reference's head initialisation: Kaiming-normal convs, BatchNorm weight 1 and bias 0."""
    for module in (m for parent in modules for m in parent.modules()):
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _with_dropout(classifier: nn.Module, dropout_p: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(dropout_p), classifier)


def _build_lraspp_mobilenetv3(num_classes: int, dropout_p: float) -> nn.Module:
    net = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes)
    # LR-ASPP has no dropout of its own; without one MC-dropout would have nothing to sample.
    net.classifier.low_classifier = _with_dropout(net.classifier.low_classifier, dropout_p)
    net.classifier.high_classifier = _with_dropout(net.classifier.high_classifier, dropout_p)
    return LogitsOnly(net)


def _build_deeplabv3_resnet50(num_classes: int, dropout_p: float) -> nn.Module:
    net = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
    net.classifier[-1] = _with_dropout(net.classifier[-1], dropout_p)
    return LogitsOnly(net)


ARCHITECTURES: dict[str, Callable[[int, float], nn.Module]] = {
    "deeplabv3plus_mobilenetv2": DeepLabV3Plus,
    "lraspp_mobilenetv3": _build_lraspp_mobilenetv3,
    "deeplabv3_resnet50": _build_deeplabv3_resnet50,
}


# The final convolutions of each architecture: one output channel per class, the only layers that change with the
# number of classes (LR-ASPP adds two classifiers' logits, so it has two).
CLASSIFIER_LAYERS: dict[str, tuple[str, ...]] = {
    "deeplabv3plus_mobilenetv2": ("classifier",),
    "lraspp_mobilenetv3": ("net.classifier.low_classifier.1", "net.classifier.high_classifier.1"),
    "deeplabv3_resnet50": ("net.classifier.4.1",),
}


def grow_classifier(arch: str, state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """`state`, the weights of an `arch` model for C classes, fitted to `model`, the same network built for C + n
    classes (classes appended to the label space): every tensor as in `state`, except that the classifier rows of
    the n new classes keep `model`'s own fresh initialisation. Class ids are unchanged, so each old class keeps
    what the previous model learnt of it. Raises ValueError when `state` is not such a model."""
    target = model.state_dict()
    grown = dict(state)
    for layer in CLASSIFIER_LAYERS[arch]:
        for name in (f"{layer}.weight", f"{layer}.bias"):
            old, new = state.get(name), target[name]
            if old is None or old.shape[1:] != new.shape[1:] or old.shape[0] > new.shape[0]:
                shape = None if old is None else tuple(old.shape)
                raise ValueError(f"{name}: the previous model's {shape} cannot grow into {tuple(new.shape)}")
            rows = new.detach().clone()
            rows[: old.shape[0]] = old
            grown[name] = rows
    return grown


def build_model(
    arch: str, num_classes: int, *, pretrained_path: Path | None = None, dropout_p: float = 0.2
) -> nn.Module:
    """Build the segmentation network ``arch`` (a key of ``ARCHITECTURES``) for ``num_classes`` classes.

    Weights are random unless ``pretrained_path`` names a local state-dict file: either a backbone file (such as
    torchvision's ImageNet MobileNetV2 or ResNet-50) or a full checkpoint of this model; see :func:`load_pretrained`.
    ``dropout_p`` is the dropout right before the classifier, the one MC-dropout samples.
    """
    try:
        builder = ARCHITECTURES[arch]
    except KeyError:
        raise UnknownArchitectureError(
            f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}"
        ) from None
    model = builder(num_classes, dropout_p)
    if pretrained_path is not None:
        load_pretrained(model, Path(pretrained_path))
    return model


def load_pretrained(model: nn.Module, path: Path) -> None:
    """Copy into ``model`` every tensor of the state dict at ``path`` that fits it by name and shape.

    A file key matches the model key of the same name (a full checkpoint) or, for a backbone file, the model's
    ``backbone.`` key of the same name once torchvision's ``features.`` prefix is dropped. A checkpoint dict that
    holds the state dict under ``"model"`` or ``"state_dict"`` is unwrapped. Raises ``PretrainedWeightsError`` when
    the file cannot be read safely (``weights_only``) or when no tensor of it fits.
    """
    file_state = _read_state_dict(path)
    model_state = model.state_dict()
    matched = _match_state_dict(file_state, model_state)
    if not matched:
        raise PretrainedWeightsError(
            f"{path}: none of its {len(file_state)} tensors match the model's parameter names and shapes"
        )
    model.load_state_dict(matched, strict=False)
    logger.info(
        "loaded %d tensors from %s; %d model tensors not in the file (missing), %d file tensors unused (unexpected)",
        len(matched),
        path,
        len(model_state) - len(matched),
        len(file_state) - len(matched),
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types here (pickle, zip, OS errors); all mean "unreadable"
        raise PretrainedWeightsError(f"{path}: cannot read it as a state dict ({error})") from error
    for wrapper_key in ("model", "state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper_key), dict):
            loaded = loaded[wrapper_key]
    if not isinstance(loaded, dict):
        raise PretrainedWeightsError(f"{path}: holds a {type(loaded).__name__}, not a state dict")
    return {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}


def _match_state_dict(
    file_state: dict[str, torch.Tensor], model_state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename the file's tensors to the model's keys they fit; drop those that fit nothing."""
    backbone_key_by_name = {key.partition("backbone.")[2]: key for key in model_state if "backbone." in key}
    matched = {}
    for key, tensor in file_state.items():
        target = key if key in model_state else backbone_key_by_name.get(key.removeprefix("features."))
        if target is not None and model_state[target].shape == tensor.shape:
            matched[target] = tensor
    return matched


def set_mc_dropout(model: nn.Module, enabled: bool) -> nn.Module:
    """Put ``model`` in inference mode; with ``enabled``, its dropout layers keep sampling (MC-dropout).

    Everything else, BatchNorm included, stays in eval mode, so T stochastic passes differ only by their dropout
    masks and never update running statistics. Returns ``model`` for chaining.
    """
    model.eval()
    for module in model.modules():
        if isinstance(module, DROPOUT_LAYERS):
            module.train(enabled)
    return model
