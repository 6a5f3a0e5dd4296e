"""`pixelpick`: the one command line.

    pixelpick campaign [--set KEY=VALUE ...] [--campaign NAME]   a whole campaign (Prefect flow; --plain: no Prefect)
    pixelpick round N                                            one round of it
    pixelpick human query N / human train N                      a round labelled by people
    pixelpick annotate serve --job JOB                           the web annotator (and export-labels, split-job,
                                                                 export and import for Label Studio and CVAT)
    pixelpick benchmark --preset cpu --camvid-root DIR           the label-efficiency benchmark
    pixelpick predict --model models:/NAME@best --images DIR --out DIR    label maps with a registered model
    pixelpick step STEP --round N                                one step, in a campaign folder (what `dvc repro` runs)
    pixelpick pipeline [--campaign NAME]                         write a campaign's pipeline files, for `dvc repro`

Bad input (a settings key, a missing dataset, a malformed batch) prints one line naming the problem and exits with
status 1; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from pydantic import BaseModel, ValidationError

import tasks  # noqa: F401  (sets the store locations before Prefect and MLflow are imported)
from flows.parameters import BenchmarkChoice, CampaignChoice, ClusterChoice
from pixelpick.annotation import cli as annotation_cli
from pixelpick.errors import PixelPickError, SettingsError
from pixelpick.settings import parse_override

EXIT_BAD_INPUT = 1
EXIT_INTERRUPTED = 130
FLOW_COMMANDS = {"campaign", "round", "human", "benchmark"}  # what runs Prefect flows
ModelT = TypeVar("ModelT", bound=BaseModel)


def _here(path: str | None) -> str | None:
    """A path given on the command line, from the current folder (a model's relative paths are the project's)."""
    return str(Path(path).resolve()) if path else None


def _camvid_root(path: str | None) -> str | None:
    return _here(path or os.environ.get("PIXELPICK_CAMVID_ROOT"))


def _comma_separated(text: str | None) -> list[str] | None:
    return text.split(",") if text else None


def _parsed_overrides(texts: list[str]) -> dict[str, Any]:
    return dict(parse_override(text) for text in texts)


@dataclass(frozen=True)
class _Option:
    """How a field of a flow's parameter model is given on the command line, where that is not `--field-name`
    taking the value as it is: the flag, what becomes of the text (`parse`, applied when the model is built, so a
    malformed --set is one line of bad input), what only the command line does (`note`, added to the help), and
    argparse's own keywords."""

    flag: str | None = None
    parse: Callable[[Any], Any] | None = None
    note: str = ""
    argparse: dict[str, Any] = field(default_factory=dict)


_PATH = _Option(parse=_here, note="given here, from the current folder")
_SETTINGS = {"params": _PATH,
             "overrides": _Option("--set", _parsed_overrides, "given here as KEY=VALUE, repeatable: --set "
                                  "train.epochs=2", {"action": "append", "metavar": "KEY=VALUE"})}
OPTIONS: dict[type[BaseModel], dict[str, _Option]] = {
    CampaignChoice: _SETTINGS,
    ClusterChoice: {"address": _Option("--dask-address")},
    BenchmarkChoice: {
        **_SETTINGS, "workdir": _PATH, "report_dir": _PATH,
        "camvid_root": _Option(parse=_camvid_root, note=f"{_PATH.note}; default: $PIXELPICK_CAMVID_ROOT"),
        "strategies": _Option(parse=_comma_separated, note="comma-separated"),
        "seeds": _Option(parse=_comma_separated, note="comma-separated"),
        "variants": _Option("--variant", note="repeatable", argparse={"action": "append", "metavar": "VARIANT"}),
    },
}


def _model_options(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """An option for each field of `model` (a form in the Prefect UI): its default, its help (the field's
    description) and its choices are the field's, so they are written once; `OPTIONS` says the rest."""
    for name, info in model.model_fields.items():
        option = OPTIONS[model].get(name, _Option())
        default = info.get_default(call_default_factory=True)
        kwargs: dict[str, Any] = {"default": default}
        if default is False:
            kwargs["action"] = "store_true"
        elif get_origin(info.annotation) is Literal:
            kwargs["choices"] = get_args(info.annotation)
        elif info.annotation in (int, int | None):
            kwargs["type"] = int
        kwargs.update(option.argparse)
        if kwargs.get("action") == "append":
            kwargs["default"] = list(default)
        shown = isinstance(default, str | int) and not isinstance(default, bool)
        notes = "; ".join(filter(None, [option.note, f"default: {default}" if shown else ""]))
        help_ = f"{info.description} ({notes})" if notes else info.description
        parser.add_argument(option.flag or f"--{name.replace('_', '-')}", dest=name, help=help_.replace("%", "%%"),
                            **kwargs)


def _model_from(model: type[ModelT], args: argparse.Namespace, **given: Any) -> ModelT:
    """`model` from the options `_model_options` added (each value through its `parse`), and the fields `given`."""
    values = {}
    for name in model.model_fields:
        parse = OPTIONS[model].get(name, _Option()).parse
        values[name] = getattr(args, name) if parse is None else parse(getattr(args, name))
    try:
        return model(**{**values, **given})
    except ValidationError as error:  # e.g. --seeds 0,x or --shards 0: one line naming the option
        problem = error.errors()[0]
        name = str(problem["loc"][0]) if problem["loc"] else "?"
        flag = OPTIONS[model].get(name, _Option()).flag or f"--{name.replace('_', '-')}"
        raise SettingsError(f"{flag}: {problem['msg']} (got {problem.get('input')!r})") from None


def _campaign_options(parser: argparse.ArgumentParser) -> None:
    _model_options(parser, CampaignChoice)
    parser.add_argument("--campaign", help="the campaign's name (the same as --set campaign.name=NAME)")


def _serve_options(parser: argparse.ArgumentParser, default_interval: float | None = None) -> None:
    parser.add_argument("--serve", action="store_true", help="serve as a scheduled deployment instead of running once "
                        "(needs a Prefect server: PREFECT_API_URL)")
    parser.add_argument("--cron", help="schedule for --serve, e.g. '0 2 * * *'")
    parser.add_argument("--interval", type=float, default=default_interval, help="schedule for --serve, in seconds")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixelpick", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)

    campaign = commands.add_parser("campaign", help="run a whole campaign")
    _campaign_options(campaign)
    campaign.add_argument("--plain", action="store_true", help="in this process only: no Prefect, MLflow or DVC")
    _model_options(campaign, ClusterChoice)
    _serve_options(campaign)

    round_ = commands.add_parser("round", help="run one round of a campaign")
    round_.add_argument("round", type=int)
    _campaign_options(round_)
    _model_options(round_, ClusterChoice)

    human = commands.add_parser("human", help="a round labelled by people: query, then train")
    stages = human.add_subparsers(dest="stage", required=True)
    for stage, about in (("query", "pick round N's pixels and export them as an annotation job"),
                         ("train", "collect round N's labels, version them and train (waits until the job is done)")):
        stage_parser = stages.add_parser(stage, help=about, description=about)
        stage_parser.add_argument("round", type=int, help="the round, N")
        _campaign_options(stage_parser)
        _serve_options(stage_parser, default_interval=600)

    annotate = commands.add_parser("annotate",
                                   help="the web annotator: serve, export-labels, split-job, export, import",
                                   description=annotation_cli.__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    annotation_cli.add_commands(annotate)

    benchmark = commands.add_parser("benchmark", help="the label-efficiency benchmark")
    _model_options(benchmark, BenchmarkChoice)

    predict = commands.add_parser("predict", help="write label maps for a folder of images with a registered model")
    predict.add_argument("--model", required=True, help="an MLflow model URI, e.g. models:/pixelpick-NAME@best")
    predict.add_argument("--images", type=Path, required=True, help="a folder of images (png, jpg)")
    predict.add_argument("--out", type=Path, required=True, help="where the label maps (palette PNGs) go")

    step = commands.add_parser("step", help="one step of a round, in a campaign folder (what dvc repro runs)")
    step.add_argument("step", help="settings, pool, query, annotate, ingest, train or evaluate")
    step.add_argument("--round", type=int)
    step.add_argument("--campaign-dir", type=Path, default=Path("."))

    pipeline = commands.add_parser("pipeline", help="write a campaign's pipeline files from the recipe (starting the "
                                   "campaign if new), for `dvc repro`")
    _campaign_options(pipeline)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = _parsed_overrides(args.overrides)
    if getattr(args, "campaign", None):
        overrides["campaign.name"] = args.campaign
    return overrides


def _opened(args: argparse.Namespace, round_id: int | None = None, *, create: bool = True):
    """The campaign, opened here before any flow: bad settings, missing data or a round whose inputs do not exist
    yet fail in one line before Prefect starts (opening one does not import torch). A campaign is started (its
    settings recorded) only by `create` commands, and only from its round 0."""
    from pixelpick.campaign import open_campaign
    from pixelpick.recipe import check_can_start

    campaign = open_campaign(args.params, _overrides(args), create=create and round_id in (None, 0))
    if round_id:
        check_can_start(campaign, round_id)
    args.campaign = campaign.name
    return campaign


def _choice(args: argparse.Namespace) -> CampaignChoice:
    """The flows' campaign parameter (for a campaign `_opened` has checked)."""
    return _model_from(CampaignChoice, args, overrides=_overrides(args))


def _cluster(args: argparse.Namespace) -> ClusterChoice:
    return _model_from(ClusterChoice, args)


def _serve(flow_function, name: str, parameters: dict, args: argparse.Namespace) -> None:
    if not os.environ.get("PREFECT_API_URL"):
        raise SystemExit("error: --serve needs a Prefect server: start `prefect server start` and set "
                         "PREFECT_API_URL=http://127.0.0.1:4200/api")
    # One run at a time: a campaign's runs would refuse each other at its lock, so a run that falls due while
    # another works waits its turn. Stopping the server pauses the schedule, so runs do not pile up meanwhile.
    flow_function.serve(name=name, parameters=parameters, cron=args.cron, interval=args.interval, limit=1,
                        pause_on_shutdown=True)


def run_campaign(args: argparse.Namespace) -> None:
    if args.plain:
        from pixelpick.campaign import open_campaign
        from pixelpick.locking import campaign_lock
        from pixelpick.recipe import run_campaign as run_plain

        campaign = open_campaign(args.params, _overrides(args))
        print(f"{'round':>5} {'px/img':>7} {'labelled':>9} {'mIoU':>6}")
        with campaign_lock(campaign.layout.lock, campaign.name):
            run_plain(campaign, progress=True, on_round=lambda r, m: print(
                f"{r:>5} {m['labelled_per_image']:>7.1f} {m['labelled_pixels']:>9d} "
                f"{'n/a' if m['miou'] is None else format(100 * m['miou'], '.1f'):>6}", flush=True))
        return
    from pixelpick.recipe import nothing_to_do, pending_rounds

    campaign = _opened(args)
    if not args.serve and campaign.simulated and not pending_rounds(campaign):
        print(nothing_to_do(campaign))  # answered from the records: no Prefect server, nothing written
        return
    from flows.campaign import campaign_flow

    choice = _choice(args)
    if args.serve:
        _serve(campaign_flow, f"campaign-{args.campaign}", {"campaign": choice.model_dump(),
                                                   "cluster": _cluster(args).model_dump()}, args)
    else:
        campaign_flow(choice, _cluster(args))


def run_round(args: argparse.Namespace) -> None:
    cluster = _cluster(args)
    _opened(args, args.round)
    from flows.round import on_cluster  # after the checks: the flows import Prefect and MLflow (seconds)

    summary = on_cluster(cluster)(_choice(args), args.round, cluster)
    miou = "n/a" if summary["miou"] is None else f"{100 * summary['miou']:.1f}"
    print(f"round {args.round}: {summary['labelled_pixels']} labelled pixels, mIoU {miou}, model version "
          f"{summary['model_version']}")


def run_human(args: argparse.Namespace) -> None:
    campaign = _opened(args, args.round, create=args.stage == "query")
    if args.stage == "train" and not args.serve:
        from pixelpick.human import job_progress, train_answer

        # Answered from the job and the records, before Prefect starts: still being labelled, or trained already.
        answer = train_answer(campaign, args.round, job_progress(campaign, args.round))
        if answer is not None:
            print(answer)
            return
    from flows.human import query_flow, train_flow

    chosen = query_flow if args.stage == "query" else train_flow
    choice = _choice(args)
    if args.serve:
        parameters = {"campaign": choice.model_dump(), "round_id": args.round}
        _serve(chosen, f"{args.stage}-{args.campaign}-r{args.round:02d}", parameters, args)
    else:
        chosen(choice, args.round)


def run_annotate(args: argparse.Namespace) -> None:
    annotation_cli.run(args)


def run_benchmark(args: argparse.Namespace) -> None:
    from flows.benchmark import benchmark_flow

    choice = _model_from(BenchmarkChoice, args)
    command = shlex.join(["pixelpick", "benchmark", *(a for a in sys.argv[2:] if a != "--report-only")])
    paths = benchmark_flow(choice, command)
    print(f"report: {paths['markdown']}")


def run_predict(args: argparse.Namespace) -> None:
    import mlflow

    from pixelpick.predict import PredictionInputError, read_rgb, save_label_map

    images = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    if not images:
        raise PredictionInputError(f"no images (png, jpg) under {args.images}")
    from mlflow.exceptions import MlflowException

    try:
        model = mlflow.pyfunc.load_model(args.model)
    except MlflowException as error:  # an unknown name, version or alias: MLflow's own first line says which
        raise PredictionInputError(f"cannot load {args.model}: {str(error).splitlines()[0]}") from None
    colours = [c.colour for c in model.unwrap_python_model().predictor.label_space.classes]
    for path in images:
        labels = model.predict(read_rgb(path)[None])["labels"][0]
        save_label_map(labels, colours, (args.out / path.relative_to(args.images)).with_suffix(".png"))
    print(f"wrote {len(images)} label maps to {args.out}")


def run_step(args: argparse.Namespace) -> None:
    from pixelpick.campaign import open_recorded
    from pixelpick.locking import campaign_lock
    from pixelpick.recipe import STEPS
    from pixelpick.recipe import run_step as run_recipe_step
    from pixelpick.reporting import write_progress

    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # one process of a torchrun launch: train as part of the group
        from pixelpick.distributed import init_from_environment
        from pixelpick.step_input import Runtime

        device = init_from_environment()  # this process's GPU, or the CPU
        run_recipe_step(open_recorded(args.campaign_dir), STEPS[args.step], args.round, runtime=Runtime(str(device)))
        return
    campaign = open_recorded(args.campaign_dir)
    with campaign_lock(campaign.layout.lock, campaign.name):
        if args.step == "settings":  # a DVC stage: the settings each stage reads, derived from params.yaml
            from tasks.pipeline_files import write_step_settings

            print(f"settings of every stage: {write_step_settings(campaign)}")
            return
        if args.step not in ("pool", *STEPS):
            raise SystemExit(f"error: unknown step {args.step!r}: one of settings, pool, {', '.join(STEPS)}")
        if args.round is None:
            raise SystemExit("error: step needs --round N")
        if args.step == "pool":  # the round starts: its pool is frozen (nothing is rewritten once it is)
            campaign.freeze_pool(args.round)
            print(f"pool of round {args.round}: {campaign.layout.pool(args.round)}")
            return
        result = run_recipe_step(campaign, STEPS[args.step], args.round, progress=True)
        if args.step == "evaluate":  # a DVC stage: the round is logged and reported here, as a flow's last task does
            from tasks.tracking import log_round

            log_round(campaign, args.round)
            write_progress(campaign)
    print(f"{args.step} of round {args.round}: {'up to date' if result.fresh else 'done'}")


def run_pipeline(args: argparse.Namespace) -> None:
    from pixelpick.campaign import open_campaign
    from tasks.pipeline_files import write_runnable_pipeline

    campaign = open_campaign(args.params, _overrides(args))
    written = write_runnable_pipeline(campaign)
    if written is None:
        print(f"campaign {campaign.name} is outside any DVC repository: no pipeline written")
    elif written.parent != campaign.layout.dir:
        print(f"{written} now runs campaign {campaign.name} (its folder is ignored by git, so it has no pipeline of "
              "its own)")
    else:
        print(written)


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "campaign": run_campaign, "round": run_round, "human": run_human, "annotate": run_annotate,
    "benchmark": run_benchmark, "predict": run_predict, "step": run_step, "pipeline": run_pipeline,
}


class _OneLine(logging.Filter):
    """Keeps Prefect's console log to one line per failure: the traceback is left to --debug."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.levelno >= logging.ERROR:
            error = record.exc_info[1]
            record.exc_info = record.exc_text = None
            record.msg, record.args = f"{record.getMessage().splitlines()[0]} {type(error).__name__}: {error}", ()
        return True


def _stop(signum: int, frame: object) -> None:
    """SIGTERM stops a run as Ctrl-C does: at once, through the same clean-up (flow and MLflow run marked, the
    temporary server stopped, training's resume point kept)."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> None:
    args = get_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    logging.getLogger("pixelpick").setLevel(logging.INFO)  # shown by Prefect's console handler, or the basic one
    from tasks.servers import stop_orphaned_servers

    stop_orphaned_servers()  # any command stops what a killed run left behind (it costs milliseconds)
    if args.command in FLOW_COMMANDS:  # the others answer without Prefect: its import alone takes a second
        if not args.debug:
            from prefect.logging.configuration import ensure_logging_setup

            ensure_logging_setup()  # Prefect's console handler sits on the root logger; the API keeps the traceback
            for handler in logging.getLogger().handlers:
                handler.addFilter(_OneLine())
        from prefect import tags

        from tasks.servers import owner_tag, temporary_server_apart

        temporary_server_apart()
        scope = tags(owner_tag())  # the next run can tell this one's flow runs from a killed process's
    else:
        logging.basicConfig(format="%(levelname)s %(name)s - %(message)s")
        scope = contextlib.nullcontext()
    try:
        with scope:
            COMMANDS[args.command](args)
    except Exception as error:
        if args.debug:
            raise
        message = _one_line(error)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except BaseException as stop:  # Ctrl-C and SIGTERM are not Exceptions
        if not _is_stop(stop):
            raise
        cause = (str(stop) or "SIGINT") if isinstance(stop, KeyboardInterrupt) else "SIGTERM"
        print(f"stopped ({cause}): run the same command again to continue where it stopped", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


def _is_stop(error: BaseException) -> bool:
    """Ctrl-C, or SIGTERM (ours, or Prefect's TerminationSignal when a flow ran)."""
    prefect_exceptions = sys.modules.get("prefect.exceptions")
    return isinstance(error, KeyboardInterrupt) or (
        prefect_exceptions is not None and isinstance(error, prefect_exceptions.TerminationSignal))


def _is_bad_input(error: Exception) -> bool:
    return isinstance(error, (PixelPickError, FileNotFoundError))  # VersioningError is a PixelPickError


def _one_line(error: Exception) -> str | None:
    """What to tell the user about `error` in one line, or None for a bug (its traceback is shown).

    Bad input says itself. A full disk and a vanished MLflow database arrive wrapped by whichever library hit
    them (Zarr, torch, SQLAlchemy, Prefect), so the chain of causes is searched for them."""
    import errno

    from pixelpick.io import disk_full_message

    chain = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    if _is_bad_input(error):
        return str(error).splitlines()[0] if str(error) else type(error).__name__
    for cause in chain:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return disk_full_message(cause.filename or Path.cwd())
    database = _mlflow_database()
    if database is not None and any(_is_missing_database(cause) for cause in chain):
        state = "is gone" if not database.is_file() else "has lost its tables"
        return (f"the MLflow database {database} {state} (deleted or replaced while the command ran): restore it "
                "from a backup, or delete it to start an empty one; the campaign's files are intact, so run the "
                "same command again")
    return None


def _mlflow_database() -> Path | None:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def _is_missing_database(error: BaseException) -> bool:
    text = str(error).lower()
    # "readonly": what SQLite says when the file of an open connection was deleted (a long run, a benchmark).
    return any(sign in text for sign in ("no such table", "unable to open database file", "disk i/o error",
                                         "database disk image is malformed", "attempt to write a readonly database"))


if __name__ == "__main__":
    main()
