"""Keyboard bindings: one key per class (from the dataset, remappable) plus fixed navigation keys.

Navigation keys are chosen so they never collide with the letters and digits a classes file uses; a binding that
collides anyway (a class bound to '-', two classes on one key) is rejected before the annotator starts, naming both.
Keys are compared case-insensitively, as the annotator page matches them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from pixelpick.annotation.jobs import JobClass
from pixelpick.errors import KeyBindingError

# KeyboardEvent.key value -> what it does. The page (static/annotator.js) implements exactly these.
NAVIGATION_KEYS: dict[str, str] = {
    " ": "unsure / void",
    "Backspace": "undo the last label",
    "ArrowLeft": "back: review the previous label (press a class key to change it)",
    "ArrowRight": "forward while reviewing",
    "Escape": "stop reviewing",
    "Enter": "skip the rest of this image",
    # Not a printable character, so no class key can collide with it.
    "Tab": "accept the model's suggestion (highlighted in the legend)",
    "+": "zoom in",
    "=": "zoom in",
    "-": "zoom out",
}


def resolve_key_bindings(classes: Sequence[JobClass], overrides: Mapping[str, str] | None = None) -> list[str]:
    """The key of every class, in class id order: the job's keys with `overrides` (class name -> key) applied.

    Raises KeyBindingError for an override naming an unknown class, a key that is not one printable character,
    or a key that collides with another class's key or with a navigation key.
    """
    overrides = dict(overrides or {})
    names = [info.name for info in classes]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise KeyBindingError(f"key remapping names unknown classes {unknown}; the classes are {names}")
    keys = [overrides.get(info.name, info.key) for info in classes]
    owner: dict[str, str] = {}
    for name, key in zip(names, keys, strict=True):
        if len(key) != 1 or not key.isprintable() or key.isspace():
            raise KeyBindingError(f"key {key!r} of class {name!r} must be a single printable, non-space character")
        if key in NAVIGATION_KEYS or key.lower() in NAVIGATION_KEYS:
            raise KeyBindingError(
                f"key {key!r} of class {name!r} collides with the navigation key {key!r} ({NAVIGATION_KEYS[key]})"
            )
        if key.lower() in owner:
            raise KeyBindingError(f"key {key!r} of class {name!r} collides with class {owner[key.lower()]!r}")
        owner[key.lower()] = name
    return keys


def parse_key_overrides(spec: str) -> dict[str, str]:
    """Read `--keys`: either `sky=q,road=r` or the path of a YAML file mapping class names to keys."""
    if spec.endswith((".yaml", ".yml")) or Path(spec).is_file():
        return _read_key_file(Path(spec))
    overrides: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, key = item.partition("=")
        if not sep or not name.strip():
            raise KeyBindingError(f"key remapping {item!r} must look like class=key, e.g. sky=q")
        overrides[name.strip()] = key.strip()
    return overrides


def _read_key_file(path: Path) -> dict[str, str]:
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise KeyBindingError(f"cannot read key file {path}: {error}") from error
    if not isinstance(document, dict) or not all(
        isinstance(name, str) and isinstance(key, str) for name, key in document.items()
    ):
        raise KeyBindingError(f"key file {path} must map class names to keys, e.g. `sky: q`")
    return document
