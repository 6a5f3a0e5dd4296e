"""DVC at the edge: commit each finished round's outputs (its label snapshot first of all) to DVC.

A Prefect run of the campaign that `dvc.yaml` describes records every round in `dvc.lock` and the DVC cache
(`dvc commit`), exactly as if `dvc repro` had produced it, so `dvc status` is clean and the snapshot is
versioned. DVC holds a repository lock, so calls are serialised with a file lock (stack-notes §4.6).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from filelock import FileLock
from prefect import get_run_logger, task

from tasks.common import file_md5, open_campaign

REPO = Path(__file__).resolve().parents[1]


def dvc_stage_name(round_id: int) -> str:
    return "initial" if round_id == 0 else f"round@r{round_id:02d}"


def run_dvc(*args: str, repo: Path = REPO) -> str:
    with FileLock(repo / ".dvc" / "tmp" / "pixelpick.lock"):
        done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def describes(settings_run_dir: Path, repo: Path = REPO) -> bool:
    """Whether this repository's dvc.yaml describes the campaign writing to `settings_run_dir`."""
    dvc_yaml = repo / "dvc.yaml"
    if not (repo / ".dvc").is_dir() or not dvc_yaml.exists():
        return False
    pipeline = yaml.safe_load(dvc_yaml.read_text())
    outs = pipeline["stages"]["initial"]["outs"]
    return any((repo / str(out)).resolve().is_relative_to(settings_run_dir.resolve()) for out in outs)


@task(retries=2, retry_delay_seconds=3)
def version_round(settings_json: str, round_id: int, model_digest: str) -> str:
    """`dvc commit` the round's stage; returns the snapshot's DVC md5, or "untracked" for an ad-hoc campaign."""
    campaign = open_campaign(settings_json)
    logger = get_run_logger()
    if not describes(campaign.run_dir):
        logger.info("campaign %s is not the one dvc.yaml describes: its files are not DVC-versioned",
                    campaign.settings.campaign.name)
        return "untracked"
    run_dvc("commit", "--force", "--quiet", dvc_stage_name(round_id))
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())
    stage = lock["stages"][dvc_stage_name(round_id)]
    snapshot = campaign.paths(round_id).snapshot.resolve()
    return next(out["md5"] for out in stage["outs"] if (REPO / out["path"]).resolve() == snapshot)


@task
def version_progress(settings_json: str) -> str:
    """Write the campaign's mIoU-against-labelled-pixels table (what `dvc plots show` draws) and commit it."""
    campaign = open_campaign(settings_json)
    path = campaign.write_progress()
    if describes(campaign.run_dir):
        run_dvc("commit", "--force", "--quiet", "progress")
    return str(path)


# --------------------------------------------------------------------------- dvc.yaml, generated from params.yaml

ROUND_PARAMS = ["data", "model", "train", "acquire", "campaign.name", "campaign.workdir",
                "campaign.initial_pixels_per_image", "campaign.error_rate", "campaign.seed"]
ROUND_OUTS = ["queries.parquet", "annotations.parquet", "labels.parquet", "model.pt"]


def pipeline(settings, repo: Path = REPO) -> dict:
    """dvc.yaml for the campaign in `settings`: the loop unrolled, each round depending on the one before."""
    rounds_dir = settings.campaign.run_dir.resolve().relative_to(repo.resolve()) / "rounds"
    progress = rounds_dir.parent / "progress.csv"

    def stage(key: str, cmd: str, deps: list[str]) -> dict:
        return {
            "cmd": cmd,
            "deps": deps + ["pixelpick"],
            "params": ROUND_PARAMS,
            "outs": [f"{rounds_dir}/{key}/{name}" for name in ROUND_OUTS],
            "metrics": [{f"{rounds_dir}/{key}/metrics.json": {"cache": False}}],
        }

    rounds = {f"r{r:02d}": {"round": r, "prev": f"r{r - 1:02d}"} for r in range(1, settings.campaign.rounds + 1)}
    stages = {"initial": stage("r00", "python -m pixelpick round 0", [])}
    if rounds:
        looped = stage("${key}", "python -m pixelpick round ${item.round}",
                       [f"{rounds_dir}/${{item.prev}}/labels.parquet", f"{rounds_dir}/${{item.prev}}/model.pt"])
        stages["round"] = {"foreach": rounds, "do": looped}
    last = f"r{settings.campaign.rounds:02d}"
    stages["progress"] = {
        "cmd": "python -m pixelpick progress",
        "deps": [f"{rounds_dir}/r{r:02d}/metrics.json" for r in range(settings.campaign.rounds + 1)],
        "outs": [{str(progress): {"cache": False}}],
    }
    return {
        "stages": stages,
        "plots": [{str(progress): {"x": "labelled_pixels", "y": "miou", "title": f"mIoU ({last} is the last round)"}}],
    }


class _PlainDumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # write repeated lists out in full: dvc.yaml is read by people
        return True


def render_pipeline(settings, repo: Path = REPO) -> str:
    header = "# Generated from params.yaml by `python -m tasks.versioning`; regenerate after changing campaign.rounds.\n"
    return header + yaml.dump(pipeline(settings, repo), Dumper=_PlainDumper, sort_keys=False)


if __name__ == "__main__":
    from pixelpick.settings import load_settings

    (REPO / "dvc.yaml").write_text(render_pipeline(load_settings(REPO / "params.yaml")))
    print("wrote", REPO / "dvc.yaml")


@task(retries=2, retry_delay_seconds=3)
def track_label_batch(batch_path: str) -> str:
    """`dvc add` a human label batch, so the labels enter the pipeline as a versioned input; returns its md5."""
    path = Path(batch_path).resolve()
    if (REPO / ".dvc").is_dir() and path.is_relative_to(REPO):
        run_dvc("add", "--quiet", str(path.relative_to(REPO)))
    else:
        get_run_logger().info("%s is outside this DVC repository: not tracked", path)
    return file_md5(path)
