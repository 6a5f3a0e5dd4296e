"""The annotator page in real headless Chromium: keyboard-only labelling, undo, unsure, skip, review, reload, and
two annotators on one job. Skipped when Debian's Chromium is not installed (`apt-get install chromium`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pixelpick.annotation import ProgressStore, export_job, load_job
from pixelpick.annotation.server import create_app
from pixelpick.datasets.folder import FolderDataset

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
IGNORE = 255
SKY, ROAD = 0, 1
KEYS = {SKY: "k", ROAD: "r"}
# Three 16x20 images, sky above row 8 and road below; three queried pixels each.
QUERIES = {f"images/im{i}.png": [(2, 3 + i), (9, 5), (13, 15 - i)] for i in range(3)}
PIXELS = [(image_id, y, x) for image_id, pixels in QUERIES.items() for y, x in pixels]


def truth(pixel: tuple[str, int, int]) -> int:
    return SKY if pixel[1] < 8 else ROAD


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def store(tmp_path) -> ProgressStore:
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    classes = [
        {"name": "sky", "colour": [70, 130, 180], "key": "k"},
        {"name": "road", "colour": [128, 64, 128], "key": "r"},
    ]
    root.joinpath("classes.yaml").write_text(yaml.safe_dump({"ignore_index": IGNORE, "classes": classes}))
    for image_id in QUERIES:
        image = np.empty((16, 20, 3), np.uint8)
        image[:8], image[8:] = classes[SKY]["colour"], classes[ROAD]["colour"]
        Image.fromarray(image).save(root / image_id)
    queries = pd.DataFrame(PIXELS, columns=["image_id", "y", "x"])
    job_path = export_job(queries, FolderDataset(root, "train"), job_id="demo", campaign="demo", round_id=1,
                          path=tmp_path / "job.json")
    return ProgressStore(tmp_path / "job.progress.sqlite", load_job(job_path))


@contextmanager
def running(store: ProgressStore, **options) -> Iterator[str]:
    """Serve the annotator for `store` (create_app `options`) with uvicorn on a free localhost port, in a thread."""
    import uvicorn

    app = create_app(store.job, store, Path(store.job.dataset.root), **options)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))  # port 0: any free one
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/"
    finally:
        server.should_exit = True
        thread.join(timeout=5)


SUGGESTED = {PIXELS[0]: SKY, PIXELS[1]: SKY}  # right for the first pixel, wrong for the second (road)


@pytest.fixture
def url(store, request) -> Iterator[str]:
    options = getattr(request, "param", {})
    with running(store, **options) as base_url:
        yield base_url


@pytest.fixture
def open_page(browser, url):
    """Open the annotator as `annotator` in a fresh browser context (its own storage, like another person)."""
    contexts = []

    def open_as(annotator: str):
        contexts.append(context := browser.new_context(viewport={"width": 1100, "height": 720}))
        page = context.new_page()
        page.errors = []
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        page.goto(f"{url}?annotator={annotator}")
        page.wait_for_selector("#crop[data-mode=label]")
        return page

    yield open_as
    for context in contexts:
        context.close()


def shown(page) -> tuple[str, int, int] | None:
    """The pixel on screen, or None when the page shows none (done, waiting)."""
    data = page.eval_on_selector("#crop", "canvas => ({...canvas.dataset})")
    if data["mode"] not in ("label", "review"):
        return None
    return data["imageId"], int(data["y"]), int(data["x"])


def settled(page) -> tuple[str, int, int] | None:
    """The pixel on screen once the page stops waiting: with one annotator, "waiting" only means its last labels
    are still being saved (slow on a loaded machine), never that pixels are with someone else."""
    page.wait_for_function("() => !['waiting', 'loading'].includes(document.querySelector('#crop').dataset.mode)")
    return shown(page)


def press(page, key: str) -> None:
    """Press `key` and wait until the page has drawn what comes next (or says there is nothing left)."""
    before = page.get_attribute("#crop", "data-shown")
    page.keyboard.press(key)
    page.wait_for_function(
        """before => { const crop = document.querySelector('#crop');
                       return crop.dataset.shown !== before || ['done', 'waiting'].includes(crop.dataset.mode); }""",
        arg=before,
    )


def wait_saved(page) -> None:
    page.wait_for_selector("#sync[data-state=saved]")


def stored(store: ProgressStore) -> dict[tuple[str, int, int], tuple[int, str]]:
    labels = store.completed_labels()
    return {
        (image_id, y, x): (class_id, annotator)
        for image_id, y, x, class_id, annotator in zip(
            labels.image_id, labels.y, labels.x, labels.class_id, labels.annotator, strict=True
        )
    }


def test_label_a_whole_job_with_keys_only(open_page, store):
    page = open_page("ana")
    seen = []
    while (pixel := settled(page)) is not None:
        assert page.is_hidden("#overlay")  # nothing covers the crop while labelling
        seen.append(pixel)
        press(page, KEYS[truth(pixel)])
    wait_saved(page)

    assert seen == PIXELS  # each pixel once, in job order
    assert stored(store) == {pixel: (truth(pixel), "ana") for pixel in PIXELS}
    assert (store.completed_labels()["seconds"] > 0).all()
    assert page.get_attribute("#crop", "data-mode") == "done"
    assert page.inner_text("#progress-job") == "9 of 9 done · 0 left"
    assert page.errors == []


def test_undo_and_unsure(open_page, store):
    page = open_page("ana")
    first, second, third = PIXELS[:3]
    press(page, "k")
    press(page, " ")  # unsure about the second...
    press(page, "Backspace")  # ...undo that, it is on screen again
    assert shown(page) == second
    press(page, "r")
    assert shown(page) == third
    press(page, " ")
    wait_saved(page)

    assert stored(store) == {first: (SKY, "ana"), second: (ROAD, "ana"), third: (IGNORE, "ana")}
    assert page.inner_text("#progress-image") == "0 of 3 done · 3 left"  # now on the second image


def test_back_reviews_and_relabels(open_page, store):
    page = open_page("ana")
    first, second = PIXELS[:2]
    press(page, "r")  # wrong: the first pixel is sky
    press(page, "ArrowLeft")
    assert shown(page) == first and page.get_attribute("#crop", "data-mode") == "review"
    assert page.is_visible("#legend li.chosen[data-class-id='1']")
    press(page, "k")  # relabel, and carry on where we were
    assert shown(page) == second and page.get_attribute("#crop", "data-mode") == "label"
    wait_saved(page)
    assert stored(store) == {first: (SKY, "ana")}


def test_skip_sends_the_rest_of_an_image_to_the_end(open_page, store):
    page = open_page("ana")
    press(page, "Enter")
    order = []
    while (pixel := settled(page)) is not None:
        order.append(pixel[0])
        press(page, KEYS[truth(pixel)])
    wait_saved(page)
    assert order == ["images/im1.png"] * 3 + ["images/im2.png"] * 3 + ["images/im0.png"] * 3
    assert store.is_complete()


def test_reload_continues_where_it_stopped(open_page, store):
    page = open_page("ana")
    for pixel in PIXELS[:4]:
        press(page, KEYS[truth(pixel)])
    wait_saved(page)
    page.reload()
    page.wait_for_selector("#crop[data-mode=label]")

    assert shown(page) == PIXELS[4]
    assert page.inner_text("#progress-job") == "4 of 9 done · 5 left"
    press(page, "Backspace")  # the history survives the reload too
    assert shown(page) == PIXELS[3]
    wait_saved(page)
    assert set(stored(store)) == set(PIXELS[:3])


def test_two_annotators_label_disjoint_pixels(open_page, store):
    pages = {name: open_page(name) for name in ("ana", "ben")}
    labelled_by = {"ana": [], "ben": []}
    for _ in range(2 * len(PIXELS)):
        for name, page in pages.items():
            if (pixel := shown(page)) is not None:
                labelled_by[name].append(pixel)
                press(page, KEYS[truth(pixel)])
    for page in pages.values():
        wait_saved(page)

    assert labelled_by["ana"] and labelled_by["ben"]
    assert set(labelled_by["ana"]).isdisjoint(labelled_by["ben"])
    assert stored(store) == {
        pixel: (truth(pixel), name) for name, pixels in labelled_by.items() for pixel in pixels
    }
    assert store.is_complete()


def test_unknown_keys_do_nothing_but_show_a_hint(open_page, store):
    page = open_page("ana")
    before = page.get_attribute("#crop", "data-shown")
    page.keyboard.press("z")
    page.keyboard.press("Tab")
    page.wait_for_selector("#message:not([hidden])")
    assert "“z” is not a class key" in page.inner_text("#message")
    assert shown(page) == PIXELS[0] and page.get_attribute("#crop", "data-shown") == before
    assert store.done_count() == 0


def test_labels_made_offline_survive_a_reload_and_arrive_once(open_page, store):
    page = open_page("ana")
    page.on("dialog", lambda dialog: dialog.accept())  # "leave the page?": changes are pending
    reached_server = []

    def lose_answers(route):
        if not reached_server:  # the first label is stored, but its answer never comes back
            reached_server.append(route.fetch().status)
        route.abort()

    page.route("**/api/labels", lose_answers)
    for pixel in PIXELS[:3]:
        press(page, KEYS[truth(pixel)])
    page.wait_for_selector("#sync[data-state=offline]")
    assert reached_server == [201] and set(stored(store)) == {PIXELS[0]}

    page.reload()  # the outbox in memory is gone; its copy in localStorage is not
    page.wait_for_selector("#sync[data-state=offline]")  # sending them again, still blocked
    assert set(stored(store)) == {PIXELS[0]}
    page.unroute("**/api/labels")
    page.wait_for_selector("#crop[data-mode=label]")
    wait_saved(page)

    assert stored(store) == {pixel: (truth(pixel), "ana") for pixel in PIXELS[:3]}
    assert len(store.completed_labels()) == 3
    assert shown(page) == PIXELS[3]  # new pixels only after the old labels arrived
    assert page.inner_text("#progress-job") == "3 of 9 done · 6 left"
    assert page.evaluate("Object.keys(localStorage).filter(key => key.startsWith('pixelpick.pending'))") == []
    assert page.errors == []


def test_a_closed_job_refuses_labels_and_says_why(open_page, store):
    page = open_page("ana")
    press(page, KEYS[truth(PIXELS[0])])
    wait_saved(page)
    store.close("ingested into round 1")

    page.keyboard.press(KEYS[truth(PIXELS[1])])  # shown at once, then refused by the server
    page.wait_for_selector("#crop[data-mode=closed]")
    assert "ingested and is closed" in page.inner_text("#overlay")
    assert "ingested into round 1" in page.inner_text("#overlay")
    assert set(stored(store)) == {PIXELS[0]}

    page.reload()
    page.wait_for_selector("#crop[data-mode=closed]")
    assert "ingested into round 1" in page.inner_text("#overlay")
    page.keyboard.press(KEYS[SKY])
    assert set(stored(store)) == {PIXELS[0]}
    assert page.errors == []


def held_by(store: ProgressStore, annotator: str) -> set[tuple[str, int, int]]:
    import sqlite3

    with sqlite3.connect(store.path) as db:
        rows = db.execute("""SELECT p.image_id, p.y, p.x FROM pixels p LEFT JOIN labels l ON l.pixel_id = p.id
                             WHERE l.pixel_id IS NULL AND p.claimed_by = ? AND p.lease_until >= ?""",
                          (annotator, time.time())).fetchall()
    return set(rows)


def accepted_flags(store: ProgressStore) -> dict[tuple[str, int, int], tuple[int, int | None, int | None]]:
    import sqlite3

    with sqlite3.connect(store.path) as db:
        rows = db.execute("""SELECT p.image_id, p.y, p.x, l.class_id, l.suggested, l.accepted
                             FROM labels l JOIN pixels p ON p.id = l.pixel_id""").fetchall()
    return {(image_id, y, x): (class_id, suggested, accepted) for image_id, y, x, class_id, suggested, accepted in rows}


@pytest.mark.parametrize("url", [{"suggestions": SUGGESTED}], indirect=True)
def test_a_suggestion_is_highlighted_accepted_with_tab_or_overridden_by_a_class_key(open_page, store, tmp_path):
    page = open_page("ana")
    assert shown(page) == PIXELS[0]
    assert page.is_visible("#legend li.suggested[data-class-id='0']")
    assert page.locator("#legend li.suggested").count() == 1
    assert "suggests “sky”" in page.inner_text("#suggestion")
    page.screenshot(path=str(tmp_path / "suggestion.png"))
    press(page, "Tab")  # right: taken as it is
    assert shown(page) == PIXELS[1] and page.is_visible("#legend li.suggested[data-class-id='0']")
    press(page, "r")  # wrong (it is road): overridden
    assert shown(page) == PIXELS[2]
    assert page.locator("#legend li.suggested").count() == 0 and page.is_hidden("#suggestion")
    page.keyboard.press("Tab")  # no suggestion here: nothing happens
    assert shown(page) == PIXELS[2]
    press(page, "r")
    wait_saved(page)

    assert accepted_flags(store) == {
        PIXELS[0]: (SKY, SKY, 1), PIXELS[1]: (ROAD, SKY, 0), PIXELS[2]: (ROAD, None, None),
    }
    stats = store.suggestion_stats()
    assert (stats["labels"], stats["suggested"], stats["accepted"], stats["acceptance_rate"]) == (3, 2, 1, 0.5)
    assert page.errors == []


def test_the_closed_panel_shows_the_stored_count(open_page, store):
    page = open_page("ana")
    for pixel in PIXELS[:2]:
        press(page, KEYS[truth(pixel)])
    wait_saved(page)
    store.close("ingested into round 1")
    page.reload()
    page.wait_for_selector("#crop[data-mode=closed]")
    assert page.inner_text("#progress-job") == "2 of 9 done · 7 left"


def job_count_is(page, text: str, *, within: float) -> None:
    page.wait_for_function("text => document.querySelector('#progress-job').textContent === text", arg=text,
                           timeout=within * 1000)


def test_the_final_count_is_the_servers_within_seconds(open_page, store):
    ana, ben = open_page("ana"), open_page("ben")  # ana holds six pixels, ben three
    while (pixel := shown(ana)) is not None:
        press(ana, KEYS[truth(pixel)])
    for _ in range(2):
        press(ben, KEYS[truth(shown(ben))])
    wait_saved(ana), wait_saved(ben)
    job_count_is(ana, "8 of 9 done · 1 left", within=4)  # ben's labels, from the server while ana waits
    press(ben, KEYS[truth(shown(ben))])  # the last label is ben's: ana's page learns it from the server
    started = time.monotonic()
    ana.wait_for_selector("#crop[data-mode=done]", timeout=5000)
    assert time.monotonic() - started < 4
    assert ana.inner_text("#progress-job") == "9 of 9 done · 0 left"
    assert "All 9 pixels" in ana.inner_text("#overlay")


def test_a_closed_tab_gives_its_pixels_to_the_others(open_page, store):
    ana = open_page("ana")  # holds the six pixels the page claims ahead
    ben = open_page("ben")  # holds the other three
    held = held_by(store, "ana")
    assert len(held) == 6
    cleo = ana.context.browser.new_context().new_page()
    cleo.goto(ana.url.replace("annotator=ana", "annotator=cleo"))
    cleo.wait_for_selector("#crop[data-mode=waiting]")
    assert "come back in" in cleo.inner_text("#overlay")  # when ana's first pixel lapses, if she does nothing

    ana.goto("about:blank")  # pagehide: the beacon gives ana's pixels back
    deadline = time.monotonic() + 5
    while held_by(store, "ana") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held_by(store, "ana") == set()
    cleo.wait_for_selector("#crop[data-mode=label]", timeout=5000)
    got = set()
    for page in (cleo, ben):
        while (pixel := shown(page)) is not None:
            got.add(pixel)
            press(page, KEYS[truth(pixel)])
        wait_saved(page)
    assert held <= got
    assert store.is_complete()
    cleo.context.close()
