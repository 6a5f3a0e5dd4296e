"""DVC at the edge: each campaign's pipeline, and the records of what ran.

Every versioned campaign folder holds the same `dvc.yaml`, a copy of `tasks/campaign-pipeline.yaml`: each step of
a round as a DVC stage, templated over the rounds (`foreach`), named `<step>@rNN`. Beside it, two files written
from the recipe fill it in: `pipeline-rounds.yaml` lists the rounds each stage runs for and the files each one
reads and writes (the recipe's inputs and outputs, in the template's slots), and `step-settings.yaml` holds the
values of the settings each step reads, one section per stage, which DVC tracks as the stage's params (the
template's `settings` stage derives it again from `params.yaml` when that is edited). So `dvc repro` runs the same
steps on the same declared inputs as a Prefect run, and a Prefect run commits each finished round to `dvc.lock`
(`dvc commit`): `dvc status` is then clean and `dvc.lock` describes exactly what ran.

Human rounds enter the pipeline once their batch exists: the batch is `dvc add`ed (`labels/rNN.parquet.dvc`), and
the round's ingest stage depends on it, so `dvc repro` reproduces a human round from its versioned labels; its
query, once the job was exported, is a frozen stage (`asked`): what people were asked about is never recomputed.
A campaign whose folder git ignores is not versioned (DVC keeps no pipeline or lock in an ignored folder): the
bundled demo's folder is ignored, because its results depend on the machine that made them, so `make run` leaves
the work tree as it found it. DVC holds a repository lock, so every call here is serialised through one file lock.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml
from filelock import FileLock
from prefect import task

from pixelpick.campaign import Campaign
from pixelpick.errors import PixelPickError
from pixelpick.io import atomic_write
from pixelpick.layout import round_name
from pixelpick.provenance import PACKAGE
from pixelpick.recipe import QUERY, Step, is_history, round_steps, settings_values

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).with_name("campaign-pipeline.yaml")
SETTINGS_STAGE = "settings"
POOL_STAGE = "pool"
HISTORY_STAGE = "asked"  # a human round's query once its job was exported


class VersioningError(PixelPickError):
    """DVC refused an operation; the message is DVC's own."""


def stage_group(campaign: Campaign, step: Step, round_id: int) -> str:
    """The template's stage that runs `step` in the round: the step's own, or `asked` for history."""
    return HISTORY_STAGE if is_history(campaign, step, round_id) else step.name


def stage_name(group: str, round_id: int) -> str:
    return f"{group}@{round_name(round_id)}"


def template_slots() -> dict[str, list[str]]:
    """The files each templated stage names (`${item.<slot>}`), deps first, as tasks/campaign-pipeline.yaml
    declares them."""
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


def round_index(campaign: Campaign) -> dict[str, dict[str, dict]]:
    """pipeline-rounds.yaml, as data: for each templated stage, the rounds it runs for, each with the round number
    and the files in the stage's slots (paths relative to the campaign). A slot the round has no file for (round 0
    has no previous model) repeats the stage's first, always present, input."""
    here = campaign.layout.dir

    def relative(path: Path) -> str:
        return Path(os.path.relpath(path, here)).as_posix()

    # The code is a dependency where DVC can hash it like the rest of the project (its .dvcignore leaves byte-code
    # out); code installed elsewhere is still part of every step key (`pixelpick.provenance`).
    root = find_dvc_root(here)
    code = {"code": PACKAGE} if root is not None and PACKAGE.is_relative_to(root) else {}
    slots = template_slots()
    index: dict[str, dict[str, dict]] = {group: {} for group in slots}
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
    return {f"{step.name}@{round_name(round_id)}": settings_values(campaign, step.settings(campaign, round_id))
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


def write_pipeline(campaign: Campaign) -> Path | None:
    """(Re)write the campaign's pipeline: dvc.yaml (the template), the rounds it lists, the settings its stages
    read, and the .gitignore that keeps the rounds' files out of git. Unchanged content leaves a file untouched.
    None when no DVC repository versions the campaign."""
    if versioning_root(campaign) is None:
        return None
    layout = campaign.layout
    _write_changed(layout.gitignore, CAMPAIGN_GITIGNORE)
    rounds = {"rounds": round_index(campaign)}
    _write_changed(layout.pipeline_rounds, _dumped(rounds, "The rounds dvc.yaml lists and each one's files, written "
                                                   "from the recipe (`pixelpick pipeline`); do not edit."))
    write_step_settings(campaign)
    _write_changed(layout.pipeline, TEMPLATE.read_text())
    return layout.pipeline


def run_dvc(root: Path, *args: str) -> str:
    """Run a DVC command in the repository at `root`, one at a time; VersioningError with DVC's own message."""
    (root / ".dvc" / "tmp").mkdir(parents=True, exist_ok=True)
    with FileLock(root / ".dvc" / "tmp" / "pixelpick.lock"):
        done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        message = (done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}").splitlines()
        raise VersioningError(f"dvc {args[0]} failed: {' '.join(line.strip() for line in message[-3:])}")
    return done.stdout


def stage_records(campaign: Campaign, root: Path) -> None:
    """`git add` the campaign's records (settings, pipeline, lock, progress, the batches' .dvc files), so that
    `git status` shows them ready to commit, as DVC's autostage does for the files DVC itself writes. Outside a git
    work tree nothing happens."""
    present = [os.path.relpath(path, root) for path in campaign.layout.records()]
    done = subprocess.run(["git", "add", "--", *present], cwd=root, capture_output=True, text=True)
    quiet = ("not a git repository", "ignored by one of your .gitignore files")  # no git, or a record a user ignores
    if done.returncode != 0 and not any(reason in done.stderr for reason in quiet):  # written whatever git says
        log.warning("could not stage campaign %s's records in git: %s", campaign.name, done.stderr.strip())


def commit_stages(campaign: Campaign, stage_names: list[str]) -> dict[str, str]:
    """Record the named stages' current deps, params and outs in dvc.lock (`dvc commit --force`); returns the md5
    of each committed output by path (relative to the campaign). Nothing happens outside a DVC repository."""
    root = versioning_root(campaign)
    if root is None:
        return {}
    write_pipeline(campaign)
    pipeline_file = os.path.relpath(campaign.layout.pipeline, root)
    run_dvc(root, "commit", "--force", "--quiet", *(f"{pipeline_file}:{name}" for name in stage_names))
    stage_records(campaign, root)
    lock = yaml.safe_load(campaign.layout.pipeline_lock.read_text())["stages"]
    return {out["path"]: out["md5"] for name in stage_names for out in lock.get(name, {}).get("outs", [])}


def commit_round(campaign: Campaign, round_id: int) -> dict[str, str]:
    """Commit every stage of a finished round."""
    groups = [POOL_STAGE, *(stage_group(campaign, step, round_id) for step in round_steps(campaign))]
    return commit_stages(campaign, [SETTINGS_STAGE, *(stage_name(group, round_id) for group in groups)])


def track_batch(campaign: Campaign, round_id: int) -> str | None:
    """`dvc add` a human round's batch (a versioned input of the round's ingest stage); returns its md5."""
    root = versioning_root(campaign)
    if root is None:
        return None
    batch = campaign.layout.batch(round_id)
    run_dvc(root, "add", "--quiet", os.path.relpath(batch, root))
    stage_records(campaign, root)
    return yaml.safe_load(batch.with_name(batch.name + ".dvc").read_text())["outs"][0]["md5"]


@task(retries=2, retry_delay_seconds=3, task_run_name="version-r{round_id:02d}")
def version_round(campaign_dir: str, round_id: int) -> dict[str, str]:
    """Commit a finished round to the campaign's dvc.lock (retried: DVC's repository lock may be busy)."""
    from tasks.steps import open_for_task

    return commit_round(open_for_task(campaign_dir), round_id)


@task(retries=2, retry_delay_seconds=3, task_run_name="version-query-r{round_id:02d}")
def version_query(campaign_dir: str, round_id: int) -> dict[str, str]:
    """Commit a human round's query stage (the rest of the round waits for its labels)."""
    from tasks.steps import open_for_task

    campaign = open_for_task(campaign_dir)
    query = stage_name(stage_group(campaign, QUERY, round_id), round_id)
    return commit_stages(campaign, [SETTINGS_STAGE, stage_name(POOL_STAGE, round_id), query])
