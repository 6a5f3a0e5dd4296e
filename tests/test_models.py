"""Segmentation models: shapes at awkward sizes, the paper's DeepLabv3+ layout, weights loading, MC-dropout."""

import json
import logging
import subprocess
import sys

import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v2, mobilenet_v3_large, resnet50

from pixelpick.errors import PretrainedWeightsError, UnknownArchitectureError
from pixelpick.models import ARCHITECTURES, build_model, set_mc_dropout

NUM_CLASSES = 11
# Sizes that are not multiples of 16; the ResNet-50 one is tiny to keep it quick.
INPUT_SIZE = {"deeplabv3plus_mobilenetv2": (65, 97), "lraspp_mobilenetv3": (65, 97), "deeplabv3_resnet50": (33, 41)}
# torchvision's ImageNet classifier of the same backbone, whose state dict is what a backbone weights file holds.
IMAGENET_BACKBONE = {
    "deeplabv3plus_mobilenetv2": mobilenet_v2,
    "lraspp_mobilenetv3": mobilenet_v3_large,
    "deeplabv3_resnet50": resnet50,
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_every_architecture_is_tested():
    assert set(INPUT_SIZE) == set(ARCHITECTURES) == set(IMAGENET_BACKBONE)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_logits_come_back_at_input_resolution(arch):
    model = build_model(arch, NUM_CLASSES).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, *INPUT_SIZE[arch]))
    assert logits.shape == (1, NUM_CLASSES, *INPUT_SIZE[arch])


def test_deeplabv3plus_trains_on_a_small_batch():
    model = build_model("deeplabv3plus_mobilenetv2", 3).train()
    logits = model(torch.randn(2, 3, 33, 47))
    logits.mean().backward()
    assert logits.shape == (2, 3, 33, 47)
    assert model.classifier.weight.grad is not None


def test_deeplabv3plus_has_the_papers_size():
    model = build_model("deeplabv3plus_mobilenetv2", NUM_CLASSES)
    n_params = sum(p.numel() for p in model.parameters())
    assert 5.5e6 <= n_params <= 6.2e6  # the reference reports 5.81 M


def test_deeplabv3plus_runs_at_output_stride_16_with_dilation():
    model = build_model("deeplabv3plus_mobilenetv2", NUM_CLASSES).eval()
    with torch.no_grad():
        features = model.backbone(torch.randn(1, 3, 64, 96))
    assert features["low_level"].shape == (1, 24, 16, 24)  # 1/4
    assert features["out"].shape == (1, 320, 4, 6)  # 1/16, not 1/32
    depthwise = [m for m in model.backbone.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert [conv.dilation for conv in depthwise[-3:]] == [(2, 2)] * 3  # the blocks after the removed stride
    assert all(conv.stride == (1, 1) for conv in depthwise[-4:])


def test_deeplabv3plus_dropouts_follow_the_reference():
    model = build_model("deeplabv3plus_mobilenetv2", NUM_CLASSES, dropout_p=0.3)
    rates = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert rates == [0.5, 0.5, 0.3]  # ASPP projection, first decoder conv, last decoder conv


def test_unknown_architecture_lists_the_valid_ones():
    with pytest.raises(UnknownArchitectureError, match="deeplabv3plus_mobilenetv2"):
        build_model("segformer", NUM_CLASSES)


@pytest.mark.parametrize("wrap", [False, True], ids=["state_dict", "checkpoint"])
def test_a_saved_model_loads_back_identically(tmp_path, wrap):
    model = build_model("deeplabv3plus_mobilenetv2", NUM_CLASSES).eval()
    path = tmp_path / "model.pt"
    torch.save({"model": model.state_dict(), "epoch": 3} if wrap else model.state_dict(), path)

    reloaded = build_model("deeplabv3plus_mobilenetv2", NUM_CLASSES, pretrained_path=path).eval()

    images = torch.randn(1, 3, 33, 47)
    with torch.no_grad():
        assert torch.equal(model(images), reloaded(images))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_an_imagenet_backbone_file_fills_the_backbone(tmp_path, arch, caplog):
    imagenet_state = IMAGENET_BACKBONE[arch](weights=None).state_dict()
    path = tmp_path / "backbone.pth"
    torch.save(imagenet_state, path)

    with caplog.at_level(logging.INFO, logger="pixelpick.models"):
        model = build_model(arch, NUM_CLASSES, pretrained_path=path)

    first_conv = "features.0.0.weight" if "features.0.0.weight" in imagenet_state else "conv1.weight"
    backbone_first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert torch.equal(backbone_first_conv.weight, imagenet_state[first_conv])
    assert "unexpected" in caplog.text and str(path) in caplog.text


def test_unreadable_file_is_named(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(PretrainedWeightsError, match="broken.pt"):
        build_model("lraspp_mobilenetv3", NUM_CLASSES, pretrained_path=path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="absent.pt"):
        build_model("lraspp_mobilenetv3", NUM_CLASSES, pretrained_path=tmp_path / "absent.pt")


@pytest.mark.parametrize(
    "content, message",
    [({"head.weight": torch.zeros(3)}, "none of its 1 tensors"), ([torch.zeros(3)], "not a state dict")],
    ids=["nothing_matches", "not_a_dict"],
)
def test_file_that_fits_nothing_is_rejected(tmp_path, content, message):
    path = tmp_path / "other.pt"
    torch.save(content, path)
    with pytest.raises(PretrainedWeightsError, match=message):
        build_model("lraspp_mobilenetv3", NUM_CLASSES, pretrained_path=path)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_mc_dropout_samples_without_touching_batchnorm(arch):
    model = build_model(arch, NUM_CLASSES)
    images = torch.randn(1, 3, 33, 41)
    buffers_before = {name: b.clone() for name, b in model.named_buffers()}

    with torch.no_grad():
        set_mc_dropout(model, True)
        stochastic = model(images), model(images)
        set_mc_dropout(model, False)
        deterministic = model(images), model(images)

    assert not torch.equal(*stochastic)
    assert torch.equal(*deterministic)
    assert all(torch.equal(b, buffers_before[name]) for name, b in model.named_buffers())
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))


SUBNORMAL_PRODUCT = """
import json, sys, threading
import torch
from pixelpick.models import subnormals_flushed
torch.set_num_threads(2)
subnormal = torch.tensor(1 << 22, dtype=torch.int32).view(torch.float32)  # 5.9e-39, made of bits, not arithmetic
survived = {}

def multiply(name):  # large enough that torch splits it over its worker threads
    survived[name] = int((torch.full((1 << 22,), 1.0) * subnormal).count_nonzero())

if sys.argv[1] == "flushed":
    with subnormals_flushed():
        multiply("inside")  # torch starts its worker threads here, and they copy the flag
        thread = threading.Thread(target=multiply, args=("a thread started inside",))
        thread.start()
        thread.join()
multiply("after")
survived["this thread after"] = float(subnormal.item() * 1.0) != 0.0  # plain Python (and numpy) floats again
print(json.dumps(survived))
"""


def test_a_step_computes_with_subnormals_flushed_and_leaves_its_thread_as_it_found_it():
    run = [sys.executable, "-c", SUBNORMAL_PRODUCT]
    flushed = json.loads(subprocess.run([*run, "flushed"], capture_output=True, text=True, check=True).stdout)
    everything = 1 << 22
    # Inside, every thread torch computes in flushes (the calling thread alone would leave about half); after, the
    # calling thread computes subnormals again.
    assert flushed["inside"] == flushed["a thread started inside"] == 0
    assert flushed["after"] > 0 and flushed["this thread after"]
    plain = json.loads(subprocess.run([*run, "plain"], capture_output=True, text=True, check=True).stdout)
    assert plain == {"after": everything, "this thread after": True}  # importing pixelpick changes nothing
