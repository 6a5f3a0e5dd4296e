"""The label-efficiency benchmark as Prefect tasks: run one planned run, log it to MLflow, write the report.

Runs resume from their own files (`pixelpick.benchmark`), so these tasks need no Prefect cache: a re-run benchmark
re-enters every task and each returns at once for what already finished.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from mlflow import MlflowClient
from prefect import task
from prefect.artifacts import create_markdown_artifact

from pixelpick.benchmark import STAGES, BenchmarkPreset, RunSpec, read_rows, run_benchmark_run
from pixelpick.benchmark_report import results_frame, write_report
from pixelpick.digests import file_md5
from pixelpick.settings import Settings
from tasks.tracking import experiment_id_for, git_commit


def preset_from(preset: dict) -> BenchmarkPreset:
    return BenchmarkPreset(**{**preset, "strategies": tuple(preset["strategies"]), "seeds": tuple(preset["seeds"])})


def spec_from(spec: dict) -> RunSpec:
    return RunSpec(spec["strategy"], spec["seed"], tuple((code, value) for code, value in spec.get("variant", ())))


@task(task_run_name="benchmark-{spec[strategy]}-s{spec[seed]}")
def benchmark_run(settings_json: str, preset: dict, spec: dict) -> str:
    """One run of the plan (full supervision, or an active-learning campaign over the budgets)."""
    path = run_benchmark_run(Settings.model_validate_json(settings_json), preset_from(preset), spec_from(spec),
                             progress=True)
    return str(path)


@task(retries=2, retry_delay_seconds=5)
def log_benchmark_run(result_path: str, experiment: str) -> str:
    """One MLflow run per benchmark run: mIoU and per-class IoU against labelled pixels per image (the step; a
    full-supervision round is logged at the budget it is the reference for),
    and the seconds of each stage. Idempotent: a result already logged is found by its digest."""
    client = MlflowClient()
    experiment_id = experiment_id_for(client, experiment)
    digest = file_md5(result_path)
    logged = client.search_runs([experiment_id], f"tags.`pixelpick.result_md5` = '{digest}'", max_results=1)
    if logged:
        return logged[0].info.run_id
    rows = read_rows([Path(result_path)])
    first = rows[0]
    run = client.create_run(experiment_id, run_name=f"{first['strategy']}-s{first['seed']}", tags={
        "pixelpick.kind": "benchmark-run", "pixelpick.result_md5": digest, "mlflow.source.git.commit": git_commit()})
    run_id = run.info.run_id
    for key in ("dataset", "preset", "strategy", "seed", "arch", "image_size", "device", "epochs_per_round",
                "epochs_round_0"):
        client.log_param(run_id, key, first.get(key))
    for row in rows:
        step = int(row.get("budget") or round(row["pixels_per_image"]))
        client.log_metric(run_id, "miou", row["miou"], step=step)
        for key, value in row.items():
            if key.startswith("iou_") and value is not None:
                client.log_metric(run_id, key, value, step=step)
        for stage in STAGES:
            client.log_metric(run_id, f"seconds_{stage}", row[f"{stage}_s"], step=step)
    client.log_artifact(run_id, result_path)
    client.set_terminated(run_id)
    return run_id


@task
def write_benchmark_report(result_paths: list[str], out_dir: str, stem: str, experiment: str,
                           command: str = "") -> dict[str, str]:
    """The CSV, markdown report and plot; also a Prefect artifact and an MLflow run holding the three files."""
    frame = results_frame(read_rows([Path(p) for p in result_paths]))
    paths = write_report(frame, Path(out_dir), stem, command)
    create_markdown_artifact(paths["markdown"].read_text(), key=f"benchmark-{stem}".lower().replace("_", "-"),
                             description=f"Label-efficiency benchmark {stem}")
    client = MlflowClient()
    run = client.create_run(experiment_id_for(client, experiment), run_name="report",
                            tags={"pixelpick.kind": "benchmark-report", "mlflow.source.git.commit": git_commit()})
    for path in paths.values():
        client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id)
    return {kind: str(path) for kind, path in paths.items()}


def preset_dict(preset: BenchmarkPreset) -> dict:
    return json.loads(json.dumps(asdict(preset)))


def spec_dict(spec: RunSpec) -> dict:
    return json.loads(json.dumps(asdict(spec)))
