"""The label-efficiency benchmark as a Prefect flow: full supervision and each strategy over the budgets and seeds,
logged to MLflow, reported in docs/benchmarks/.

    python -m flows.benchmark --preset cpu --camvid-root ../shared/datasets/camvid     # about 1.5 h on 2 cores
    python -m flows.benchmark --preset paper --camvid-root /data/camvid \\
        --set model.pretrained_path=weights/mobilenet_v2_imagenet.pth                 # for a GPU
    python -m flows.benchmark --preset cpu --strategies margin,entropy --seeds 0 --mc-samples 8
    python -m flows.benchmark --preset cpu --class-balance 1     # adds class-balanced margin (margin+cb1)
    python -m flows.benchmark --preset cpu --min-distance 8      # adds margin with picks 8 px apart (margin+md8)
    python -m flows.benchmark --preset cpu --report-only    # rebuild the report from the finished runs

An interrupted benchmark resumes where it stopped when started again with the same arguments. The presets and
their cost are in docs/benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from prefect import flow

from pixelpick.benchmark import PRESETS, RunSpec, benchmark_settings, plan_runs, run_settings
from pixelpick.settings import Settings, parse_override
from tasks.benchmark import benchmark_run, log_benchmark_run, preset_dict, preset_from, write_benchmark_report

REPO = Path(__file__).resolve().parents[1]


@flow(name="pixelpick-benchmark", flow_run_name="benchmark-{stem}", log_prints=True)
def benchmark_flow(settings_json: str, preset: dict, plan: list[dict], report_dir: str, stem: str,
                   command: str = "", report_only: bool = False) -> dict[str, str]:
    """Run every planned run in order (each resumes from its files), log each to MLflow, then write the report."""
    experiment = f"benchmark-{stem}"
    results = []
    for spec in plan:
        if report_only:
            result = _finished_result(settings_json, preset, spec)
            if result is None:
                continue
        else:
            result = benchmark_run(settings_json, preset, spec)
        log_benchmark_run(result, experiment)
        results.append(result)
        print(f"finished {RunSpec(**spec).name}: {result}")
    return write_benchmark_report(results, report_dir, stem, experiment, command)


def _finished_result(settings_json: str, preset: dict, spec: dict) -> str | None:
    settings = run_settings(Settings.model_validate_json(settings_json), preset_from(preset), RunSpec(**spec))
    path = settings.campaign.run_dir / "result.json"
    return str(path) if path.exists() else None


def _command_line(argv: list[str] | None) -> str:
    """The command that runs this benchmark (the one a report names), whichever of its modes made the report."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--report-only"]
    return shlex.join(["python", "-m", "flows.benchmark", *args])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--camvid-root", default=os.environ.get("PIXELPICK_CAMVID_ROOT"),
                        help="the CamVid folder (default: $PIXELPICK_CAMVID_ROOT)")
    parser.add_argument("--strategies", help="comma-separated, default: the preset's")
    parser.add_argument("--seeds", help="comma-separated, default: the preset's")
    parser.add_argument("--mc-samples", type=int, default=0,
                        help=">= 2 adds MC-dropout versions of the uncertainty strategies, and BALD")
    parser.add_argument("--class-balance", type=float, default=0.0, metavar="POWER",
                        help="> 0 adds class-balanced versions of the uncertainty strategies (acquire.class_balance)")
    parser.add_argument("--min-distance", type=float, default=0.0, metavar="PIXELS",
                        help="> 0 adds versions of the uncertainty strategies whose picks keep this far apart "
                             "(acquire.min_distance)")
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workdir", default=str(REPO / "data" / "benchmarks"),
                        help="where the runs' files go (default: data/benchmarks/<preset>)")
    parser.add_argument("--report-dir", default=str(REPO / "docs" / "benchmarks"))
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report from finished runs")
    args = parser.parse_args(argv)

    preset = PRESETS[args.preset]
    overrides = dict(parse_override(o) for o in args.overrides)
    if args.camvid_root:
        overrides.setdefault("data.root", args.camvid_root)
    settings = benchmark_settings(args.params, preset, Path(args.workdir) / preset.name, overrides)
    if settings.data.dataset == "camvid" and not (settings.data.root / "train").is_dir():
        parser.error(f"no CamVid at {settings.data.root}: pass --camvid-root (or set PIXELPICK_CAMVID_ROOT)")
    plan = plan_runs(
        preset,
        strategies=tuple(args.strategies.split(",")) if args.strategies else None,
        seeds=tuple(int(s) for s in args.seeds.split(",")) if args.seeds else None,
        mc_samples=args.mc_samples,
        class_balance=args.class_balance,
        min_distance=args.min_distance,
    )
    print(f"{len(plan)} runs: {', '.join(spec.name for spec in plan)}")
    paths = benchmark_flow(
        settings.model_dump_json(), preset_dict(preset), [vars(spec) for spec in plan], args.report_dir,
        stem=f"{settings.data.dataset}-{preset.name}", command=_command_line(argv),
        report_only=args.report_only,
    )
    print(f"report: {paths['markdown']}")


if __name__ == "__main__":
    main()
