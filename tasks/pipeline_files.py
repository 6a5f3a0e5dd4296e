"""A campaign's DVC pipeline files: the template (the repository's top-level `dvc.yaml`), and the two files written
from the recipe that fill it in.

The template declares each step of a round as a DVC stage, templated over the rounds (`foreach`), named
`<step>@rNN`, run in the campaign's folder (`wdir`). `pipeline-rounds.yaml`, beside the `dvc.yaml` it fills in,
names that folder and lists the rounds each stage runs for and the files each one reads and writes (the recipe's
inputs and outputs, in the template's slots). `step-settings.yaml`, in the campaign's folder, holds the values of
the settings each step reads, one section per stage, which DVC tracks as the stage's params (the template's
`settings` stage derives it again from `params.yaml` when that is edited, so this module imports neither Prefect
nor DVC: the stage starts quickly).

Where a campaign's pipeline lives:
- a versioned campaign holds a copy of the template as its own `dvc.yaml`, with its rounds file beside it;
- a campaign whose folder git ignores (the bundled demo: its results depend on the machine that made them, so
  `make run` leaves the work tree as it found it) is not versioned by the flows, since DVC keeps no pipeline or lock
  in an ignored folder. `pixelpick pipeline` points the top-level `dvc.yaml` at it instead, through the top-level
  `pipeline-rounds.yaml`, which lists no rounds as committed.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from functools import cache
from pathlib import Path

import yaml

from pixelpick.campaign import Campaign
from pixelpick.errors import PixelPickError
from pixelpick.io import atomic_write
from pixelpick.layout import round_name
from pixelpick.provenance import PACKAGE
from pixelpick.recipe import Step, is_history, round_steps

log = logging.getLogger(__name__)

# A link to the repository's top-level dvc.yaml, so that an installed package has the template too.
TEMPLATE = Path(__file__).with_name("campaign-pipeline.yaml").resolve()
SETTINGS_STAGE = "settings@all"  # one stage for the whole campaign
POOL_STAGE = "pool"
HISTORY_STAGE = "asked"  # a human round's query once its job was exported


class VersioningError(PixelPickError):
    """DVC refused an operation; the message is DVC's own."""


def stage_group(campaign: Campaign, step: Step, round_id: int) -> str:
    """The template's stage that runs `step` in the round: the step's own, or `asked` for history."""
    return HISTORY_STAGE if is_history(campaign, step, round_id) else step.name


def stage_name(group: str, round_id: int) -> str:
    return f"{group}@{round_name(round_id)}"


@cache
def template_slots() -> dict[str, list[str]]:
    """The files each templated stage names (`${item.<slot>}`), deps first, as the template declares them."""
    stages = yaml.safe_load(TEMPLATE.read_text())["stages"]
    return {group: list(dict.fromkeys(re.findall(r"\$\{item\.(\w+)\}", yaml.safe_dump(
                {k: v for k, v in stage["do"].items() if k != "cmd"}, sort_keys=False))))
            for group, stage in stages.items() if "foreach" in stage}


def find_dvc_root(path: Path) -> Path | None:
    """The DVC repository holding `path`, or None when it is in none."""
    for folder in (path, *path.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return None


def is_git_ignored(root: Path, folder: Path) -> bool:
    """Whether git ignores `folder`, in the work tree at `root` (False outside a git work tree, or without git)."""
    try:
        done = subprocess.run(["git", "check-ignore", "--quiet", "--", f"{os.path.relpath(folder, root)}/"],
                              cwd=root, capture_output=True)
    except FileNotFoundError:  # no git on this machine
        return False
    return done.returncode == 0


def versioning_root(campaign: Campaign) -> Path | None:
    """The DVC repository that versions the campaign, or None (with a log line saying why) when none does: the
    folder is outside any DVC repository, or git ignores it."""
    folder = campaign.layout.dir
    root = find_dvc_root(folder)
    if root is None:
        log.warning("campaign %s is outside any DVC repository: its rounds are not versioned", campaign.name)
    elif is_git_ignored(root, folder):
        # Info, not a warning: ignoring a folder is how a campaign (the bundled demo) is kept out of versioning.
        log.info("campaign %s's folder is ignored by git: its rounds are not versioned", campaign.name)
        return None
    return root


def pipeline_rounds(campaign: Campaign) -> list[tuple[int, list[Step]]]:
    """The rounds (and their steps) the pipeline lists: every planned round of a simulated campaign; for a human
    campaign, the rounds that have started, with the steps after `query` once the round's batch exists."""
    if campaign.simulated:
        return [(r, round_steps(campaign)) for r in range(campaign.settings.campaign.rounds + 1)]
    listed = []
    for r in campaign.layout.rounds_present():
        chosen = round_steps(campaign) if campaign.layout.batch(r).is_file() else round_steps(campaign)[:1]
        listed.append((r, chosen))
    return listed


def round_index(campaign: Campaign, root: Path) -> dict[str, dict[str, dict]]:
    """The rounds of pipeline-rounds.yaml, as data: for each templated stage, the rounds it runs for, each with the
    round number and the files in the stage's slots (paths relative to the campaign). A slot the round has no file
    for (round 0 has no previous model) repeats the stage's first, always present, input. `root`: the DVC
    repository."""
    here = campaign.layout.dir

    def relative(path: Path) -> str:
        return Path(os.path.relpath(path, here)).as_posix()

    # The code is a dependency where DVC can hash it like the rest of the project (its .dvcignore leaves byte-code
    # out); code installed elsewhere is still part of every step key (`pixelpick.provenance`).
    code = {"code": PACKAGE} if PACKAGE.is_relative_to(root) else {}
    slots = template_slots()
    index: dict[str, dict[str, dict]] = {group: {} for group in slots}
    group, _, key = SETTINGS_STAGE.partition("@")
    index[group][key] = {}
    for round_id, steps in pipeline_rounds(campaign):
        key = round_name(round_id)
        index[POOL_STAGE][key] = {"round": round_id, "pool": relative(campaign.layout.pool(round_id))}
        for step in steps:
            group = stage_group(campaign, step, round_id)
            files = {**step.inputs(campaign, round_id), **step.outputs(campaign, round_id)}
            unplaced = sorted(set(files) - set(slots[group]))
            if unplaced:
                raise VersioningError(f"the pipeline template has no slot for {step.name}'s {', '.join(unplaced)}: "
                                      f"add it to the {group} stage of {TEMPLATE}")
            files = {**code, **files}
            first = files[slots[group][0]]
            index[group][key] = {"round": round_id, **{slot: relative(files.get(slot, first)) for slot in slots[group]}}
    return index


def step_settings(campaign: Campaign) -> dict[str, dict]:
    """step-settings.yaml, as data: the values of the settings each listed stage's step reads, by stage."""
    return {f"{step.name}@{round_name(round_id)}": step.prepare(campaign, round_id).keyed_values()
            for round_id, steps in pipeline_rounds(campaign) for step in steps}


class _PlainDumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # repeated values are written out in full: people read these files
        return True


def _write_changed(path: Path, text: str) -> None:
    """Write `text` to `path` atomically, unless it holds exactly that already (a file left alone keeps its time)."""
    if not path.is_file() or path.read_text() != text:
        atomic_write(path, lambda f: f.write(text.encode()))


def _dumped(data: dict, what: str) -> str:
    return f"# {what}\n" + yaml.dump(data, Dumper=_PlainDumper, sort_keys=False)


def write_step_settings(campaign: Campaign) -> Path:
    """(Re)write step-settings.yaml from the campaign's params.yaml (the `settings` stage)."""
    path = campaign.layout.step_settings
    _write_changed(path, _dumped(step_settings(campaign), "The values of the settings each stage's step reads, derived "
                                 "from params.yaml (`pixelpick step settings`); do not edit."))
    return path


# What git leaves out of a campaign folder: its rounds' files (DVC versions those that matter) and scratch files.
CAMPAIGN_GITIGNORE = "/rounds/\n/.lock\n/labels/*.parquet\n/labels/.*\n"


def write_pipeline(campaign: Campaign, root: Path | None = None) -> Path | None:
    """(Re)write a versioned campaign's own pipeline: dvc.yaml (the template), the rounds it lists, the settings its
    stages read, and the .gitignore that keeps the rounds' files out of git. Unchanged content leaves a file
    untouched. `root` is the repository that versions the campaign, when the caller has found it already; None is
    returned when none does."""
    root = root or versioning_root(campaign)
    if root is None:
        return None
    layout = campaign.layout
    _write_changed(layout.gitignore, CAMPAIGN_GITIGNORE)
    _write_rounds(campaign, layout.pipeline_rounds, root)
    _write_changed(layout.pipeline, TEMPLATE.read_text())
    return layout.pipeline


def drive_from_top_level(campaign: Campaign, root: Path) -> Path:
    """Point the repository's top-level dvc.yaml at a campaign whose folder git ignores: the rounds file beside it
    names the campaign, and the campaign's folder gets its step settings. A top-level dvc.yaml other than the
    template is the project's own, and is never overwritten."""
    pipeline = root / campaign.layout.pipeline.name
    if pipeline.is_file() and pipeline.read_text() != TEMPLATE.read_text():
        raise VersioningError(f"{pipeline} is not PixelPick's pipeline, so it cannot drive campaign "
                              f"{campaign.name!r}, whose folder git ignores: stop ignoring the folder to give the "
                              "campaign a pipeline of its own")
    _write_rounds(campaign, root / campaign.layout.pipeline_rounds.name, root)
    _write_changed(pipeline, TEMPLATE.read_text())
    return pipeline


def write_runnable_pipeline(campaign: Campaign) -> Path | None:
    """(Re)write the pipeline `dvc repro` runs the campaign with, and return it: the campaign's own, or the
    top-level one for a campaign whose folder git ignores. None outside any DVC repository."""
    root = find_dvc_root(campaign.layout.dir)
    if root is None:
        return None
    if is_git_ignored(root, campaign.layout.dir):
        return drive_from_top_level(campaign, root)
    return write_pipeline(campaign, root)


def _write_rounds(campaign: Campaign, rounds_file: Path, root: Path) -> None:
    """The rounds file (beside the dvc.yaml it fills in), and the campaign's step settings."""
    rounds = {"folder": Path(os.path.relpath(campaign.layout.dir, rounds_file.parent)).as_posix(),
              "rounds": round_index(campaign, root)}
    _write_changed(rounds_file, _dumped(rounds, "The campaign folder dvc.yaml runs in, and the rounds it lists with "
                                        "each one's files, written from the recipe (`pixelpick pipeline`); do not "
                                        "edit."))
    write_step_settings(campaign)
