"""A campaign's label space may grow, never silently change.

Labels, models, probability stores and jobs all hold class ids, and annotators' hands know the keys. So once a
round has used a class, that class keeps its id, its name and its key for the rest of the campaign, and the
ignore index stays what void labels were stored as. A class appended at the end of the classes file is a new id:
earlier labels stay valid, the next model gets one more output (its other outputs start from the previous model's,
see `models.grow_classifier`), and the next job shows its key. Removing, renaming or reordering a class, or giving
its key to another class, is refused in one line, naming the file, the class and the rounds that used it, before
anything is written.

The campaign records the classes it has used in `<campaign>/label_space.json`:

    {"ignore_index": 255,
     "classes": [{"name": "background", "key": "b", "since_round": 0}, ...]}

`since_round` is the first round whose model has the class. Classes no round has used yet (appended after the
last round that ran) may still be changed freely: nothing holds their ids. Only folder datasets have a classes
file a user edits; every other dataset's label space is fixed by the code that reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pixelpick.datasets.base import LabelSpace
from pixelpick.datasets.folder import find_classes_file, load_classes_file
from pixelpick.errors import LabelSpaceError
from pixelpick.io import write_json
from pixelpick.layout import CampaignLayout


def record_path(layout: CampaignLayout) -> Path:
    return layout.label_space


def check_label_space(settings: Any, layout: CampaignLayout) -> None:
    """Refuse (LabelSpaceError, one line) a classes file that no longer extends the classes the campaign's rounds
    used; record the classes, appended ones included, when it does. Nothing is written when it refuses."""
    if settings.data.dataset != "folder":
        return
    classes_file = Path(settings.data.classes_file) if settings.data.classes_file else \
        find_classes_file(Path(settings.data.root))
    current = load_classes_file(classes_file)
    path = record_path(layout)
    recorded = read_record(path) if path.is_file() else _from_history(layout)
    used_rounds = _rounds_with_outputs(layout)
    used = [] if recorded is None else [c for c in recorded["classes"]
                                        if any(r >= c["since_round"] for r in used_rounds)]
    if used:
        _refuse_changes(_shown(classes_file), current, recorded["ignore_index"], used, used_rounds)
    trained = [r for r in used_rounds if layout.round(r).model.is_file()]
    next_round = max(trained) + 1 if trained else 0
    record = {"ignore_index": current.ignore_index,
              "classes": used + [{"name": c.name, "key": c.key, "since_round": next_round}
                                 for c in current.classes[len(used):]]}
    if record != recorded or not path.is_file():  # unchanged, nothing is written: a no-op run stays one
        write_json(record, path)


def read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
        classes = [{"name": str(c["name"]), "key": str(c["key"]), "since_round": int(c["since_round"])}
                   for c in record["classes"]]
        return {"ignore_index": int(record["ignore_index"]), "classes": classes}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise LabelSpaceError(f"{path}: not a readable label space record ({error}); restore it from git") from None


def _refuse_changes(classes_file: Path, current: LabelSpace, ignore_index: int, used: list[dict[str, Any]],
                    used_rounds: list[int]) -> None:
    names = [c.name for c in current.classes]
    recorded_names = {c["name"] for c in used}
    advice = "classes may only be appended at the end (restore the file, or start a new campaign)"

    def rounds_of(entry: dict[str, Any]) -> str:
        return _rounds_text([r for r in used_rounds if r >= entry["since_round"]])

    for class_id, entry in enumerate(used):
        name, key, rounds = entry["name"], entry["key"], rounds_of(entry)
        what = f"{classes_file}: class {name!r} (id {class_id})"
        if name not in names:
            now = names[class_id] if class_id < len(names) else None
            if now is not None and now not in recorded_names:
                raise LabelSpaceError(f"{what} was renamed to {now!r}, but {rounds} used it as {name!r}; "
                                      f"{advice}")
            raise LabelSpaceError(f"{what} was removed, but {rounds} used it; {advice}")
        if names.index(name) != class_id:
            raise LabelSpaceError(f"{what} was moved to id {names.index(name)}, but {rounds} used it as id "
                                  f"{class_id}; {advice}")
        now_key = current.classes[class_id].key
        if now_key.lower() != key.lower():
            holder = next((i for i, c in enumerate(current.classes) if c.key.lower() == key.lower()), None)
            if holder is not None:
                raise LabelSpaceError(f"{classes_file}: class {names[holder]!r} (id {holder}) was given key {key!r}, "
                                      f"which {rounds} used for class {name!r} (id {class_id}); {advice}")
            raise LabelSpaceError(f"{what} changed its key from {key!r} to {now_key!r}, but {rounds} used it "
                                  f"with {key!r}; {advice}")
    if current.ignore_index != ignore_index:
        raise LabelSpaceError(f"{classes_file}: ignore_index changed from {ignore_index} to {current.ignore_index}, "
                              f"but {_rounds_text(used_rounds)} stored void labels as {ignore_index}; {advice}")


def _shown(path: Path) -> Path:
    """The path as the user would type it: relative to the working directory when it lies under it."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


def _rounds_with_outputs(layout: CampaignLayout) -> list[int]:
    """The rounds that have used the label space: each has queried (its job is made from the classes) or
    trained (its model has one output per class)."""
    return [r for r in layout.rounds_present()
            if layout.round(r).queries.is_file() or layout.round(r).model.is_file()]


def _from_history(layout: CampaignLayout) -> dict[str, Any] | None:
    """The record of a campaign started before campaigns recorded their classes: from its rounds' jobs, each
    class since the first round whose job lists it. None when no round left a job."""
    spaces: dict[int, tuple[list[tuple[str, str]], int]] = {}
    for round_id in layout.rounds_present():
        job = layout.round(round_id).job
        if job.is_file():
            try:
                document = json.loads(job.read_text())
                spaces[round_id] = ([(c["name"], c["key"]) for c in document["classes"]],
                                    int(document["ignore_index"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue
    if not spaces:
        return None
    latest, ignore_index = spaces[max(spaces)]
    classes = []
    for class_id, (name, key) in enumerate(latest):
        since = min((r for r, (space, _) in spaces.items() if len(space) > class_id), default=0)
        classes.append({"name": name, "key": key, "since_round": since})
    return {"ignore_index": ignore_index, "classes": classes}


def _rounds_text(rounds: list[int]) -> str:
    """'round 0', 'rounds 0-1', 'rounds 0-2, 4'."""
    if not rounds:
        return "no round"
    runs: list[list[int]] = []
    for r in sorted(rounds):
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    return f"round {text}" if len(rounds) == 1 else f"rounds {text}"
