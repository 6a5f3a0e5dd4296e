"""DVC at the edge: each campaign's pipeline file, generated from the recipe, and the records of what ran.

Every campaign folder gets a `dvc.yaml` with one stage per step of each round, named `<step>-rNN`, built from the
recipe's declaration: `cmd` runs the step (`pixelpick step <step> --round N`, in the campaign folder), `deps` are
the step's inputs (dataset files, the previous snapshot and model, the round's batch), `params` the settings keys
it reads from the campaign's `params.yaml`, `outs` its outputs. So `dvc repro` runs the same steps on the same
declared inputs as a Prefect run, and a Prefect run commits each finished round to `dvc.lock` (`dvc commit`):
`dvc status` is then clean and `dvc.lock` describes exactly what ran.

Human rounds enter the pipeline once their batch exists: the batch is `dvc add`ed (`labels/rNN.parquet.dvc`), and
the round's ingest stage depends on it, so `dvc repro` reproduces a human round from its versioned labels.
A campaign whose folder git ignores is not versioned (DVC keeps no pipeline or lock in an ignored folder): the
bundled demo's folder is ignored, because its results depend on the machine that made them, so `make run` leaves
the work tree as it found it. DVC holds a repository lock, so every call here is serialised through one file lock.
"""

from __future__ import annotations

import logging
import os
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
from pixelpick.recipe import Step, is_history, round_steps

log = logging.getLogger(__name__)

STEP_COMMAND = "pixelpick step {step} --round {round}"
# DVC deletes a stage's outputs right before running its command, and the command is what takes the campaign's
# lock: a `dvc repro` beside a running campaign would delete that campaign's files before being refused. Outputs
# DVC keeps (`persist`) leave every write to the step, which replaces its outputs atomically and redoes itself
# when they are not what its record says; so a refused stage changes nothing. (This also keeps DVC's run-cache
# from restoring outputs behind the lock's back: DVC never restores persistent outputs from it.)
KEPT = {"persist": True}
PROGRESS_STAGE = "progress"
POOL_STAGE = "pool"


class VersioningError(PixelPickError):
    """DVC refused an operation; the message is DVC's own."""


def stage_name(step: str, round_id: int) -> str:
    return f"{step}-{round_name(round_id)}"


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
    """The DVC repository that versions the campaign, or None (with a warning saying why) when none does: the
    folder is outside any DVC repository, or git ignores it."""
    folder = campaign.layout.dir
    root = find_dvc_root(folder)
    if root is None:
        log.warning("campaign %s is outside any DVC repository: its rounds are not versioned", campaign.name)
    elif is_git_ignored(root, folder):
        log.warning("campaign %s's folder is ignored by git: its rounds are not versioned", campaign.name)
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


def pool_stage(campaign: Campaign, round_id: int, relative) -> dict:
    """The stage that freezes a round's pool when the round starts (`Campaign.freeze_pool`). Its outputs are
    history: kept (`persist`), in git (not DVC's cache), never rewritten once there. It depends on the previous
    round's model only so that DVC starts it after that round, when the round it opens starts."""
    frozen = [campaign.layout.pool(round_id)]
    if getattr(campaign.pool, "classes_file", None):
        frozen.append(campaign.layout.pool_classes(round_id))
    previous = [relative(campaign.files(round_id - 1).model)] if round_id > 0 else []
    return {"cmd": STEP_COMMAND.format(step=POOL_STAGE, round=round_id), **({"deps": previous} if previous else {}),
            "outs": [{relative(path): {"persist": True, "cache": False}} for path in frozen]}


def pipeline(campaign: Campaign) -> dict:
    """The campaign's dvc.yaml, as data."""
    here = campaign.layout.dir

    def relative(path: Path) -> str:
        return Path(os.path.relpath(path, here)).as_posix()

    # The code is a dependency where DVC can hash it like the rest of the project (its .dvcignore leaves byte-code
    # out); code installed elsewhere is still part of every step key (`pixelpick.provenance`).
    root = find_dvc_root(here)
    code_inside = root is not None and PACKAGE.is_relative_to(root)
    stages: dict[str, dict] = {}
    evaluated = []  # the metrics of evaluated rounds, which the progress stage reads
    for round_id, steps in pipeline_rounds(campaign):
        stages[stage_name(POOL_STAGE, round_id)] = pool_stage(campaign, round_id, relative)
        for step in steps:
            history = is_history(campaign, step, round_id)
            code = [relative(PACKAGE)] if code_inside and not history else []  # the code a derived stage runs
            stage = {
                "cmd": STEP_COMMAND.format(step=step.name, round=round_id),
                **({"frozen": True} if history else {}),  # never reproduced: what people were asked about
                "deps": [relative(p) for _, p in sorted(step.inputs(campaign, round_id).items())] + code,
                "params": list(step.settings(campaign, round_id)),
            }
            outputs = [relative(p) for p in step.outputs(campaign, round_id).values()]
            if step.metrics:
                stage["metrics"] = [{path: {"cache": False, **KEPT}} for path in outputs]
                evaluated.extend(p for p, f in zip(outputs, step.outputs(campaign, round_id).values()) if f.is_file())
            else:
                stage["outs"] = [{path: KEPT} for path in outputs]
            stages[stage_name(step.name, round_id)] = stage
    layout = campaign.layout
    stages[PROGRESS_STAGE] = {
        "cmd": f"pixelpick step {PROGRESS_STAGE}",
        "deps": evaluated,
        "outs": [{relative(path): {"cache": False, **KEPT}} for path in (layout.progress_table, layout.progress_plot)],
    }
    return {"stages": stages, "plots": [relative(layout.progress_plot)]}


class _PlainDumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # repeated lists are written out in full: people read dvc.yaml
        return True


# What git leaves out of a campaign folder: its rounds' files (DVC versions those that matter) and scratch files.
CAMPAIGN_GITIGNORE = "/rounds/\n/.lock\n/labels/*.parquet\n/labels/.*\n"


def write_pipeline(campaign: Campaign) -> Path | None:
    """(Re)write the campaign's dvc.yaml from the recipe, and the .gitignore that keeps its rounds' files out of
    git; unchanged content leaves a file untouched. None when no DVC repository versions the campaign."""
    if versioning_root(campaign) is None:
        return None
    gitignore = campaign.layout.gitignore
    if not gitignore.is_file() or gitignore.read_text() != CAMPAIGN_GITIGNORE:
        atomic_write(gitignore, lambda f: f.write(CAMPAIGN_GITIGNORE.encode()))
    header = (f"# The pipeline of campaign {campaign.name}: one stage per step of each round, generated from the\n"
              "# recipe (pixelpick.recipe) by `pixelpick pipeline`; do not edit by hand.\n")
    text = header + yaml.dump(pipeline(campaign), Dumper=_PlainDumper, sort_keys=False)
    path = campaign.layout.pipeline
    if not path.is_file() or path.read_text() != text:
        atomic_write(path, lambda f: f.write(text.encode()))
    return path


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
    """Commit every stage of a finished round, and the progress stage."""
    names = [stage_name(name, round_id) for name in (POOL_STAGE, *(step.name for step in round_steps(campaign)))]
    return commit_stages(campaign, names + [PROGRESS_STAGE])


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

    return commit_stages(open_for_task(campaign_dir), [stage_name(POOL_STAGE, round_id), stage_name("query", round_id)])
