"""The web annotator: a small FastAPI app serving the page (static/) and a JSON API over a ProgressStore.

The page does the drawing and the timing; the server owns the truth. Every submission is validated here (job,
queried pixel, class) and stored at once; a rejected one stores nothing and answers 4xx with a `detail` message
that the page shows. Images are served only when they belong to the job and resolve inside the dataset root.
"""

from __future__ import annotations

import ipaddress
import mimetypes
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from pixelpick.annotation.jobs import Job
from pixelpick.annotation.keys import NAVIGATION_KEYS, resolve_key_bindings
from pixelpick.annotation.progress import ANNOTATOR_PATTERN, PixelRef, ProgressStore, Submission
from pixelpick.errors import AnnotatorConfigError, PixelConflictError, SubmissionRejectedError

STATIC_DIR = Path(__file__).parent / "static"
TOKEN_ENV = "PIXELPICK_ANNOTATOR_TOKEN"
TOKEN_COOKIE = "pixelpick_token"
TOKEN_HEADER = "x-pixelpick-token"
MAX_CLAIM = 64

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
) -> FastAPI:
    """The annotator app for `job`, storing into `store` and serving images from `dataset_root`.

    class_keys: the key of each class in id order (default: the job's keys); checked for collisions again.
    token: when set, every request needs it (header, `?token=` or the cookie the page gets from `?token=`).
    """
    root = Path(dataset_root).resolve()
    check_images_present(job, root)
    names = [info.name for info in job.classes]
    keys = resolve_key_bindings(job.classes, dict(zip(names, class_keys, strict=True)) if class_keys else None)
    images = {image.image_id: image for image in job.images}
    app = FastAPI(title="PixelPick annotator", docs_url=None, redoc_url=None, openapi_url=None)
    if token:
        _require_token(app, token)
    _add_error_handlers(app)

    def progress(image_id: str | None = None) -> dict[str, object]:
        counts: dict[str, object] = {"done": store.done_count(), "total": job.num_pixels}
        if image_id is not None:
            counts |= {"image_id": image_id, "image_done": store.done_count(image_id)}
        return counts

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "annotator.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/job")
    def describe_job() -> dict[str, object]:
        return {
            "job_id": job.job_id,
            "campaign": job.campaign,
            "round": job.round,
            "dataset": job.dataset.model_dump(),
            "classes": [{**info.model_dump(), "key": key} for info, key in zip(job.classes, keys, strict=True)],
            "ignore_index": job.ignore_index,
            "navigation": NAVIGATION_KEYS,
            "images": [
                {"image_id": image.image_id, "height": image.height, "width": image.width, "pixels": len(image.pixels)}
                for image in job.images
            ],
            "default_annotator": default_annotator,
        }

    @app.get("/api/state")
    def state(annotator: Annotated[str, Query(pattern=ANNOTATOR_PATTERN.pattern)]) -> dict[str, object]:
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
        pixels = store.claim(body.annotator, body.count)
        return {"pixels": [pixel._asdict() for pixel in pixels], **progress()}

    @app.post("/api/labels", status_code=201)
    def label(body: LabelBody) -> dict[str, object]:
        stored = store.record(Submission(**body.model_dump()))
        return {"stored": stored, **progress(body.image_id)}

    @app.put("/api/labels")
    def relabel(body: LabelBody) -> dict[str, object]:
        store.relabel(Submission(**body.model_dump()))
        return progress(body.image_id)

    @app.post("/api/undo")
    def undo(body: UndoBody) -> dict[str, object]:
        expected = PixelRef(**body.expected.model_dump()) if body.expected else None
        pixel = store.undo(body.annotator, expected)
        return {"pixel": pixel._asdict(), **progress(pixel.image_id)}

    @app.post("/api/skip")
    def skip(body: SkipBody) -> dict[str, object]:
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


def check_host(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without an access token."""
    if token:
        return
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise AnnotatorConfigError(
            f"refusing to serve on {host!r} without an access token: anyone who can reach it could label; "
            f"set --token or {TOKEN_ENV}, or bind to 127.0.0.1"
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


def _add_error_handlers(app: FastAPI) -> None:
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


def _describe_problem(problem: dict) -> str:
    if problem["type"] == "json_invalid":
        return f"the body is not valid JSON ({problem.get('ctx', {}).get('error', 'cannot parse')})"
    field = ".".join(str(part) for part in problem["loc"] if part not in ("body", "query"))
    return f"{field or 'body'}: {problem['msg']}"
