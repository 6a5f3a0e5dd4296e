"""The label-efficiency benchmark as a Prefect flow: full supervision and each strategy over the budgets and seeds,
logged to MLflow, reported in docs/benchmarks/.

    pixelpick benchmark --preset cpu --camvid-root /path/to/camvid
    pixelpick benchmark --preset cpu --variant sp300 --variant sp300+st0.9   # ablation rows: superpixels, self-training
    pixelpick benchmark --preset cpu --strategies margin --variant ep10      # margin only, against earlier full runs
    pixelpick benchmark --preset gpu-quick --camvid-root /data/camvid          # the paper's model, on a GPU
    pixelpick benchmark --preset cpu --report-only                             # rebuild the report from finished runs
    pixelpick benchmark --preset cpu --protocol tune --variant sp300+ss0.1     # choose settings on the tuning split

An interrupted benchmark resumes where it stopped when started again with the same arguments. The same command in
two shells shares the plan's runs between two processes: each passes over the runs the other is running (and
those that will start from a round 0 the other is training), then waits for them, so both end with the whole
report. The presets and their cost are in docs/benchmarks/README.md.
"""

from pathlib import Path
from typing import Any

from prefect import flow, task

from flows.parameters import PROJECT, BenchmarkChoice
from pixelpick.benchmark import (
    FULL,
    PRESETS,
    RunSpec,
    benchmark_settings,
    busy_with,
    parse_variant,
    plan_runs,
    run_plan,
    run_settings,
)
from pixelpick.errors import BenchmarkError
from pixelpick.settings import Settings
from tasks.benchmark import (
    benchmark_run,
    log_benchmark_run,
    preset_dict,
    preset_from,
    spec_dict,
    spec_from,
    write_benchmark_report,
)


def _project_path(path: str) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else PROJECT / candidate


@task(task_run_name="plan-benchmark")
def plan_benchmark(choice: BenchmarkChoice) -> dict[str, Any]:
    """The base settings (params, preset, overrides) and the ordered runs; refuses a dataset that is not there."""
    if choice.preset not in PRESETS:
        raise BenchmarkError(f"unknown preset {choice.preset!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[choice.preset]
    # A tuning benchmark has its own runs and report: the same run names, other splits.
    suffix = "" if choice.protocol == "report" else f"-{choice.protocol}"
    workdir = _project_path(choice.workdir) / f"{preset.name}{suffix}"
    settings = benchmark_settings(_project_path(choice.params), preset, workdir, choice.overrides,
                                  protocol=choice.protocol)
    if settings.data.dataset == "camvid" and choice.camvid_root and "data.root" not in choice.overrides:
        # Only a CamVid benchmark reads the folder: a synthetic preset keeps its own root whatever the environment.
        settings = benchmark_settings(_project_path(choice.params), preset, workdir,
                                      {**choice.overrides, "data.root": str(_project_path(choice.camvid_root))},
                                      protocol=choice.protocol)
    if settings.data.dataset == "camvid" and not (settings.data.root / "train").is_dir():
        raise BenchmarkError(f"no CamVid at {settings.data.root} (data.root): pass --camvid-root or set "
                             "PIXELPICK_CAMVID_ROOT")
    plan = plan_runs(preset, strategies=tuple(choice.strategies) if choice.strategies else None,
                     seeds=tuple(choice.seeds) if choice.seeds is not None else None,
                     variants=tuple(parse_variant(v) for v in choice.variants))
    # The report's reference for a plan without full supervision (an ablation): that of an earlier benchmark.
    references = [RunSpec(FULL, seed) for seed in dict.fromkeys(spec.seed for spec in plan)]
    return {"settings_json": settings.model_dump_json(), "preset": preset_dict(preset),
            "plan": [spec_dict(spec) for spec in plan], "stem": f"{settings.data.dataset}-{preset.name}{suffix}",
            "references": [spec_dict(spec) for spec in references if spec not in plan]}


@task(task_run_name="finished-result-{spec[strategy]}-s{spec[seed]}")
def finished_result(settings_json: str, preset: dict, spec: dict) -> str | None:
    """A run's result file if it has finished (for --report-only)."""
    settings = run_settings(Settings.model_validate_json(settings_json), preset_from(preset), spec_from(spec))
    path = settings.campaign.run_dir / "result.json"
    return str(path) if path.exists() else None


@flow(name="pixelpick-benchmark", flow_run_name="benchmark-{choice.preset}", log_prints=True)
def benchmark_flow(choice: BenchmarkChoice = BenchmarkChoice(), command: str = "") -> dict[str, str]:
    """Run every planned run in order (each resumes from its files), log each to MLflow, then write the report."""
    planned = plan_benchmark(choice)
    print(f"{len(planned['plan'])} runs: {', '.join(spec_from(s).name for s in planned['plan'])}")
    experiment = f"benchmark-{planned['stem']}"
    results = []
    if choice.report_only:
        finished = ((spec_from(spec), finished_result(planned["settings_json"], planned["preset"], spec))
                    for spec in planned["plan"])
    else:
        base, preset = Settings.model_validate_json(planned["settings_json"]), preset_from(planned["preset"])
        finished = run_plan([spec_from(spec) for spec in planned["plan"]],
                            lambda spec: benchmark_run(planned["settings_json"], planned["preset"], spec_dict(spec)),
                            lambda spec: busy_with(base, preset, spec))
    for spec, result in finished:
        if result is None:
            continue
        log_benchmark_run(result, experiment)
        results.append(result)
        print(f"finished {spec.name}: {result}")
    for spec in planned["references"]:
        result = finished_result(planned["settings_json"], planned["preset"], spec)
        if result is not None:
            print(f"full supervision for the report: {result}")
            results.append(result)
    return write_benchmark_report(results, str(_project_path(choice.report_dir)), planned["stem"], experiment, command)
