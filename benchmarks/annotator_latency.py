"""How fast is the web annotator? Key press -> next pixel on screen, and labels per minute, in headless Chromium.

    .venv/bin/python benchmarks/annotator_latency.py                      # 200 presses on generated 360x480 images
    .venv/bin/python benchmarks/annotator_latency.py --camvid-root /work/shared/datasets/camvid

Latency is measured inside the page (static/annotator.js): from the keydown event's timestamp to the
requestAnimationFrame after the next pixel's crop is drawn, i.e. what the annotator waits for. The scripted
annotator presses the next key as soon as a new pixel is drawn, so labels per minute is the tool's ceiling, not a
human's (the paper reports < 1 s per pixel for people, i.e. > 60 per minute). At the end every label is checked to
be in the progress database.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import uvicorn
from PIL import Image
from playwright.sync_api import sync_playwright

from pixelpick.annotation import ProgressStore, export_job, load_job
from pixelpick.annotation.server import create_app
from pixelpick.datasets.camvid import CamVidDataset

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
PIXELS_PER_IMAGE = 10


def make_images(root: Path, count: int, rng: np.random.Generator) -> None:
    """CamVid-sized PNGs with smooth structure plus noise, so decoding costs what a photo costs."""
    (root / "train").mkdir(parents=True)
    rows, cols = np.mgrid[0:360, 0:480]
    for index in range(count):
        base = np.stack([rows * 0.5 + index * 9, cols * 0.4, (rows + cols) * 0.25], axis=-1)
        image = (base + rng.normal(0, 12, base.shape)) % 256
        Image.fromarray(image.astype(np.uint8)).save(root / "train" / f"frame{index:03d}.png")


def build_job(dataset: CamVidDataset, presses: int, workdir: Path, rng: np.random.Generator) -> Path:
    image_ids = dataset.image_ids[: -(-presses // PIXELS_PER_IMAGE)]
    rows = []
    for image_id in image_ids:
        height, width = dataset.image_size(image_id)
        flat = rng.choice(height * width, PIXELS_PER_IMAGE, replace=False)
        rows += [(image_id, int(i // width), int(i % width)) for i in flat]
    queries = pd.DataFrame(rows[:presses], columns=["image_id", "y", "x"])
    return export_job(queries, dataset, job_id="latency", campaign="benchmark", round_id=1, path=workdir / "job.json",
                      dataset_name="camvid")


def serve_in_thread(app) -> tuple[str, uvicorn.Server, threading.Thread]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))  # any free port
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/", server, thread


def label_everything(url: str, keys: list[str], presses: int) -> tuple[list[float], float]:
    """Press class keys as fast as the page shows pixels; returns the page's latencies (ms) and the wall time (s)."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(f"{url}?annotator=scripted")
        page.wait_for_selector("#crop[data-mode=label]")
        started = time.perf_counter()
        for press in range(presses):
            before = page.get_attribute("#crop", "data-shown")
            page.keyboard.press(keys[press % len(keys)])
            page.wait_for_function(
                """before => { const crop = document.querySelector('#crop');
                               return crop.dataset.shown !== before || crop.dataset.mode === 'done'; }""",
                arg=before,
                polling="raf",
            )
        page.wait_for_function("n => window.pixelpick.latencies.length >= n - 1", arg=presses)
        elapsed = time.perf_counter() - started
        page.wait_for_selector("#sync[data-state=saved]")
        latencies = page.evaluate("window.pixelpick.latencies")
        browser.close()
    return latencies, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presses", type=int, default=200)
    parser.add_argument("--camvid-root", type=Path, help="label real CamVid frames (read in place, never copied)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)

    with tempfile.TemporaryDirectory(prefix="pixelpick-latency-") as tmp:
        workdir = Path(tmp)
        root = args.camvid_root
        if root is None:
            root = workdir / "frames"
            make_images(root, -(-args.presses // PIXELS_PER_IMAGE), rng)
        dataset = CamVidDataset(root, "train")
        job = load_job(build_job(dataset, args.presses, workdir, rng))
        store = ProgressStore(workdir / "job.progress.sqlite", job)
        url, server, thread = serve_in_thread(create_app(job, store, root))
        try:
            latencies, elapsed = label_everything(url, [c.key for c in job.classes], job.num_pixels)
        finally:
            server.should_exit = True
            thread.join(timeout=5)
        stored = store.done_count()

    ms = np.asarray(latencies)
    print(f"images: {'CamVid' if args.camvid_root else 'generated'} 360x480 PNG, {len(job.images)} images, "
          f"{job.num_pixels} presses")
    print(f"key press -> next pixel on screen: p50 {np.percentile(ms, 50):.1f} ms, p95 {np.percentile(ms, 95):.1f} ms, "
          f"max {ms.max():.1f} ms (n={len(ms)})")
    print(f"scripted annotator: {job.num_pixels / elapsed * 60:.0f} labels per minute "
          f"({elapsed / job.num_pixels * 1000:.0f} ms per label incl. the driver's round trips)")
    print(f"labels stored on the server: {stored} of {job.num_pixels}")
    if stored != job.num_pixels:
        raise SystemExit("some labels were not stored")


if __name__ == "__main__":
    main()
