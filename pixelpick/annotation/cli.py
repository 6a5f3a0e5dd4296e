"""Label a round's queried pixels by hand, keyboard only: the `annotate` commands.

    pixelpick annotate serve --job rounds/r01/job.json --dataset-root data/synthetic --annotator ana
    pixelpick annotate export-labels --job rounds/r01/job.json --out rounds/r01/human.parquet
    pixelpick annotate split-job --job rounds/r01/job.json --batches 3 --out-dir rounds/r01/batches
    pixelpick annotate export --format label-studio --job rounds/r01/job.json --out rounds/r01/label-studio
    pixelpick annotate import --format label-studio --job rounds/r01/job.json --in project-export.json

Progress is stored beside the job (`job.progress.sqlite`) after every key press; see docs/annotation.md.
Labels made in Label Studio or CVAT are imported into the same progress; see docs/labelling-tools.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from urllib.parse import urlencode

from pixelpick.annotation import exchange
from pixelpick.annotation.exchange import DEFAULT_IMAGE_URL, FORMATS, round_suggestions
from pixelpick.annotation.guards import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_HELD,
    DEFAULT_RATE_LIMIT,
    TOKEN_ENV,
    WILDCARD_HOSTS,
    choose_token,
)
from pixelpick.annotation.jobs import load_job, split_job, write_job
from pixelpick.annotation.keys import parse_key_overrides, resolve_key_bindings
from pixelpick.annotation.progress import DEFAULT_LEASE_SECONDS, ProgressStore, default_progress_path, ingest_job_labels
from pixelpick.errors import PixelPickError


def add_commands(parser: argparse.ArgumentParser) -> None:
    """Adds serve, export-labels, export, import and split-job to `parser` (`args.annotate` names the one chosen):
    declared once, for `pixelpick annotate` and `python -m pixelpick.annotation` alike."""
    commands = parser.add_subparsers(dest="annotate", required=True)

    serve = commands.add_parser("serve", help="serve the web annotator for a job")
    serve.add_argument("--job", type=Path, required=True, help="the job file (JSON)")
    serve.add_argument("--dataset-root", type=Path, help="where the job's image ids live (default: the job's root)")
    serve.add_argument("--db", type=Path, help="progress database (default: <job>.progress.sqlite beside the job)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                       help=f"access token (default: ${TOKEN_ENV}); needed beyond 127.0.0.1, where it must be at "
                            "least 16 characters with an estimated 128 bits of entropy; generated when not given")
    serve.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                       help="another name the annotator is reached by (e.g. behind a proxy); repeatable")
    serve.add_argument("--keys", help="remap class keys: 'sky=q,road=r' or a YAML file of class: key")
    serve.add_argument("--annotator", help="the name labels are stored under when the page does not give one")
    serve.add_argument("--lease-minutes", type=float, default=DEFAULT_LEASE_SECONDS / 60,
                       help="pixels of an annotator whose page is not heard from (it sends a heartbeat every 15 s) "
                            "return to the pool after this long (default: 1)")
    serve.add_argument("--probs", type=Path,
                       help="the round's probability store for suggestions (default: probs.zarr beside the job)")
    serve.add_argument("--no-suggestions", action="store_true",
                       help="do not show the model's predicted class (shown by default after round 0)")
    serve.add_argument("--max-held", type=int, default=DEFAULT_MAX_HELD,
                       help=f"unlabelled pixels one annotator may hold at once (default: {DEFAULT_MAX_HELD})")
    serve.add_argument("--rate-limit", type=float, default=DEFAULT_RATE_LIMIT,
                       help=f"requests per second one annotator may make (default: {DEFAULT_RATE_LIMIT:g})")
    serve.add_argument("--max-body-kib", type=int, default=DEFAULT_MAX_BODY_BYTES // 1024,
                       help=f"largest request body in KiB (default: {DEFAULT_MAX_BODY_BYTES // 1024})")

    export = commands.add_parser("export-labels", help="write a job's labels as a Parquet batch")
    export.add_argument("--job", type=Path, required=True)
    export.add_argument("--db", type=Path, help="progress database (default: beside the job)")
    export.add_argument("--out", type=Path, required=True, help="the Parquet file to write")
    export.add_argument("--allow-incomplete", action="store_true", help="export even if some pixels are unlabelled")

    tool = commands.add_parser("export", help="write a job for Label Studio or CVAT")
    tool.add_argument("--format", choices=FORMATS, required=True)
    tool.add_argument("--job", type=Path, required=True)
    tool.add_argument("--out", type=Path, required=True, help="the folder to write into")
    tool.add_argument("--image-url", default=DEFAULT_IMAGE_URL,
                      help="Label Studio: each task's image URL, {image_id} replaced (default: %(default)s)")
    tool.add_argument("--probs", type=Path, help="the round's probability store (default: probs.zarr beside the job)")
    tool.add_argument("--no-suggestions", action="store_true", help="leave out the model's predicted classes")

    back = commands.add_parser("import", help="store labels exported from Label Studio or CVAT as the job's labels")
    back.add_argument("--format", choices=FORMATS, required=True)
    back.add_argument("--job", type=Path, required=True)
    back.add_argument("--in", dest="source", type=Path, required=True,
                      help="Label Studio's JSON export, or CVAT's annotations.xml")
    back.add_argument("--db", type=Path, help="progress database (default: beside the job)")
    back.add_argument("--annotator", help="the name the labels are stored under (default: from the export)")

    split = commands.add_parser("split-job", help="split a job by image into balanced batches, one per annotator")
    split.add_argument("--job", type=Path, required=True)
    split.add_argument("--batches", type=int, required=True)
    split.add_argument("--out-dir", type=Path, required=True)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pixelpick.annotation", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_commands(parser)
    return parser


def serve(args: argparse.Namespace) -> None:
    import uvicorn  # only this command needs a web server

    from pixelpick.annotation.server import create_app

    token, generated = choose_token(args.host, args.token)
    job = load_job(args.job)
    keys = resolve_key_bindings(job.classes, parse_key_overrides(args.keys) if args.keys else None)
    store = ProgressStore(args.db or default_progress_path(args.job), job, lease_seconds=args.lease_minutes * 60)
    root = args.dataset_root or Path(job.dataset.root)
    found = round_suggestions(job, Path(args.job), probs=args.probs, use_model=not args.no_suggestions,
                              with_scores=False)
    app = create_app(
        job, store, root, class_keys=keys, token=token, default_annotator=args.annotator,
        allowed_hosts=[args.host, *args.allowed_host], max_body_bytes=args.max_body_kib * 1024,
        max_held=args.max_held, rate_limit=args.rate_limit,
        suggestions={pixel: class_id for pixel, (class_id, _) in found.predicted.items()},
    )
    query = {name: value for name, value in (("annotator", args.annotator), ("token", token)) if value}
    # Nobody browses to 0.0.0.0: link to the name people are told to use, when there is one.
    link_host = args.allowed_host[0] if args.host in WILDCARD_HOSTS and args.allowed_host else args.host
    link_host = f"[{link_host}]" if ":" in link_host else link_host
    url = f"http://{link_host}:{args.port}/" + (f"?{urlencode(query)}" if query else "")
    done = store.done_count()
    print(f"job {job.job_id!r}: {done} of {job.num_pixels} pixels labelled; progress in {store.path}")
    if found.predicted:
        print(f"suggesting the classes of model {found.model_version} for {len(found.predicted)} pixels "
              "(Tab accepts one; --no-suggestions turns them off)")
    if generated:
        print(f"generated an access token for {args.host} (set --token or ${TOKEN_ENV} to choose one); "
              "the link below carries it")
    print(f"annotator at {url}  (Ctrl+C stops it; nothing is lost)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def export_labels(args: argparse.Namespace) -> None:
    db = args.db or default_progress_path(args.job)
    path = ingest_job_labels(args.job, db, args.out, allow_incomplete=args.allow_incomplete)
    print(f"wrote {path}")


def write_batches(args: argparse.Namespace) -> None:
    for batch in split_job(load_job(args.job), args.batches):
        path = write_job(batch, args.out_dir / f"{batch.job_id}.json")
        print(f"{path}: {len(batch.images)} images, {batch.num_pixels} pixels")


def export_for_tool(args: argparse.Namespace) -> None:
    paths = exchange.export_for_tool(args.job, args.out, args.format, image_url=args.image_url, probs=args.probs,
                                     suggestions=not args.no_suggestions)
    print("wrote " + ", ".join(str(path) for path in paths))


def import_from_tool(args: argparse.Namespace) -> None:
    result = exchange.import_labels(args.job, args.source, args.format, db=args.db, annotator=args.annotator)
    print(f"imported {result.stored} labels ({result.unchanged} were there already); "
          f"{result.done} of {result.total} pixels of the job are labelled")


COMMANDS = {"serve": serve, "export-labels": export_labels, "split-job": write_batches,
            "export": export_for_tool, "import": import_from_tool}


def run(args: argparse.Namespace) -> None:
    COMMANDS[args.annotate](args)


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except PixelPickError as error:
        sys.exit(f"error: {error}")
