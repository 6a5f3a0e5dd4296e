"""The annotator exposed to a network: body limits, the Host allow-list, token strength, no server paths in
answers, JSON for every failure, per-annotator quotas and rate limits, and closed jobs."""

from __future__ import annotations

import asyncio
import re
import secrets
import sqlite3
import warnings
from pathlib import Path

import pytest
from fastapi.routing import APIRoute

from pixelpick.annotation import ProgressStore, load_job
from pixelpick.annotation.__main__ import main as cli
from pixelpick.annotation.guards import MIN_TOKEN_BITS, RateLimiter, choose_token, host_name, token_bits
from pixelpick.annotation.server import DEFAULT_MAX_HELD, MAX_CLAIM, STATIC_DIR, create_app
from pixelpick.errors import AnnotatorConfigError
from tests.test_annotation_api import QUERIES, claim, label, make_client, setup  # noqa: F401 (setup: a fixture)

with warnings.catch_warnings():  # starlette asks for httpx2 in its TestClient; httpx is what is installed
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

LIMIT = 1024


def call_asgi(app, method: str, path: str, headers: dict[str, str], chunks: list[bytes]) -> tuple[int, bytes, int]:
    """Send one request straight to the ASGI app, its body in `chunks`; returns status, body and how many body
    bytes the app pulled in."""
    pulled = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal pulled
        if not chunks:
            return {"type": "http.disconnect"}
        chunk = chunks.pop(0)
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(name.encode(), value.encode()) for name, value in {"host": "localhost", **headers}.items()],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8765),
    }
    asyncio.run(app(scope, receive, send))
    status = next(message["status"] for message in sent if message["type"] == "http.response.start")
    body = b"".join(message.get("body", b"") for message in sent if message["type"] == "http.response.body")
    return status, body, pulled


def app_for(setup, **options):  # noqa: F811
    job = load_job(setup["job_path"])
    return create_app(job, ProgressStore(setup["db"], job), setup["root"], **options)


# --- request bodies -------------------------------------------------------------------------------------------------


def test_a_declared_oversized_body_is_refused_before_a_byte_is_read(setup):  # noqa: F811
    app = app_for(setup, max_body_bytes=LIMIT)
    chunks = [b"x" * 65536] * 800  # 50 MiB, should anyone read it
    headers = {"content-type": "application/json", "content-length": str(65536 * 800)}
    status, body, pulled = call_asgi(app, "POST", "/api/labels", headers, chunks)
    assert status == 413
    assert "larger than this annotator accepts (1024 bytes)" in body.decode()
    assert pulled == 0


def test_a_streamed_oversized_body_is_cut_off_at_the_limit(setup):  # noqa: F811
    app = app_for(setup, max_body_bytes=LIMIT)
    chunks = [b"x" * 256] * 4096  # 1 MiB without a declared length (chunked transfer encoding)
    status, body, pulled = call_asgi(app, "POST", "/api/labels", {"content-type": "application/json"}, chunks)
    assert status == 413
    assert "larger than this annotator accepts (1024 bytes)" in body.decode()
    assert pulled <= LIMIT + 256  # it stopped reading at the first chunk past the limit


def test_the_default_limit_refuses_large_bodies_but_not_the_pages(setup):  # noqa: F811
    client, store = make_client(setup)
    huge = client.post("/api/labels", content=b"{" + b" " * 70_000 + b"}", headers={"content-type": "application/json"})
    assert huge.status_code == 413 and "65536 bytes" in huge.json()["detail"]
    assert client.post("/api/labels", json=label(submission_id="s" * 64)).status_code == 201
    assert store.done_count() == 1


def test_a_malformed_content_length_is_refused(setup):  # noqa: F811
    status, body, pulled = call_asgi(app_for(setup), "POST", "/api/labels", {"content-length": "12abc"}, [b"{}"])
    assert (status, pulled) == (400, 0)
    assert "Content-Length '12abc' is not a number" in body.decode()


# --- Host header ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["localhost", "localhost:8765", "LOCALHOST", "127.0.0.1", "127.0.0.1:80", "[::1]",
                                  "[::1]:8765"])
def test_localhost_names_are_accepted_by_default(setup, host):  # noqa: F811
    client, _ = make_client(setup)
    assert client.get("/api/job", headers={"host": host}).status_code == 200


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8765", "localhost.attacker.example",
                                  "127.0.0.2", "0.0.0.0:8765"])
def test_other_host_names_are_refused_in_json(setup, host):  # noqa: F811
    client, store = make_client(setup)
    for response in (client.get("/api/job", headers={"host": host}),
                     client.post("/api/labels", json=label(), headers={"host": host})):
        assert response.status_code == 421
        assert f"does not answer to the host name {host_name(host)!r}" in response.json()["detail"]
    assert store.done_count() == 0


@pytest.mark.parametrize("host", ["", "user@localhost", "localhost/x", "[::1", "local host", "::1", "[1::2::3]"])
def test_malformed_host_headers_are_refused(setup, host):  # noqa: F811
    client, _ = make_client(setup)
    response = client.get("/api/job", headers={"host": host})
    assert response.status_code == 400
    assert "Host header" in response.json()["detail"]


def test_the_host_check_comes_before_the_token(setup):  # noqa: F811
    client, _ = make_client(setup, token="t" * 20)
    assert client.get("/api/job", headers={"host": "attacker.example"}).status_code == 421  # not even a 401


def test_configured_hosts_are_accepted(setup):  # noqa: F811
    client, _ = make_client(setup, allowed_hosts=["annotate.lab.example", "[fd00::5]:443", "10.0.0.7", "::"])
    for host in ("annotate.lab.example:8765", "[fd00::5]", "[FD00:0::5]:80", "10.0.0.7:8765", "[::]", "localhost"):
        assert client.get("/api/job", headers={"host": host}).status_code == 200, host
    assert client.get("/api/job", headers={"host": "[fd00::6]"}).status_code == 421
    with pytest.raises(AnnotatorConfigError, match="allowed host 'bad host' is not a host name or address"):
        app_for(setup, allowed_hosts=["bad host"])


# --- tokens ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.5"])
def test_a_token_is_optional_on_loopback(host):
    assert choose_token(host, None) == (None, False)
    assert choose_token(host, "") == (None, False)  # an empty environment variable is "not set"
    assert choose_token(host, "short") == ("short", False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "annotate.example.org"])
def test_a_public_bind_needs_a_strong_token_or_gets_one(host):
    strong = secrets.token_urlsafe(32)
    assert choose_token(host, strong) == (strong, False)
    generated, was_generated = choose_token(host, None)
    assert was_generated and len(generated) >= 32 and re.fullmatch(r"[A-Za-z0-9_-]+", generated)
    assert choose_token(host, None)[0] != generated
    with pytest.raises(AnnotatorConfigError, match=f"the access token is 15 characters; serving on {host!r} "
                                                   f"needs at least 16"):
        choose_token(host, "k" * 15)


STRONG = "YQe9hHEPunV81RLGmtDXkwCNlKDLnaOG"  # secrets.token_urlsafe(24), as `serve` generates


@pytest.mark.parametrize("token", [
    "aaaaaaaaaaaaaaaa", "1234567890123456", "k" * 40, "1234567890" * 6, "abcabcabcabcabcabcabcabcabcabcabc",
    "passwordpassword" * 3, "Tr0ub4dor&3xyzab",
])
@pytest.mark.parametrize("host", ["0.0.0.0", "annotate.example.org"])
def test_a_public_bind_refuses_a_token_without_real_entropy_in_one_line(host, token):
    with pytest.raises(AnnotatorConfigError) as refused:
        choose_token(host, token)
    message = str(refused.value)
    assert "\n" not in message and f"needs at least {MIN_TOKEN_BITS}" in message and "bits of entropy" in message
    assert choose_token("127.0.0.1", token) == (token, False)  # on this machine only, any token will do


def test_random_tokens_pass_the_entropy_estimate():
    for _ in range(200):
        for token in (secrets.token_urlsafe(24), secrets.token_urlsafe(32), secrets.token_hex(32)):
            assert token_bits(token) >= MIN_TOKEN_BITS, token
    assert token_bits(STRONG) >= MIN_TOKEN_BITS


@pytest.mark.parametrize("token", ["   ", " " + "k" * 20, "k" * 20 + "\n", "\t"])
def test_blank_or_padded_tokens_are_refused_everywhere(token):
    for host in ("127.0.0.1", "0.0.0.0"):
        with pytest.raises(AnnotatorConfigError, match="blank or starts or ends with whitespace"):
            choose_token(host, token)


def serve_captured(setup, monkeypatch, capsys, *args: str):  # noqa: F811
    """Run `serve` with uvicorn replaced: returns the app it would serve and what it printed."""
    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.update(app=app, **options))
    monkeypatch.delenv("PIXELPICK_ANNOTATOR_TOKEN", raising=False)
    cli(["serve", "--job", str(setup["job_path"]), "--dataset-root", str(setup["root"]), *args])
    return served, capsys.readouterr().out


def test_serving_publicly_without_a_token_generates_one_and_prints_its_link(setup, monkeypatch, capsys):  # noqa: F811
    served, out = serve_captured(setup, monkeypatch, capsys, "--host", "0.0.0.0", "--allowed-host", "lab.example")
    assert served["host"] == "0.0.0.0"
    assert "generated an access token" in out
    token = re.search(r"http://lab\.example:8765/\?token=([A-Za-z0-9_-]+)", out)[1]
    assert len(token) >= 32
    client = TestClient(served["app"], base_url="http://lab.example:8765")
    assert client.get("/api/job").status_code == 401
    assert client.get("/api/job", headers={"X-PixelPick-Token": token}).status_code == 200
    other = client.get("/api/job", headers={"X-PixelPick-Token": token, "host": "elsewhere.example"})
    assert other.status_code == 421
    assert client.get("/api/job", headers={"X-PixelPick-Token": token, "host": "0.0.0.0:8765"}).status_code == 200


def test_serving_on_every_ipv6_address_links_with_brackets(setup, monkeypatch, capsys):  # noqa: F811
    served, out = serve_captured(setup, monkeypatch, capsys, "--host", "::", "--token", STRONG)
    assert "generated" not in out and f"http://[::]:8765/?token={STRONG}" in out
    client = TestClient(served["app"], base_url="http://[::]:8765")
    assert client.get("/api/job", headers={"X-PixelPick-Token": STRONG}).status_code == 200


def test_serving_locally_needs_no_token(setup, monkeypatch, capsys):  # noqa: F811
    served, out = serve_captured(setup, monkeypatch, capsys, "--max-held", "3", "--rate-limit", "5")
    assert "token" not in out and "http://127.0.0.1:8765/" in out
    client = TestClient(served["app"], base_url="http://127.0.0.1:8765")
    assert len(claim(client, "ana", 5)) == 3


@pytest.mark.parametrize(("option", "message"), [
    (["--token", "short"], "the access token is 5 characters"),
    (["--allowed-host", "a b"], "allowed host 'a b' is not a host name"),
    (["--max-held", "0"], "must be positive"),
    (["--rate-limit", "0"], "the rate limit must be a positive number"),
])
def test_bad_serve_options_stop_with_one_line(setup, monkeypatch, capsys, option, message):  # noqa: F811
    with pytest.raises(SystemExit) as stopped:
        serve_captured(setup, monkeypatch, capsys, "--host", "0.0.0.0", *option)
    assert message in str(stopped.value.code) and "\n" not in str(stopped.value.code)


# --- no server paths in any answer ----------------------------------------------------------------------------------


def test_no_answer_names_a_path_on_the_server(setup):  # noqa: F811
    client, _ = make_client(setup)
    app = client.app
    secrets = {str(setup["root"]), str(setup["root"].resolve()), str(setup["job_path"].parent), str(setup["db"])}
    paths = []
    for route in app.routes:
        if isinstance(route, APIRoute) and "GET" in route.methods:
            for image_id in ("images/a.png", "images/link.png", "nope.png", "../secret.txt"):
                paths.append(route.path.replace("{image_id:path}", image_id) + "?annotator=ana")
    paths += [f"/static/{path.name}" for path in STATIC_DIR.iterdir()] + ["/static/missing.js", "/nowhere"]
    assert "/api/job?annotator=ana" in paths and "/api/state?annotator=ana" in paths
    client.post("/api/labels", json=label())  # some state to describe
    answers = [client.get(path) for path in paths]
    answers += [client.post("/api/labels", json=label(y=9)), client.post("/api/claims", json={"annotator": "x"}),
                client.put("/api/job")]
    for response in answers:
        text = response.content.decode(errors="replace")
        assert not [secret for secret in secrets if secret in text], response.url
        if response.headers["content-type"].startswith("application/json"):
            assert not re.search(r"(?<![\w.])/(tmp|home|root|work|var|usr|etc)/", text), response.url


# --- JSON for every failure -----------------------------------------------------------------------------------------


def test_unknown_paths_and_wrong_methods_answer_json(setup):  # noqa: F811
    client, _ = make_client(setup)
    missing = client.get("/api/nothing")
    assert missing.status_code == 404 and missing.json() == {"detail": "there is nothing at /api/nothing"}
    wrong = client.delete("/api/labels")
    assert wrong.status_code == 405
    assert "DELETE is not allowed on /api/labels" in wrong.json()["detail"]
    assert set(wrong.headers["allow"].replace(" ", "").split(",")) == {"POST", "PUT"}
    assert client.get("/api/claims").status_code == 405


def test_an_internal_error_answers_json_without_internals(setup, monkeypatch):  # noqa: F811
    job = load_job(setup["job_path"])
    store = ProgressStore(setup["db"], job)

    def broken(*args, **kwargs):
        raise RuntimeError(f"secret detail in {setup['db']}")

    monkeypatch.setattr(store, "claim", broken)
    client = TestClient(create_app(job, store, setup["root"]), base_url="http://localhost",
                        raise_server_exceptions=False)
    response = client.post("/api/claims", json={"annotator": "ana", "count": 2})
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert "internal error" in response.json()["detail"]
    assert "secret" not in response.text and str(setup["db"]) not in response.text


def test_a_locked_progress_database_answers_503_with_retry_after(setup):  # noqa: F811
    job = load_job(setup["job_path"])
    store = ProgressStore(setup["db"], job, busy_timeout=0.05)
    client = TestClient(create_app(job, store, setup["root"]), base_url="http://localhost",
                        raise_server_exceptions=False)
    other_writer = sqlite3.connect(setup["db"], isolation_level=None)
    other_writer.execute("BEGIN IMMEDIATE")
    try:
        response = client.post("/api/labels", json=label())
        assert response.status_code == 503
        assert response.headers["retry-after"] == "2"
        assert "progress database is busy" in response.json()["detail"]
        assert str(setup["db"]) not in response.text
    finally:
        other_writer.execute("ROLLBACK")
        other_writer.close()
    assert client.post("/api/labels", json=label()).status_code == 201  # the page's retry then succeeds
    assert store.done_count() == 1


def test_other_database_errors_are_a_plain_internal_error(setup, monkeypatch):  # noqa: F811
    job = load_job(setup["job_path"])
    store = ProgressStore(setup["db"], job)

    def failing(*args, **kwargs):
        raise sqlite3.OperationalError(f"disk I/O error at {setup['db']}")

    monkeypatch.setattr(store, "record", failing)
    client = TestClient(create_app(job, store, setup["root"]), base_url="http://localhost",
                        raise_server_exceptions=False)
    response = client.post("/api/labels", json=label())
    assert response.status_code == 500 and "internal error" in response.json()["detail"]
    assert "I/O" not in response.text


# --- quotas and rate limits -----------------------------------------------------------------------------------------


def test_one_name_cannot_take_every_pixel(setup):  # noqa: F811
    client, _ = make_client(setup, max_held=2)
    ana = claim(client, "ana", 5)
    assert len(ana) == 2
    assert claim(client, "ana", 5) == ana  # asking again gives nothing more
    assert len(claim(client, "ben", 5)) == 2
    assert len(claim(client, "cy", 5)) == 1  # the last one
    image_id, y, x = ana[0]
    assert client.post("/api/labels", json=label("ana", image_id, y, x)).status_code == 201
    assert claim(client, "ana", 5) == ana[1:]  # nothing left to top up from, but the cap allows one more


def test_the_default_cap_leaves_room_for_the_page():
    assert 6 < DEFAULT_MAX_HELD <= MAX_CLAIM  # the page holds about six pixels ahead of the one on screen


def test_requests_beyond_the_rate_limit_answer_429_with_retry_after(setup):  # noqa: F811
    client, store = make_client(setup, rate_limit=1)  # bursts of 3
    answers = [client.post("/api/claims", json={"annotator": "ana", "count": 1}) for _ in range(3)]
    assert [answer.status_code for answer in answers] == [200, 200, 200]
    refused = client.post("/api/labels", json=label())
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    assert "'ana' is sending more than 1 requests per second" in refused.json()["detail"]
    assert store.done_count() == 0  # nothing was stored for the refused request
    assert client.get("/api/state", params={"annotator": "ana"}).status_code == 429
    assert client.get("/api/state", params={"annotator": "ben"}).status_code == 200  # per name
    assert client.get("/api/job").status_code == 200  # no name, no limit: the page and images always load


def test_the_default_rate_limit_lets_a_page_catch_up_after_a_reload(setup):  # noqa: F811
    client, store = make_client(setup)
    # A reload: the job, the state, a dozen labels left from the last visit, then claims, all at once.
    statuses = [client.get("/api/state", params={"annotator": "ana"}).status_code]
    for image_id, pixels in QUERIES.items():
        for y, x in pixels:
            statuses.append(client.post("/api/labels", json=label("ana", image_id, y, x)).status_code)
            statuses.append(client.post("/api/labels", json=label("ana", image_id, y, x)).status_code)  # retried
    statuses += [client.post("/api/claims", json={"annotator": "ana", "count": 6}).status_code for _ in range(20)]
    assert set(statuses) <= {200, 201}
    assert store.is_complete()


def test_rate_limiter_refills_over_time():
    now = [0.0]
    limiter = RateLimiter(2.0, burst=2, clock=lambda: now[0])
    assert [limiter.wait("ana") for _ in range(2)] == [0.0, 0.0]
    assert limiter.wait("ana") == pytest.approx(0.5)
    assert limiter.wait("ben") == 0.0
    now[0] += 0.5
    assert limiter.wait("ana") == 0.0
    now[0] += 10  # idle: back to a full burst, never more
    assert [limiter.wait("ana") for _ in range(3)] == [0.0, 0.0, pytest.approx(0.5)]


def test_rate_limiter_forgets_idle_names():
    now = [0.0]
    limiter = RateLimiter(1.0, burst=1, clock=lambda: now[0])
    limiter.MAX_NAMES = 3
    for name in "abc":
        limiter.wait(name)
    now[0] += 5
    limiter.wait("d")
    assert set(limiter._buckets) == {"d"}


# --- closed jobs ----------------------------------------------------------------------------------------------------


def test_a_closed_job_refuses_every_change_with_409_saying_when(setup):  # noqa: F811
    client, store = make_client(setup)
    image_id, y, x = claim(client, "ana", 2)[0]
    assert client.post("/api/labels", json=label("ana", image_id, y, x, submission_id="first")).status_code == 201
    closed = store.close("ingested into round 1")

    changes = [
        client.post("/api/labels", json=label("ana", "images/a.png", 1, 2)),
        client.put("/api/labels", json=label("ana", image_id, y, x, class_id=1)),
        client.post("/api/undo", json={"annotator": "ana"}),
        client.post("/api/claims", json={"annotator": "ben", "count": 2}),
        client.post("/api/skip", json={"annotator": "ana", "image_id": "images/a.png"}),
    ]
    for response in changes:
        assert response.status_code == 409, response.request.url
        body = response.json()
        assert "was ingested and is closed since" in body["detail"]
        assert "ingested into round 1" in body["detail"]
        assert body["closed"] == {"closed_at": closed.closed_at.isoformat(), "note": "ingested into round 1"}
    assert store.completed_labels()[["y", "x", "class_id"]].values.tolist() == [[y, x, 0]]

    # Reading still works, and a retry of a label stored before the close is acknowledged, not refused.
    assert client.get("/api/job").json()["closed"]["note"] == "ingested into round 1"
    assert client.get("/api/state", params={"annotator": "ana"}).json()["done"] == 1
    retry = client.post("/api/labels", json=label("ana", image_id, y, x, submission_id="first"))
    assert retry.status_code == 201 and retry.json()["stored"] is False


def test_paths_of_the_test_setup_are_absolute(setup):  # noqa: F811
    # The path check above only means something if the job names an absolute root.
    assert Path(load_job(setup["job_path"]).dataset.root).is_absolute()
