"""Model checkpoints that say what made them: weights, architecture, label space, settings and the snapshot digest.

A checkpoint is a plain dict saved with `torch.save` (loaded with `weights_only=True`, so no code is unpickled):

    model          the state dict (CPU tensors)
    arch, num_classes, dropout_p
    label_space    class names, colours and keys, the ignore index, the normalisation mean and std
    image_size     the working (H, W) the model was trained at, or None for native sizes
    round          the round that trained it
    snapshot_md5   the md5 of the label snapshot it was trained on
    settings       the campaign's recorded settings (paths relative to the campaign folder)
    history        per-epoch loss and learning rate

Identical trainings give identical bytes: nothing time- or place-dependent goes in (timings live in the step record).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pixelpick.datasets.base import LabelSpace, label_space_from_record, label_space_record  # noqa: F401
from pixelpick.errors import CheckpointError
from pixelpick.io import atomic_write
from pixelpick.models import build_model, grow_classifier


def save_checkpoint(path: Path, model: nn.Module, **meta: Any) -> Path:
    checkpoint = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **meta}
    # Saved through a buffer: torch names the archive after the file it writes, and the temporary file's random
    # name would make two identical trainings differ byte for byte.
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return atomic_write(path, lambda f: f.write(buffer.getvalue()))


def read_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no model at {path}: train that round first")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged or foreign file
        raise CheckpointError(f"cannot read the model {path}: {error}") from error
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "arch" not in checkpoint:
        raise CheckpointError(f"{path} is not a PixelPick checkpoint (no model weights and architecture)")
    return checkpoint


def model_from_checkpoint(checkpoint: dict[str, Any]) -> nn.Module:
    """The network a checkpoint describes, with its weights, in eval mode on the CPU."""
    model = build_model(checkpoint["arch"], checkpoint["num_classes"], dropout_p=checkpoint.get("dropout_p", 0.2))
    model.load_state_dict(checkpoint["model"])
    return model.eval()


def load_previous(model: nn.Module, checkpoint: dict[str, Any], path: Path) -> nn.Module:
    """Start `model` from a previous round's checkpoint (read from `path`). When classes were appended since, the
    model has more outputs: the old classes' weights come from the checkpoint, the new ones' stay fresh."""
    try:
        model.load_state_dict(grow_classifier(checkpoint["arch"], checkpoint["model"], model))
    except (KeyError, ValueError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot start from the model {path}: {first_line}") from None
    return model

