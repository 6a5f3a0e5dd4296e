"""The web annotator: a small FastAPI app serving the page (static/) and a JSON API over a ProgressStore.

The page does the drawing and the timing; the server owns the truth. Every submission is validated here (job,
queried pixel, class) and stored at once; a rejected one stores nothing and answers 4xx with a `detail` message
that the page shows. Every failure answers JSON, from an unknown path to an internal error, and none names a path
on the server. Images are served only when they belong to the job and resolve inside the dataset root. What
makes it safe to expose (Host allow-list, body and rate limits, token strength) is in `guards`.

After round 0 each pixel handed out carries the previous model's class (`suggested`), which the page highlights and
the accept key takes; the server, not the page, says what was suggested, so a label's `accepted` flag is checked
against it. The page sends a heartbeat while open and a beacon to `/api/release` when it closes, so an annotator's
pixels go back to the others at once, or `lease_seconds` after the page was last heard from.
"""

from __future__ import annotations

import logging
import math
import mimetypes
import secrets
import sqlite3
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware

from pixelpick.annotation.guards import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_HELD,
    DEFAULT_RATE_LIMIT,
    DeclaredBodyLimit,
    HostAllowList,
    RateLimiter,
    allowed_host_names,
    body_too_large,
)
from pixelpick.annotation.jobs import Job
from pixelpick.annotation.keys import NAVIGATION_KEYS, resolve_key_bindings
from pixelpick.annotation.progress import ANNOTATOR_PATTERN, ClosedInfo, PixelRef, ProgressStore, Submission
from pixelpick.errors import AnnotatorConfigError, JobClosedError, PixelConflictError, SubmissionRejectedError

STATIC_DIR = Path(__file__).parent / "static"
TOKEN_COOKIE = "pixelpick_token"
TOKEN_HEADER = "x-pixelpick-token"
MAX_CLAIM = 64
BUSY_RETRY_SECONDS = 2  # Retry-After when the progress database is locked by another writer

log = logging.getLogger(__name__)

Annotator = Annotated[StrictStr, Field(pattern=ANNOTATOR_PATTERN.pattern)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LabelBody(_Body):
    annotator: Annotator
    image_id: StrictStr
    y: StrictInt
    x: StrictInt
    class_id: StrictInt
    seconds: StrictFloat | StrictInt
    submission_id: StrictStr = Field(min_length=1, max_length=64)
    accepted: StrictBool = False  # the model's suggestion was taken with the accept key
    # Clients echo the claimed pixel, suggestion included; what was suggested is the server's to say, so it is ignored.
    suggested: StrictInt | None = None


class AnnotatorBody(_Body):
    annotator: Annotator


class PixelBody(_Body):
    image_id: StrictStr
    y: StrictInt
    x: StrictInt


class ClaimBody(_Body):
    annotator: Annotator
    count: StrictInt = Field(ge=1, le=MAX_CLAIM)


class UndoBody(_Body):
    annotator: Annotator
    expected: PixelBody | None = None


class SkipBody(_Body):
    annotator: Annotator
    image_id: StrictStr


def create_app(
    job: Job,
    store: ProgressStore,
    dataset_root: str | Path,
    *,
    class_keys: Sequence[str] | None = None,
    token: str | None = None,
    default_annotator: str | None = None,
    allowed_hosts: Sequence[str] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_held: int | None = DEFAULT_MAX_HELD,
    rate_limit: float | None = DEFAULT_RATE_LIMIT,
    suggestions: Mapping[tuple[str, int, int], int] | None = None,
) -> FastAPI:
    """The annotator app for `job`, storing into `store` and serving images from `dataset_root`.

    class_keys: the key of each class in id order (default: the job's keys); checked for collisions again.
    token: when set, every request needs it (header, `?token=` or the cookie the page gets from `?token=`).
    allowed_hosts: names the Host header may give besides localhost, 127.0.0.1 and ::1 (e.g. the served host).
    max_body_bytes: larger request bodies are refused (413) before they are read.
    max_held: how many unlabelled pixels one annotator name may hold at once (None: no cap).
    rate_limit: requests per second one annotator name may make on average, in bursts of three seconds' worth;
        more are answered 429 with Retry-After (None: no limit).
    suggestions: the model's class per queried pixel (image_id, y, x), shown to annotators (None or empty: none;
        see `exchange.round_suggestions`).
    """
    if max_body_bytes < 1 or (max_held is not None and max_held < 1):
        raise AnnotatorConfigError(
            f"the body limit ({max_body_bytes} bytes) and the pixels one annotator may hold ({max_held}) "
            "must be positive"
        )
    root = Path(dataset_root).resolve()
    check_images_present(job, root)
    names = [info.name for info in job.classes]
    keys = resolve_key_bindings(job.classes, dict(zip(names, class_keys, strict=True)) if class_keys else None)
    images = {image.image_id: image for image in job.images}
    hosts = allowed_host_names(allowed_hosts)
    limiter = RateLimiter(rate_limit) if rate_limit is not None else None
    app = FastAPI(title="PixelPick annotator", docs_url=None, redoc_url=None, openapi_url=None)
    # Added innermost first: the Host check runs before anything else, then the body limits, then the token.
    if token:
        _require_token(app, token)
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=max_body_bytes)
    app.add_middleware(DeclaredBodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(HostAllowList, allowed=hosts)
    # A closed job's answers carry the true counts, so the page's closed panel shows what was stored.
    _add_error_handlers(app, max_body_bytes, lambda: {"done": store.counts()[0], "total": job.num_pixels})

    suggested = dict(suggestions or {})

    def progress(image_id: str | None = None) -> dict[str, object]:
        done, in_image = store.counts(image_id)
        counts: dict[str, object] = {"done": done, "total": job.num_pixels}
        if image_id is not None:
            counts |= {"image_id": image_id, "image_done": in_image}
        return counts

    def submission(body: LabelBody) -> Submission:
        return Submission(**body.model_dump(exclude={"suggested"}),
                          suggested=suggested.get((body.image_id, body.y, body.x)))

    def pixel_json(pixel: PixelRef) -> dict[str, object]:
        return {**pixel._asdict(), "suggested": suggested.get(tuple(pixel))}

    def waiting(annotator: str) -> dict[str, object]:
        """When the first pixel held by someone else comes back unless they label it (the page's waiting message)."""
        seconds = store.next_release(annotator)
        return {"next_release_s": None if seconds is None else round(seconds, 1)}

    def throttle(annotator: str) -> None:
        wait = limiter.wait(annotator) if limiter else 0.0
        if wait:
            seconds = math.ceil(wait)
            raise HTTPException(
                429,
                f"annotator {annotator!r} is sending more than {limiter.rate:g} requests per second; "
                f"try again in {seconds} s",
                headers={"Retry-After": str(seconds)},
            )

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "annotator.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/job")
    def describe_job() -> dict[str, object]:
        return {
            "job_id": job.job_id,
            "campaign": job.campaign,
            "round": job.round,
            "dataset": {"name": job.dataset.name},  # not its root: no response names a path on the server
            "classes": [{**info.model_dump(), "key": key} for info, key in zip(job.classes, keys, strict=True)],
            "ignore_index": job.ignore_index,
            "navigation": NAVIGATION_KEYS,
            "images": [
                {"image_id": image.image_id, "height": image.height, "width": image.width, "pixels": len(image.pixels)}
                for image in job.images
            ],
            "default_annotator": default_annotator,
            "suggestions": bool(suggested),
            "closed": _closed_json(store.closed_info()),
            **progress(),
        }

    @app.get("/api/state")
    def state(annotator: Annotated[str, Query(pattern=ANNOTATOR_PATTERN.pattern)]) -> dict[str, object]:
        throttle(annotator)
        count, seconds = store.annotator_seconds(annotator)
        return {
            **progress(),
            "done_by_image": store.done_by_image(),
            "history": store.history(annotator),
            "my_labels": count,
            "my_seconds": seconds,
        }

    @app.post("/api/claims")
    def claim(body: ClaimBody) -> dict[str, object]:
        throttle(body.annotator)
        pixels = store.claim(body.annotator, body.count, max_held=max_held)
        return {"pixels": [pixel_json(pixel) for pixel in pixels], **progress(), **waiting(body.annotator)}

    @app.post("/api/heartbeat")
    def heartbeat(body: AnnotatorBody) -> dict[str, object]:
        throttle(body.annotator)
        store.heartbeat(body.annotator)
        return {**progress(), **waiting(body.annotator)}

    @app.post("/api/release")
    async def release(request: Request) -> dict[str, object]:
        # Sent by navigator.sendBeacon as the page closes: its body comes as text/plain (a beacon cannot choose a
        # JSON content type without a preflight), so it is parsed here whatever its type. The token comes in the
        # cookie or ?token=, which a beacon carries; it cannot set headers.
        try:
            body = AnnotatorBody.model_validate_json(await request.body())
        except ValidationError as error:
            raise HTTPException(422, f"malformed request: {_describe_problem(error.errors()[0])}") from None
        throttle(body.annotator)
        return {"released": store.release(body.annotator)}

    @app.post("/api/labels", status_code=201)
    def label(body: LabelBody) -> dict[str, object]:
        throttle(body.annotator)
        stored = store.record(submission(body))
        return {"stored": stored, **progress(body.image_id)}

    @app.put("/api/labels")
    def relabel(body: LabelBody) -> dict[str, object]:
        throttle(body.annotator)
        store.relabel(submission(body))
        return progress(body.image_id)

    @app.post("/api/undo")
    def undo(body: UndoBody) -> dict[str, object]:
        throttle(body.annotator)
        expected = PixelRef(**body.expected.model_dump()) if body.expected else None
        pixel = store.undo(body.annotator, expected)
        return {"pixel": pixel._asdict(), **progress(pixel.image_id)}

    @app.post("/api/skip")
    def skip(body: SkipBody) -> dict[str, object]:
        throttle(body.annotator)
        return {"released": store.skip_image(body.annotator, body.image_id), **progress()}

    @app.get("/api/images/{image_id:path}")
    def image(image_id: str) -> FileResponse:
        if image_id not in images:
            raise HTTPException(404, f"image {image_id!r} is not in job {job.job_id!r}")
        path = resolve_inside(root, image_id)
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        # The files of a job do not change, so the page's prefetched copies can be reused.
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": "private, max-age=86400"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def resolve_inside(root: Path, image_id: str) -> Path:
    """`root / image_id` with symlinks resolved; 403 unless it is a file inside `root` (already resolved)."""
    path = (root / image_id).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise HTTPException(403, f"image {image_id!r} does not resolve to a file inside the dataset root")
    return path


def check_images_present(job: Job, root: Path) -> None:
    """Fail early, naming a missing file, when `root` is not the dataset the job was made from."""
    missing = [image.image_id for image in job.images if not (root / image.image_id).is_file()]
    if missing:
        raise AnnotatorConfigError(
            f"{len(missing)} of {len(job.images)} images of job {job.job_id!r} are missing under the dataset root "
            f"{root}, e.g. {missing[0]!r}; pass the root the job was made from (--dataset-root)"
        )


def _require_token(app: FastAPI, token: str) -> None:
    expected = token.encode()

    @app.middleware("http")
    async def check_token(request: Request, call_next):  # noqa: ANN001, ANN202 (Starlette's middleware signature)
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        from_query = request.query_params.get("token")
        given = request.headers.get(TOKEN_HEADER) or bearer or from_query or request.cookies.get(TOKEN_COOKIE) or ""
        if not secrets.compare_digest(given.encode(), expected):
            return JSONResponse(
                {"detail": "this annotator needs its access token: open the link you were given (…/?token=…)"},
                status_code=401,
            )
        response: Response = await call_next(request)
        if from_query:  # the page keeps the token in a cookie so its own requests carry it
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response


def _closed_json(closed: ClosedInfo | None) -> dict[str, str] | None:
    if closed is None:
        return None
    return {"closed_at": closed.closed_at.isoformat(), "note": closed.note}


def _add_error_handlers(app: FastAPI, max_body_bytes: int, closed_counts) -> None:  # noqa: ANN001
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        detail, path, headers = error.detail, request.url.path, dict(error.headers or {})
        if error.status_code == 413:  # from Starlette's limit on a streamed body
            detail = body_too_large(max_body_bytes)
        elif error.status_code == 405:
            # Starlette's Allow names the first route on the path only (POST /api/labels, not also PUT).
            methods = {method for route in app.routes if isinstance(route, APIRoute) and route.path_regex.match(path)
                       for method in route.methods}
            headers["Allow"] = ", ".join(sorted(methods)) or headers.get("Allow", "")
            detail = f"{request.method} is not allowed on {path}; use {headers['Allow']}"
        elif detail == HTTPStatus(error.status_code).phrase:  # Starlette's bare phrase: say what went wrong
            detail = f"there is nothing at {path}" if error.status_code == 404 else detail
        return JSONResponse({"detail": detail}, status_code=error.status_code, headers=headers)

    @app.exception_handler(JobClosedError)
    async def closed(request: Request, error: JobClosedError) -> JSONResponse:
        info = {"closed_at": error.closed_at.isoformat(), "note": error.note}
        return JSONResponse({"detail": str(error), "closed": info, **closed_counts()}, status_code=409)

    @app.exception_handler(PixelConflictError)
    async def conflict(request: Request, error: PixelConflictError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=409)

    @app.exception_handler(SubmissionRejectedError)
    async def rejected(request: Request, error: SubmissionRejectedError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(_describe_problem(problem) for problem in error.errors())
        return JSONResponse({"detail": f"malformed request: {problems}"}, status_code=422)

    @app.exception_handler(sqlite3.OperationalError)
    async def database_busy(request: Request, error: sqlite3.OperationalError) -> JSONResponse:
        if "locked" not in str(error) and "busy" not in str(error):
            raise error  # not a matter of waiting: an internal error (500), logged with its traceback
        log.warning("progress database busy, answering 503: %s", error)
        return JSONResponse(
            {"detail": "the progress database is busy (another writer holds it); nothing was stored, try again"},
            status_code=503,
            headers={"Retry-After": str(BUSY_RETRY_SECONDS)},
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        # The traceback goes to the server's log (Starlette re-raises after this answer), never to the client.
        return JSONResponse(
            {"detail": "internal error in the annotator; the server's log has the details"},
            status_code=500,
        )


def _describe_problem(problem: dict) -> str:
    if problem["type"] == "json_invalid":
        return f"the body is not valid JSON ({problem.get('ctx', {}).get('error', 'cannot parse')})"
    field = ".".join(str(part) for part in problem["loc"] if part not in ("body", "query"))
    return f"{field or 'body'}: {problem['msg']}"
