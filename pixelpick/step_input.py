"""What one step of one round is computed from: one typed, frozen value.

A step (`pixelpick.steps`, `pixelpick.labelling`) is a function of a `StepInput` and of nothing else:

- `settings`: the settings keys the step declares for its round (pixelpick/settings.py), and only those: reading any
  other, or a whole section at once, raises `UndeclaredSetting`. `keyed` names those of them that make the step's
  key (its recipe keys);
- `inputs` and `outputs`: its files, resolved; the step's key is the content of its inputs;
- `scratch`: where it may keep what is not an output (the round's probability store, a training's resume point);
- `manifest`: the round's frozen pool (`pixelpick.pools`), None before the round has one (the benchmark's dense
  reference trains on the pool as it is);
- `runtime`: the device, threads and progress bars it runs with, in no key.

The recipe builds it (`pixelpick.recipe.Step.prepare`); the step's key, the plain loop, the DVC stage, the Prefect
task, the Dask shard task and the DDP worker all run a step from it. The round's data (its pool as frozen, the
evaluation split, the image sizes) is derived from it on first use and never pickled, so the value sent to a Dask
worker or a torchrun process is small and gives that process exactly the step the recipe planned.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from pydantic_core import to_jsonable_python

from pixelpick.datasets import get_dataset
from pixelpick.datasets.base import LabelSpace, SegmentationDataset, label_space_from_record
from pixelpick.digests import tree_md5, value_digest
from pixelpick.errors import StepInputError
from pixelpick.pools import check_unchanged
from pixelpick.provenance import code_digest
from pixelpick.settings import SettingsView

if TYPE_CHECKING:
    import pandas as pd
    import torch


@dataclass(frozen=True)
class Runtime:
    """How a step runs, never what it computes. `device`: a torch device string, where not where `train.device`
    says (a process of a distributed group runs on its own GPU); `threads`: torch's intra-op threads (None:
    torch's default); `progress`: show progress bars."""

    device: str | None = None
    threads: int | None = None
    progress: bool = False

    def torch_device(self, configured: str) -> torch.device:
        """The device to run on (`configured`: the `train.device` setting), with torch's threads set."""
        import torch

        from pixelpick.training import resolve_device

        if self.threads is not None:
            torch.set_num_threads(self.threads)
        return resolve_device(self.device or configured)


@dataclass(frozen=True, eq=False)
class StepInput:
    """What one step of one round computes from (see the module's notes). Made by `recipe.Step.prepare`; its
    mappings are read-only, and `dataclasses.replace` gives a changed copy (another runtime, another output)."""

    step: str
    round_id: int
    settings: SettingsView
    keyed: tuple[str, ...]
    inputs: Mapping[str, Path]
    outputs: Mapping[str, Path]
    scratch: Mapping[str, str] = field(default_factory=dict)
    manifest: pd.DataFrame | None = None
    simulated: bool = True
    # The campaign's recipe as its record holds it: what a checkpoint carries, to say what made it. Steps never
    # compute from it.
    provenance: Mapping[str, Any] = field(default_factory=dict)
    runtime: Runtime = Runtime()

    def __post_init__(self) -> None:
        for name in ("inputs", "outputs", "scratch", "provenance"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    def __reduce__(self) -> tuple[Any, ...]:
        # Its fields alone: what was derived from them (datasets, the device) is derived again where it lands.
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return (_rebuild, (type(self), {name: dict(value) if isinstance(value, MappingProxyType) else value
                                        for name, value in values.items()}))

    # ------------------------------------------------------------------ what the outputs are a function of

    def key(self) -> str:
        """The step, the round, the values of its keyed settings, the content of its inputs and the code: equal
        keys make equal outputs. StepInputError names an input that does not exist."""
        for name, path in self.inputs.items():
            if not path.exists():
                raise StepInputError(f"{self.step} of round {self.round_id} needs {path}, which does not exist"
                                     + missing_input_hint(name))
        return value_digest({
            "step": self.step, "round": self.round_id,
            "settings": self.keyed_values(),
            "inputs": {name: tree_md5(path) for name, path in sorted(self.inputs.items())},
            "code": code_digest(),
        })

    def keyed_values(self) -> dict[str, Any]:
        """{dotted key: value} of the settings in the step's key (its DVC stage's params, its MLflow params)."""
        return {key: self.value(key) for key in self.keyed}

    def value(self, dotted: str) -> Any:
        """A declared setting's value, as plain data (as the campaign's record spells it)."""
        node: Any = self.settings
        for part in dotted.split("."):
            node = getattr(node, part)
        return to_jsonable_python(node)

    # ------------------------------------------------------------------ the round's data

    @cached_property
    def pool(self) -> SegmentationDataset:
        """The images the round draws from: its frozen pool, checked unchanged (PoolChangedError names an image
        that is not), with the round's classes."""
        dataset = get_dataset(self.settings.data, self.settings.data.train_split)
        if self.manifest is None:
            return dataset
        pool = dataset.subset(list(self.manifest["image_id"]))
        if self.label_space is not None:
            pool.label_space = self.label_space
        check_unchanged(pool, self.manifest, self.round_id, with_masks=self.simulated)
        return pool

    @cached_property
    def label_space(self) -> LabelSpace | None:
        """The classes frozen with the round's pool (campaigns whose classes come from a file); None otherwise."""
        classes = self.inputs.get("classes")
        if classes is None or not classes.is_file():  # a round not yet started has the classes as they are
            return None
        return label_space_from_record(json.loads(classes.read_text()))

    @cached_property
    def eval_set(self) -> SegmentationDataset | None:
        """The evaluation split with the round's classes, or None when the settings name none."""
        split = self.settings.data.eval_split
        if split is None:
            return None
        eval_set = get_dataset(self.settings.data, split)
        if self.label_space is not None:  # classes appended since are not this round's
            eval_set = copy.copy(eval_set)
            eval_set.label_space = self.label_space
        return eval_set

    @cached_property
    def image_sizes(self) -> dict[str, tuple[int, int]]:
        return {image_id: self.pool.image_size(image_id) for image_id in self.pool.image_ids}

    # ------------------------------------------------------------------ models

    @cached_property
    def device(self) -> torch.device:
        return self.runtime.torch_device(self.settings.train.device)

    def new_model(self) -> torch.nn.Module:
        from pixelpick.models import build_model

        m = self.settings.model
        return build_model(m.arch, self.pool.label_space.num_classes, pretrained_path=m.pretrained_path,
                           dropout_p=m.dropout_p)

    def load_model(self, path: Path) -> torch.nn.Module:
        from pixelpick.checkpoints import model_from_checkpoint, read_checkpoint

        return model_from_checkpoint(read_checkpoint(path)).to(self.device)


def _rebuild(cls: type[StepInput], values: dict[str, Any]) -> StepInput:
    return cls(**values)


def missing_input_hint(missing: str) -> str:
    """What to do about a missing input, by its name."""
    if missing == "batch":
        return ": its labels have not been collected (label the round's job, then run the human train flow)"
    if missing.startswith("previous"):
        return ": run the previous round first"
    return ""
