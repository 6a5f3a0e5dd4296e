"""The annotator's HTTP API: validation, conflicts, undo, resume, access control and image serving."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import yaml
from fastapi import HTTPException
from PIL import Image

from pixelpick.annotation import ProgressStore, export_job, load_job
from pixelpick.annotation.__main__ import main as cli
from pixelpick.annotation.server import create_app, resolve_inside
from pixelpick.datasets.folder import FolderDataset
from pixelpick.errors import AnnotatorConfigError
from pixelpick.labels import read_labels

with warnings.catch_warnings():  # starlette asks for httpx2 in its TestClient; httpx is what is installed
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

CLASSES = [
    {"name": "sky", "colour": [70, 130, 180], "key": "k"},
    {"name": "road", "colour": [128, 64, 128], "key": "r"},
]
IGNORE = 255
QUERIES = {"images/a.png": [(0, 0), (1, 2), (3, 5)], "images/b.png": [(2, 2)], "images/link.png": [(0, 0)]}
SECRET = b"top secret, outside the dataset root"


@pytest.fixture
def setup(tmp_path):
    """A dataset of two PNGs plus a symlink that escapes the root, a job over all three, and a progress store."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    root.joinpath("classes.yaml").write_text(yaml.safe_dump({"ignore_index": IGNORE, "classes": CLASSES}))
    for name, value in (("a.png", 40), ("b.png", 200)):
        Image.fromarray(np.full((4, 6, 3), value, np.uint8)).save(root / "images" / name)
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "outside.png")
    (root / "images" / "link.png").symlink_to(tmp_path / "outside.png")
    (tmp_path / "secret.txt").write_bytes(SECRET)
    queries = pd.DataFrame(
        [(image_id, y, x) for image_id, pixels in QUERIES.items() for y, x in pixels], columns=["image_id", "y", "x"]
    )
    dataset = FolderDataset(root, "train")
    job_path = export_job(queries, dataset, job_id="demo-r01", campaign="demo", round_id=1, path=tmp_path / "job.json")
    return {"root": root, "job_path": job_path, "db": tmp_path / "job.progress.sqlite"}


def make_client(setup, **options) -> tuple[TestClient, ProgressStore]:
    job = load_job(setup["job_path"])
    store = ProgressStore(setup["db"], job)
    # The Host allow-list accepts localhost names by default; TestClient would send "testserver".
    return TestClient(create_app(job, store, setup["root"], **options), base_url="http://localhost"), store


def label(annotator="ana", image_id="images/a.png", y=0, x=0, class_id=0, submission_id=None, **changes):
    body = {
        "annotator": annotator,
        "image_id": image_id,
        "y": y,
        "x": x,
        "class_id": class_id,
        "seconds": 0.8,
        "submission_id": submission_id or f"{annotator}-{image_id}-{y}-{x}-{class_id}",
    }
    return body | changes


def claim(client, annotator, count=10):
    response = client.post("/api/claims", json={"annotator": annotator, "count": count})
    assert response.status_code == 200
    return [(p["image_id"], p["y"], p["x"]) for p in response.json()["pixels"]]


# --- submissions --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        (b'{"annotator": "ana", "image_id"', 422, "the body is not valid JSON"),
        (label(y=4), 422, "pixel (y=4, x=0) is out of bounds of image 'images/a.png' (4x6)"),
        (label(x=-1), 422, "out of bounds"),
        (label(y=2, x=2), 422, "pixel (y=2, x=2) of image 'images/a.png' was not queried in job 'demo-r01'"),
        (label(image_id="images/zzz.png"), 422, "image 'images/zzz.png' is not in job 'demo-r01'"),
        (label(class_id=2), 422, "class 2 does not exist: classes are 0..1, or 255 for unsure"),
        (label(class_id=-1), 422, "class -1 does not exist"),
        (label(y="0"), 422, "malformed request: y: Input should be a valid integer"),
        (label(y=0.5), 422, "y: Input should be a valid integer"),
        (label(seconds=-1.0), 422, "seconds=-1.0 must be between 0 and 86400"),
        (label(annotator="../ana"), 422, "annotator: String should match pattern"),
        (label(colour="red"), 422, "colour: Extra inputs are not permitted"),
        ({"annotator": "ana"}, 422, "image_id: Field required"),
    ],
)
def test_bad_submissions_are_rejected_with_a_reason_and_store_nothing(setup, body, status, detail):
    client, store = make_client(setup)
    if isinstance(body, bytes):
        response = client.post("/api/labels", content=body, headers={"content-type": "application/json"})
    else:
        response = client.post("/api/labels", json=body)
    assert response.status_code == status
    assert detail in response.json()["detail"]
    assert store.done_count() == 0


def test_a_pixel_is_labelled_once(setup):
    client, store = make_client(setup)
    first = client.post("/api/labels", json=label(submission_id="s1"))
    assert first.status_code == 201
    assert first.json() == {"stored": True, "done": 1, "total": 5, "image_id": "images/a.png", "image_done": 1}

    retry = client.post("/api/labels", json=label(submission_id="s1"))  # the page retrying a lost response
    assert retry.status_code == 201 and retry.json()["stored"] is False

    again = client.post("/api/labels", json=label(class_id=1, submission_id="s2"))
    other = client.post("/api/labels", json=label(annotator="ben", class_id=1, submission_id="s3"))
    assert (again.status_code, other.status_code) == (409, 409)
    assert "already labelled by 'ana'" in other.json()["detail"]
    labels = store.completed_labels()
    assert list(zip(labels.annotator, labels.class_id, strict=True)) == [("ana", 0)]


def test_a_pixel_claimed_by_another_annotator_is_refused(setup):
    client, store = make_client(setup)
    image_id, y, x = claim(client, "ana", 2)[0]
    response = client.post("/api/labels", json=label("ben", image_id, y, x))
    assert response.status_code == 409
    assert "assigned to annotator 'ana'" in response.json()["detail"]
    assert store.done_count() == 0


def test_unsure_is_the_ignore_index_and_counts_as_done(setup):
    client, store = make_client(setup)
    assert client.post("/api/labels", json=label(class_id=IGNORE)).status_code == 201
    assert store.completed_labels()["class_id"].tolist() == [IGNORE]
    assert ("images/a.png", 0, 0) not in claim(client, "ana")


def test_two_annotators_never_get_the_same_pixel(setup):
    client, _ = make_client(setup)
    ana, ben = claim(client, "ana", 3), claim(client, "ben", 3)
    assert set(ana).isdisjoint(ben)
    assert ana == [("images/a.png", 0, 0), ("images/a.png", 1, 2), ("images/a.png", 3, 5)]
    assert ben == [("images/b.png", 2, 2), ("images/link.png", 0, 0)]  # everything that was left
    assert claim(client, "cy", 3) == []
    for annotator, pixels in (("ana", ana), ("ben", ben)):
        for image_id, y, x in pixels:
            assert client.post("/api/labels", json=label(annotator, image_id, y, x)).status_code == 201
    state = client.get("/api/state", params={"annotator": "ben"}).json()
    assert (state["done"], state["total"], state["my_labels"]) == (5, 5, 2)


def test_undo_relabel_and_skip(setup):
    client, store = make_client(setup)
    for y, x in QUERIES["images/a.png"][:2]:
        client.post("/api/labels", json=label(y=y, x=x))
    relabel = client.put("/api/labels", json=label(y=0, x=0, class_id=1, submission_id="r1"))
    assert relabel.status_code == 200
    assert client.put("/api/labels", json=label(annotator="ben", class_id=0)).status_code == 409

    second = {"image_id": "images/a.png", "y": 1, "x": 2}
    undone = client.post("/api/undo", json={"annotator": "ana", "expected": second})
    assert undone.status_code == 200
    assert undone.json()["pixel"] == second
    assert undone.json()["image_done"] == 1
    assert claim(client, "ana", 1) == [("images/a.png", 1, 2)]  # given back to ana first
    elsewhere = {"image_id": "images/b.png", "y": 2, "x": 2}
    mismatch = client.post("/api/undo", json={"annotator": "ana", "expected": elsewhere})
    assert mismatch.status_code == 409
    assert store.completed_labels()[["y", "x", "class_id"]].values.tolist() == [[0, 0, 1]]

    skipped = client.post("/api/skip", json={"annotator": "ana", "image_id": "images/a.png"})
    assert skipped.json()["released"] == 1
    assert claim(client, "ana", 4)[0] == ("images/b.png", 2, 2)
    assert client.post("/api/undo", json={"annotator": "nobody"}).status_code == 409


def test_resume_after_the_app_is_recreated_on_the_same_database(setup):
    client, _ = make_client(setup)
    held = claim(client, "ana", 4)
    for image_id, y, x in held[:2]:
        client.post("/api/labels", json=label("ana", image_id, y, x, class_id=1))
    del client  # the server is killed

    client, store = make_client(setup)
    state = client.get("/api/state", params={"annotator": "ana"}).json()
    assert (state["done"], state["done_by_image"], state["my_labels"]) == (2, {"images/a.png": 2}, 2)
    assert [(h["image_id"], h["y"], h["x"], h["class_id"]) for h in state["history"]] == [
        (*held[0], 1), (*held[1], 1)
    ]
    assert claim(client, "ana", 2) == held[2:4]  # the same pixels, in the same order
    assert store.done_count() == 2


# --- images and access ----------------------------------------------------------------------------------------------


def test_images_of_the_job_are_served(setup):
    client, _ = make_client(setup)
    response = client.get("/api/images/images/a.png")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.content == (setup["root"] / "images" / "a.png").read_bytes()


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/api/images/../secret.txt", 404),  # the client normalises this one away
        ("/api/images/images/../../secret.txt", 404),
        ("/api/images/%2e%2e/secret.txt", 404),
        ("/api/images/images/%2e%2e/%2e%2e/secret.txt", 404),
        ("/api/images/..%2fsecret.txt", 404),
        ("/api/images//etc/passwd", 404),
        ("/api/images/%2Fetc%2Fpasswd", 404),
        ("/api/images/classes.yaml", 404),  # inside the root but not in the job
        ("/api/images/images/link.png", 403),  # in the job, but a symlink out of the root
    ],
)
def test_image_requests_cannot_escape_the_job_or_the_root(setup, path, status):
    client, _ = make_client(setup)
    response = client.get(path)
    assert response.status_code == status
    assert SECRET not in response.content and b"root:" not in response.content


@pytest.mark.parametrize("image_id", ["../secret.txt", "images/../../secret.txt", "/etc/passwd", "images/link.png"])
def test_paths_are_resolved_inside_the_root_even_for_ids_in_a_job(setup, image_id):
    # The second line of defence, should a job ever hold such an id.
    with pytest.raises(HTTPException) as raised:
        resolve_inside(setup["root"].resolve(), image_id)
    assert raised.value.status_code == 403


def test_token_is_required_for_every_request_when_configured(setup):
    client, _ = make_client(setup, token="s3cret")
    for path in ("/", "/api/job", "/api/state?annotator=ana", "/api/images/images/a.png", "/static/annotator.js"):
        assert client.get(path).status_code == 401, path
    assert client.post("/api/labels", json=label()).status_code == 401
    assert client.get("/api/job", headers={"X-PixelPick-Token": "wrong"}).status_code == 401

    assert client.get("/api/job", headers={"X-PixelPick-Token": "s3cret"}).status_code == 200
    assert client.get("/api/job", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    page = client.get("/?token=s3cret")  # the link an annotator is given
    assert page.status_code == 200 and "pixelpick_token" in page.headers["set-cookie"]
    assert client.post("/api/labels", json=label()).status_code == 201  # the page's requests carry the cookie


def test_job_description_carries_the_remapped_keys(setup):
    client, _ = make_client(setup, class_keys=["q", "w"], default_annotator="ana")
    job = client.get("/api/job").json()
    assert [(c["name"], c["key"]) for c in job["classes"]] == [("sky", "q"), ("road", "w")]
    assert job["default_annotator"] == "ana"
    assert [i["pixels"] for i in job["images"]] == [3, 1, 1]
    assert job["dataset"] == {"name": "FolderDataset"}  # not the dataset's root: no server path leaves the server
    assert job["closed"] is None


def test_a_wrong_dataset_root_fails_at_start(setup, tmp_path):
    job = load_job(setup["job_path"])
    with pytest.raises(AnnotatorConfigError, match="3 of 3 images of job 'demo-r01' are missing"):
        create_app(job, ProgressStore(setup["db"], job), tmp_path / "elsewhere")


# --- command line ---------------------------------------------------------------------------------------------------


def test_cli_exports_labels_and_refuses_a_weak_token_for_a_public_host(setup, tmp_path, monkeypatch, capsys):
    client, _ = make_client(setup)
    for image_id, pixels in QUERIES.items():
        for y, x in pixels:
            client.post("/api/labels", json=label("ana", image_id, y, x, class_id=1))
    out = tmp_path / "batch.parquet"
    cli(["export-labels", "--job", str(setup["job_path"]), "--out", str(out)])
    assert len(read_labels(out)) == 5

    monkeypatch.delenv("PIXELPICK_ANNOTATOR_TOKEN", raising=False)
    with pytest.raises(SystemExit, match="the access token is 6 characters; serving on '0.0.0.0' needs at least 16"):
        cli(["serve", "--job", str(setup["job_path"]), "--host", "0.0.0.0", "--token", "s3cret"])
    with pytest.raises(SystemExit, match="key 'r' of class 'road' collides with class 'sky'"):
        cli(["serve", "--job", str(setup["job_path"]), "--keys", "sky=r"])

    cli(["split-job", "--job", str(setup["job_path"]), "--batches", "2", "--out-dir", str(tmp_path / "batches")])
    batches = sorted((tmp_path / "batches").iterdir())
    assert [path.name for path in batches] == ["demo-r01-1of2.json", "demo-r01-2of2.json"]
    assert sum(load_job(path).num_pixels for path in batches) == 5


# --- suggestions and fair leases -------------------------------------------------------------------------------


def test_pixels_carry_the_suggestion_and_an_accepted_label_must_match_it(setup):
    suggestions = {("images/a.png", 0, 0): 1, ("images/a.png", 1, 2): 0}
    client, store = make_client(setup, suggestions=suggestions)
    pixels = client.post("/api/claims", json={"annotator": "ana", "count": 3}).json()["pixels"]
    assert [pixel["suggested"] for pixel in pixels] == [1, 0, None]
    assert client.get("/api/job").json()["suggestions"] is True

    wrong = client.post("/api/labels", json=label(y=0, x=0, class_id=0, accepted=True))
    assert wrong.status_code == 422 and "the suggestion is class 1, not 0" in wrong.json()["detail"]
    none = client.post("/api/labels", json=label(y=3, x=5, class_id=0, accepted=True))
    assert none.status_code == 422 and "none was made" in none.json()["detail"]
    assert store.done_count() == 0

    assert client.post("/api/labels", json=label(y=0, x=0, class_id=1, accepted=True)).status_code == 201
    assert client.post("/api/labels", json=label(y=1, x=2, class_id=1)).status_code == 201  # overridden
    assert client.post("/api/labels", json=label(y=3, x=5, class_id=1)).status_code == 201  # nothing suggested
    stats = store.suggestion_stats()
    assert stats == {"labels": 3, "seconds_per_label": pytest.approx(0.8), "suggested": 2, "accepted": 1,
                     "acceptance_rate": 0.5, "agreement_rate": 0.5}


def test_an_older_progress_database_gains_the_suggestion_columns(setup):
    import sqlite3

    client, store = make_client(setup)
    assert client.post("/api/labels", json=label()).status_code == 201
    with sqlite3.connect(setup["db"]) as db:  # as a database made before suggestions existed
        db.execute("ALTER TABLE labels DROP COLUMN suggested")
        db.execute("ALTER TABLE labels DROP COLUMN accepted")
    client, store = make_client(setup, suggestions={("images/a.png", 1, 2): 0})
    assert client.post("/api/labels", json=label(y=1, x=2, class_id=0, accepted=True)).status_code == 201
    assert store.suggestion_stats()["suggested"] == 1 and store.suggestion_stats()["labels"] == 2
    assert len(store.completed_labels()) == 2


def test_a_closing_page_gives_its_pixels_back_by_beacon(setup):
    token = "Zq8Tn3Vw0Lr5Xb2Kj7Hd4Fs9Gm1Pc6Ya"
    client, store = make_client(setup, token=token)
    client.cookies.clear()
    headers = {"x-pixelpick-token": token}
    held = client.post("/api/claims", json={"annotator": "ana", "count": 3}, headers=headers).json()["pixels"]
    beacon = '{"annotator": "ana"}'  # what navigator.sendBeacon sends: text/plain, no headers of ours
    plain = {"content-type": "text/plain;charset=UTF-8"}
    assert client.post("/api/release", content=beacon, headers=plain).status_code == 401
    assert client.post("/api/release?token=bad", content=beacon, headers=plain).status_code == 401
    released = client.post(f"/api/release?token={token}", content=beacon, headers=plain)
    assert released.status_code == 200 and released.json() == {"released": 3}
    malformed = client.post(f"/api/release?token={token}", content='{"who": 1}', headers=plain)
    assert malformed.status_code == 422 and malformed.json()["detail"].startswith("malformed request")
    taken = client.post("/api/claims", json={"annotator": "ben", "count": 3}, headers=headers).json()["pixels"]
    assert taken == held


def test_pixels_of_a_page_not_heard_from_for_60_s_go_to_the_others_who_are_told_when(setup):
    now = [1000.0]
    job = load_job(setup["job_path"])
    store = ProgressStore(setup["db"], job, clock=lambda: now[0])
    client = TestClient(create_app(job, store, setup["root"]), base_url="http://localhost")
    ana = claim(client, "ana", 3)
    ben = claim(client, "ben", 2)
    waiting = client.post("/api/claims", json={"annotator": "cleo", "count": 3}).json()
    assert waiting["pixels"] == [] and waiting["next_release_s"] == 60.0

    now[0] += 30
    beat = client.post("/api/heartbeat", json={"annotator": "ana"})  # ana's page is open; ben's was closed
    assert beat.status_code == 200 and beat.json()["done"] == 0 and beat.json()["next_release_s"] == 30.0
    now[0] += 31  # 61 s after ben was last heard from
    assert claim(client, "cleo", 3) == ben
    assert client.post("/api/claims", json={"annotator": "cleo", "count": 5}).json()["next_release_s"] == 29.0
    now[0] += 30
    assert set(claim(client, "cleo", 5)) == set(ben + ana)
