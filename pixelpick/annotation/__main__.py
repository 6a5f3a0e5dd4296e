"""Label a round's queried pixels by hand, keyboard only.

    pixelpick annotate serve --job rounds/r01/job.json --dataset-root data/synthetic --annotator ana
    pixelpick annotate export-labels --job rounds/r01/job.json --out rounds/r01/human.parquet
    pixelpick annotate split-job --job rounds/r01/job.json --batches 3 --out-dir rounds/r01/batches

Progress is stored beside the job (`job.progress.sqlite`) after every key press; see docs/annotation.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from urllib.parse import urlencode

from pixelpick.annotation.guards import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_RATE_LIMIT,
    TOKEN_ENV,
    WILDCARD_HOSTS,
    choose_token,
)
from pixelpick.annotation.jobs import load_job, split_job, write_job
from pixelpick.annotation.keys import parse_key_overrides, resolve_key_bindings
from pixelpick.annotation.progress import DEFAULT_LEASE_SECONDS, ProgressStore, default_progress_path, ingest_job_labels
from pixelpick.annotation.server import DEFAULT_MAX_HELD, create_app
from pixelpick.errors import PixelPickError


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pixelpick annotate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the web annotator for a job")
    serve.add_argument("--job", type=Path, required=True, help="the job file (JSON)")
    serve.add_argument("--dataset-root", type=Path, help="where the job's image ids live (default: the job's root)")
    serve.add_argument("--db", type=Path, help="progress database (default: <job>.progress.sqlite beside the job)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                       help=f"access token (default: ${TOKEN_ENV}); needed beyond 127.0.0.1, where it must be at "
                            "least 16 characters with an estimated 128 bits of entropy, and generated when not given")
    serve.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                       help="another name the annotator is reached by (e.g. behind a proxy); repeatable")
    serve.add_argument("--keys", help="remap class keys: 'sky=q,road=r' or a YAML file of class: key")
    serve.add_argument("--annotator", help="the name labels are stored under when the page does not give one")
    serve.add_argument("--lease-minutes", type=float, default=DEFAULT_LEASE_SECONDS / 60,
                       help="an idle annotator's pixels return to the pool after this long (default: 10)")
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

    split = commands.add_parser("split-job", help="split a job by image into balanced batches, one per annotator")
    split.add_argument("--job", type=Path, required=True)
    split.add_argument("--batches", type=int, required=True)
    split.add_argument("--out-dir", type=Path, required=True)
    return parser


def serve(args: argparse.Namespace) -> None:
    import uvicorn  # only this command needs a web server

    token, generated = choose_token(args.host, args.token)
    job = load_job(args.job)
    keys = resolve_key_bindings(job.classes, parse_key_overrides(args.keys) if args.keys else None)
    store = ProgressStore(args.db or default_progress_path(args.job), job, lease_seconds=args.lease_minutes * 60)
    root = args.dataset_root or Path(job.dataset.root)
    app = create_app(
        job, store, root, class_keys=keys, token=token, default_annotator=args.annotator,
        allowed_hosts=[args.host, *args.allowed_host], max_body_bytes=args.max_body_kib * 1024,
        max_held=args.max_held, rate_limit=args.rate_limit,
    )
    query = {name: value for name, value in (("annotator", args.annotator), ("token", token)) if value}
    # Nobody browses to 0.0.0.0: link to the name people are told to use, when there is one.
    link_host = args.allowed_host[0] if args.host in WILDCARD_HOSTS and args.allowed_host else args.host
    link_host = f"[{link_host}]" if ":" in link_host else link_host
    url = f"http://{link_host}:{args.port}/" + (f"?{urlencode(query)}" if query else "")
    done = store.done_count()
    print(f"job {job.job_id!r}: {done} of {job.num_pixels} pixels labelled; progress in {store.path}")
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


COMMANDS = {"serve": serve, "export-labels": export_labels, "split-job": write_batches}


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except PixelPickError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
