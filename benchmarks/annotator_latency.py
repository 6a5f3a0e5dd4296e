"""How fast does the annotator answer several people at once, and how much memory does its server take?

    .venv/bin/python benchmarks/annotator_latency.py                  # 3 annotators, 240 pixels on generated frames
    .venv/bin/python benchmarks/annotator_latency.py --pace 1.0       # at a person's pace (about one label a second)
    .venv/bin/python benchmarks/annotator_latency.py --camvid-root /path/to/camvid

The server is a real `python -m pixelpick.annotation serve` process with its default limits (rate limit, pixels
held, body size). Three simulated annotators label one job at once, each doing what static/annotator.js does: keep
about six pixels claimed ahead with their images fetched, post each label in the background through one ordered
outbox (retrying on 429/503 after Retry-After), and claim more when fewer than four are left.

Figures, per key press:
- key press -> next pixel ready: until the page has the next pixel and its image, i.e. what the annotator waits
  for before the pixel can be drawn (drawing itself is measured in the browser by the tests, not here);
- key press -> label stored: until the server acknowledged the label;
and the server process's peak resident memory (VmHWM) while labelling, and again after three concurrent 50 MiB
bodies with a declared length and three streamed ones, all of which must be refused with 413.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
from PIL import Image

from pixelpick.annotation import ProgressStore, export_job, load_job
from pixelpick.datasets.camvid import CamVidDataset

PIXELS_PER_IMAGE = 10
PREFETCH, REFILL_BELOW, MAX_CLAIM = 6, 4, 64  # as in static/annotator.js
BIG_BODY = 50 * 1024 * 1024


def make_images(root: Path, count: int, rng: np.random.Generator) -> None:
    """CamVid-sized PNGs with smooth structure plus noise, so serving them costs what a photo costs."""
    (root / "train").mkdir(parents=True)
    rows, cols = np.mgrid[0:360, 0:480]
    for index in range(count):
        base = np.stack([rows * 0.5 + index * 9, cols * 0.4, (rows + cols) * 0.25], axis=-1)
        image = (base + rng.normal(0, 12, base.shape)) % 256
        Image.fromarray(image.astype(np.uint8)).save(root / "train" / f"frame{index:03d}.png")


def build_job(dataset: CamVidDataset, pixels: int, workdir: Path, rng: np.random.Generator) -> Path:
    image_ids = dataset.image_ids[: -(-pixels // PIXELS_PER_IMAGE)]
    rows = []
    for image_id in image_ids:
        height, width = dataset.image_size(image_id)
        flat = rng.choice(height * width, PIXELS_PER_IMAGE, replace=False)
        rows += [(image_id, int(i // width), int(i % width)) for i in flat]
    queries = pd.DataFrame(rows[:pixels], columns=["image_id", "y", "x"])
    return export_job(queries, dataset, job_id="latency", campaign="benchmark", round_id=1, path=workdir / "job.json",
                      dataset_name="camvid")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in KiB, from /proc (Linux)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


class SimulatedPage:
    """One annotator's page: a queue of claimed pixels, prefetched images, and an ordered outbox of labels."""

    def __init__(self, client: httpx.AsyncClient, name: str, classes: int) -> None:
        self.client, self.name, self.classes = client, name, classes
        self.queue: deque[dict] = deque()
        self.known: set[tuple] = set()
        self.images: dict[str, asyncio.Task] = {}
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.unsent = 0
        self.claiming: asyncio.Task | None = None
        self.to_next_pixel: list[float] = []
        self.to_stored: list[float] = []
        self.throttled = 0

    async def answer(self, method: str, path: str, body: dict) -> httpx.Response:
        """Like the page's answerOf: retry until the server answers, waiting Retry-After on 429 and 503."""
        while True:
            response = await self.client.request(method, path, json=body)
            if response.status_code not in (429, 503):
                return response
            self.throttled += 1
            await asyncio.sleep(float(response.headers.get("retry-after", "1")))

    async def claim(self) -> None:
        count = min(PREFETCH + self.unsent, MAX_CLAIM)
        response = await self.answer("POST", "/api/claims", {"annotator": self.name, "count": count})
        response.raise_for_status()
        pixels = response.json()["pixels"]
        for pixel in pixels:
            key = (pixel["image_id"], pixel["y"], pixel["x"])
            if key not in self.known:
                self.known.add(key)
                self.queue.append(pixel)
                if pixel["image_id"] not in self.images:
                    self.images[pixel["image_id"]] = asyncio.create_task(self.fetch_image(pixel["image_id"]))

    async def fetch_image(self, image_id: str) -> None:
        (await self.client.get(f"/api/images/{image_id}")).raise_for_status()

    def request_claims(self) -> None:
        if self.claiming is None or self.claiming.done():
            self.claiming = asyncio.create_task(self.claim())

    async def next_pixel(self) -> dict | None:
        """The pixel to show next, once it and its image are there; None when nothing is left to claim."""
        while not self.queue:
            self.request_claims()
            await self.claiming
            if not self.queue:
                if not self.unsent:
                    return None  # the job is done, or others hold the rest
                await self.outbox.join()  # the page, too, claims again once its labels are stored
        await self.images[self.queue[0]["image_id"]]
        return self.queue[0]

    async def send_labels(self) -> None:
        while True:
            body, pressed = await self.outbox.get()
            response = await self.answer("POST", "/api/labels", body)
            if response.status_code != 201:
                raise RuntimeError(f"label refused: {response.status_code} {response.text}")
            self.to_stored.append(time.perf_counter() - pressed)
            self.unsent -= 1
            self.outbox.task_done()

    async def label_until_done(self, pace: float) -> int:
        sender = asyncio.create_task(self.send_labels())
        presses = 0
        pixel = await self.next_pixel()
        while pixel is not None:
            await asyncio.sleep(pace)  # the annotator looks at the pixel
            pressed = time.perf_counter()
            self.queue.popleft()
            body = {"annotator": self.name, **pixel, "class_id": presses % self.classes, "seconds": pace,
                    "submission_id": f"{self.name}-{presses}"}
            self.unsent += 1
            self.outbox.put_nowait((body, pressed))
            presses += 1
            if len(self.queue) < REFILL_BELOW:
                self.request_claims()
            pixel = await self.next_pixel()
            if pixel is not None:
                self.to_next_pixel.append(time.perf_counter() - pressed)
        await self.outbox.join()
        sender.cancel()
        return presses


async def label_concurrently(url: str, annotators: int, classes: int, pace: float) -> list[SimulatedPage]:
    pages = []
    async with asyncio.TaskGroup() as group:
        for index in range(annotators):
            client = httpx.AsyncClient(base_url=url, timeout=60)
            pages.append(SimulatedPage(client, f"annotator{index + 1}", classes))
            group.create_task(pages[-1].label_until_done(pace))
    for page in pages:
        await page.client.aclose()
    return pages


async def send_big_bodies(url: str) -> list[str]:
    """Three 50 MiB bodies with a declared length and three streamed ones, at once; what each got back."""
    payload = b"x" * BIG_BODY

    async def streamed():
        for start in range(0, BIG_BODY, 1 << 20):
            yield payload[start:start + (1 << 20)]

    async def post(content) -> str:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            try:
                response = await client.post("/api/labels", content=content,
                                             headers={"content-type": "application/json"})
                return str(response.status_code)
            except httpx.TransportError:  # the server answered 413 and closed the connection while we still sent
                return "closed unread"

    return await asyncio.gather(*[post(payload) for _ in range(3)], *[post(streamed()) for _ in range(3)])


def percentiles(seconds: list[float]) -> str:
    ms = np.asarray(seconds) * 1000
    p50, p95 = np.percentile(ms, [50, 95])
    return f"p50 {p50:.1f} ms, p95 {p95:.1f} ms, max {ms.max():.1f} ms (n={len(ms)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotators", type=int, default=3)
    parser.add_argument("--pixels", type=int, default=240, help="pixels in the job, shared by the annotators")
    parser.add_argument("--pace", type=float, default=0.25,
                        help="seconds each annotator looks at a pixel before pressing (a person: about 1)")
    parser.add_argument("--camvid-root", type=Path, help="label real CamVid frames (read in place, never copied)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)

    with tempfile.TemporaryDirectory(prefix="pixelpick-latency-") as tmp:
        workdir = Path(tmp)
        root = args.camvid_root
        if root is None:
            root = workdir / "frames"
            make_images(root, -(-args.pixels // PIXELS_PER_IMAGE), rng)
        job_path = build_job(CamVidDataset(root, "train"), args.pixels, workdir, rng)
        job = load_job(job_path)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [sys.executable, "-m", "pixelpick.annotation", "serve", "--job", str(job_path), "--dataset-root",
             str(root), "--port", str(port)],
            stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    httpx.get(f"{url}/api/job", timeout=1).raise_for_status()
                    break
                except httpx.TransportError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("the annotator server did not start") from None
                    time.sleep(0.1)
            at_start = memory_kib(server.pid)
            started = time.perf_counter()
            pages = asyncio.run(label_concurrently(url, args.annotators, len(job.classes), args.pace))
            elapsed = time.perf_counter() - started
            after_labelling = memory_kib(server.pid)
            big = asyncio.run(send_big_bodies(url))
            after_big = memory_kib(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=10)
        stored = ProgressStore(workdir / "job.progress.sqlite", job).done_count()

    mib = lambda kib: f"{kib / 1024:.0f} MiB"  # noqa: E731
    presses = sum(len(page.to_stored) for page in pages)
    print(f"job: {job.num_pixels} pixels on {len(job.images)} {'CamVid' if args.camvid_root else 'generated'} "
          f"360x480 PNGs; {args.annotators} simulated annotators, one press per {args.pace:g} s each, "
          f"against a uvicorn server process with its default limits")
    print(f"key press -> next pixel ready:   {percentiles([t for page in pages for t in page.to_next_pixel])}")
    print(f"key press -> label stored:       {percentiles([t for page in pages for t in page.to_stored])}")
    print(f"labels per annotator: {[len(page.to_stored) for page in pages]}; {presses / elapsed * 60:.0f} labels per "
          f"minute in all; rate-limited or busy answers: {sum(page.throttled for page in pages)}")
    print(f"server memory (RSS): {mib(at_start['VmRSS'])} at start, peak {mib(after_labelling['VmHWM'])} while "
          f"labelling, peak {mib(after_big['VmHWM'])} after 3 + 3 concurrent 50 MiB bodies (answers: {', '.join(big)})")
    print(f"labels stored on the server: {stored} of {job.num_pixels}")
    if stored != job.num_pixels or presses != job.num_pixels:
        raise SystemExit("some labels were not stored")
    if any(answer.isdigit() and answer != "413" for answer in big):
        raise SystemExit("an oversized body was not refused with 413")


if __name__ == "__main__":
    main()
