"""A real Label Studio round trip: our export loaded into a running Label Studio server, labelled in its UI in
headless Chromium, its JSON export imported back with `pixelpick annotate import`.

Label Studio runs from its own virtual environment (tests/tools.py says where); the test skips when it or Debian's
Chromium is missing. Starting the server takes about a minute on 2 cores, so one server serves the module.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pixelpick.annotation import ProgressStore, default_progress_path, export_job, load_job
from pixelpick.annotation.__main__ import main as annotate
from pixelpick.datasets.folder import FolderDataset
from tests.test_annotator_browser import CHROMIUM, CHROMIUM_ARGS
from tests.tools import stop_process_group, tool_python, wait_until_serving

pytestmark = [pytest.mark.slow, pytest.mark.browser]

EMAIL, PASSWORD, TOKEN = "labeller@example.com", "pixelpick-test-1", "pixelpick-test-token"
CLASSES = [{"name": "sky", "colour": [70, 130, 180], "key": "k"},
           {"name": "road", "colour": [128, 64, 128], "key": "r"}]
# Widths 7 and 1000: a pixel centre scaled back from percent sits on the rounding tie, so rounding would pick the
# neighbour for some of these pixels.
SIZES = {"images/w7.png": (5, 7), "images/w1000.png": (3, 1000)}
QUERIES = [("images/w7.png", 1, 3), ("images/w7.png", 4, 6), ("images/w1000.png", 1, 333),
           ("images/w1000.png", 2, 999)]
STRAY = ("images/w7.png", 2, 1)  # clicked in the UI although the job never asked for it


@dataclass
class LabelStudio:
    url: str
    data_root: Path  # Label Studio's LOCAL_FILES_DOCUMENT_ROOT: the dataset's images are served from here
    api: httpx.Client


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory) -> Iterator[LabelStudio]:
    binary = tool_python("label-studio").parent / "label-studio"
    if not binary.exists():
        pytest.skip(f"label-studio is not installed at {binary} (set PIXELPICK_LABEL_STUDIO_PYTHON)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api")
    home = tmp_path_factory.mktemp("label-studio")
    data_root = home / "data"
    data_root.mkdir()
    port = _free_port()
    env = {**os.environ,
           "LABEL_STUDIO_BASE_DATA_DIR": str(home / "ls"),
           # Since 1.17 a new organisation refuses `Authorization: Token ...` unless this is set at its creation.
           "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
           "LOCAL_FILES_SERVING_ENABLED": "true", "LOCAL_FILES_DOCUMENT_ROOT": str(data_root),
           "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true", "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "",
           "COLLECT_ANALYTICS": "false"}
    log = (home / "server.log").open("w")
    process = subprocess.Popen(
        [binary, "start", "--no-browser", "--host", "127.0.0.1", "--port", str(port), "--username", EMAIL,
         "--password", PASSWORD, "--user-token", TOKEN],
        cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    api = httpx.Client(base_url=url, headers={"Authorization": f"Token {TOKEN}"}, timeout=60)
    try:
        # About 40-80 s on 2 busy cores: migrations run on first start.
        wait_until_serving(process, lambda: api.get("/health").status_code == 200
                           and api.get("/api/projects").status_code == 200,
                           timeout=300, log=home / "server.log", what="Label Studio", poll=1)
        yield LabelStudio(url, data_root, api)
    finally:
        api.close()
        stop_process_group(process, log, timeout=30)


@pytest.fixture()
def job_path(label_studio: LabelStudio, tmp_path: Path) -> Path:
    """A human round's job over a folder dataset whose images Label Studio serves from its local-files root."""
    root = label_studio.data_root
    (root / "images").mkdir(exist_ok=True)
    root.joinpath("classes.yaml").write_text(yaml.safe_dump({"ignore_index": 255, "classes": CLASSES}))
    rng = np.random.default_rng(0)
    for image_id, (height, width) in SIZES.items():
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(root / image_id)
    queries = pd.DataFrame(QUERIES, columns=["image_id", "y", "x"])
    return export_job(queries, FolderDataset(root, "train"), job_id="ls-r00", campaign="ls", round_id=0,
                      path=tmp_path / "rounds" / "r00" / "job.json")


def create_project(label_studio: LabelStudio, export: Path) -> int:
    api = label_studio.api
    created = api.post("/api/projects", json={"title": "pixelpick round trip",
                                              "label_config": (export / "config.xml").read_text()})
    assert created.status_code == 201, created.text  # Label Studio validated our labelling config
    project = created.json()["id"]
    # Local files are served only from a storage of the project, and a storage may not be the root itself.
    storage = api.post("/api/storages/localfiles", json={
        "project": project, "path": str(label_studio.data_root / "images"), "use_blob_urls": False, "title": "images"})
    assert storage.status_code == 201, storage.text
    imported = api.post(f"/api/projects/{project}/import", json=json.loads((export / "tasks.json").read_text()))
    assert imported.status_code == 201, imported.text
    assert (imported.json()["task_count"], imported.json()["prediction_count"]) == (len(SIZES), len(SIZES))
    return project


def label_in_the_ui(label_studio: LabelStudio, project: int, screenshots: Path) -> None:
    """What a person does: log in, open each task, select each queried point and press its class key; on the
    7-wide image also pick "road" and click a pixel the job did not ask for; submit."""
    from playwright.sync_api import sync_playwright

    tasks = {task["data"]["image_id"]: task["id"]
             for task in label_studio.api.get("/api/tasks", params={"project": project}).json()["tasks"]}
    keys = {"images/w7.png": ["k", "r"], "images/w1000.png": ["r", "k"]}  # in the order of the job's pixels
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"{label_studio.url}/user/login/")
        page.fill("input[name=email]", EMAIL)
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(lambda url: "/user/login" not in url)
        for image_id, task in tasks.items():
            page.goto(f"{label_studio.url}/projects/{project}/data?task={task}")
            image = page.locator("img[alt=image]")
            # The editor re-renders while it loads a task, so the image can be gone between two polls.
            page.wait_for_function("() => document.querySelector('img[alt=image]')?.naturalWidth > 0",
                                   timeout=60_000)
            regions = page.locator(".lsf-tree__node_type_keypointregion")
            regions.nth(len(keys[image_id]) - 1).wait_for()
            # The pre-annotation's points (the queried pixels) arrive as regions of the new annotation.
            assert regions.count() == len(keys[image_id])
            for number, key in enumerate(keys[image_id]):
                regions.nth(number).click()
                page.keyboard.press(key)
                page.locator(".lsf-tree__node_type_keypointregion", has_text=["sky", "road"][
                    "kr".index(key)]).nth(0).wait_for()
            if image_id == STRAY[0]:
                page.keyboard.press("Escape")  # nothing selected: the key now picks the label to draw with
                page.keyboard.press("r")
                box = image.bounding_box()
                height, width = SIZES[image_id]
                # Off the pixel's centre on purpose: snap="pixel" should store the centre anyway.
                page.mouse.click(box["x"] + (STRAY[2] + 0.8) * box["width"] / width,
                                 box["y"] + (STRAY[1] + 0.3) * box["height"] / height)
                regions.nth(len(keys[image_id])).wait_for()
            page.screenshot(path=screenshots / f"{Path(image_id).stem}.png")
            page.get_by_test_id("bottombar-submit-button").click()
            page.wait_for_function(f"() => fetch('/api/tasks/{task}').then(r => r.json())"
                                   ".then(t => t.total_annotations > 0)", polling=500, timeout=30_000)
        browser.close()
    assert not errors, errors


def run_cli(*argv: object) -> None:
    annotate([str(part) for part in argv])


def test_labels_made_in_label_studio_land_on_the_right_pixels(label_studio: LabelStudio, job_path: Path,
                                                              tmp_path: Path) -> None:
    run_cli("export", "--format", "label-studio", "--job", job_path, "--out", tmp_path / "ls")
    project = create_project(label_studio, tmp_path / "ls")
    label_in_the_ui(label_studio, project, tmp_path)

    exported = label_studio.api.get(f"/api/projects/{project}/export", params={"exportType": "JSON"})
    assert exported.status_code == 200, exported.text
    tasks = exported.json()
    (tmp_path / "export.json").write_text(json.dumps(tasks))
    points = {task["data"]["image_id"]: task["annotations"][0]["result"] for task in tasks}
    # A clicked point is stored at the centre of the clicked pixel, in percent, whatever spot inside it was hit.
    (clicked,) = [point for point in points[STRAY[0]] if point["origin"] == "manual"]
    height, width = SIZES[STRAY[0]]
    assert clicked["value"]["x"] == pytest.approx((STRAY[2] + 0.5) / width * 100, abs=1e-9)
    assert clicked["value"]["y"] == pytest.approx((STRAY[1] + 0.5) / height * 100, abs=1e-9)
    assert clicked["value"]["keypointlabels"] == ["road"]
    assert (clicked["original_width"], clicked["original_height"]) == (width, height)
    # A labelled pre-annotation point keeps its place and is marked as a changed prediction.
    assert {point["origin"] for task in points.values() for point in task} == {"prediction-changed", "manual"}

    # As Label Studio wrote it, the export is refused as a whole: the clicked pixel was never queried.
    with pytest.raises(SystemExit) as refused:
        run_cli("import", "--format", "label-studio", "--job", job_path, "--in", tmp_path / "export.json")
    assert "did not query" in str(refused.value.code) and repr(STRAY) in str(refused.value.code)
    assert not default_progress_path(job_path).exists()

    # Without that point, every label lands on exactly the pixel it was given in the UI.
    for task in tasks:
        for annotation in task["annotations"]:
            annotation["result"] = [point for point in annotation["result"] if point["origin"] != "manual"]
    (tmp_path / "export.json").write_text(json.dumps(tasks))
    run_cli("import", "--format", "label-studio", "--job", job_path, "--in", tmp_path / "export.json")
    labels = ProgressStore(default_progress_path(job_path), load_job(job_path)).completed_labels()
    got = sorted(zip(labels["image_id"], labels["y"], labels["x"], labels["class_id"], strict=True))
    sky, road = 0, 1
    assert got == sorted([("images/w7.png", 1, 3, sky), ("images/w7.png", 4, 6, road),
                          ("images/w1000.png", 1, 333, road), ("images/w1000.png", 2, 999, sky)])
