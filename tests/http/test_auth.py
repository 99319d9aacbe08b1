"""Who may see and do what, over real HTTP against a running ``serve``.

Every API route listed in the OpenAPI document answers 401 without a token or with a wrong one
(and shows no data), 403 to a read token on an admin route; pages send a stranger to the login;
a login with the token gives a signed session cookie; cross-origin POSTs are refused; health
endpoints are open on loopback unless the config closes them; without configured tokens, ``serve``
makes one in ``<home>/api-token`` (0600) and says where.
"""

from __future__ import annotations

import re
import socket
import ssl
import stat
from pathlib import Path

import httpx
import pytest
from openapi_spec_validator import validate

from storage.db import make_engine, make_session_factory
from storage.queue import JobQueue
from tests.support.http import (
    ADMIN_TOKEN,
    HEAD_CT,
    READ_TOKEN,
    HttpNode,
    queued_job,
    start_http_node,
    study_uid,
)
from tests.support.peers import storescu
from tests.support.pki import Pki
from tests.support.service import start_service

pytestmark = pytest.mark.peer


def _api_routes(node: HttpNode) -> list[tuple[str, str]]:
    spec = httpx.get(node.base_url + "/openapi.json").json()
    return [
        (method.upper(), re.sub(r"\{[^}]+\}", "1", path))
        for path, item in spec["paths"].items()
        if path.startswith("/api/")
        for method in item
    ]


def test_openapi_is_valid_and_every_route_needs_the_right_token(
    http_nodes: list[HttpNode], tmp_path: Path
) -> None:
    node = start_http_node(tmp_path)
    http_nodes.append(node)
    spec = httpx.get(node.base_url + "/openapi.json").json()
    validate(spec)  # raises with the offending part when the document is not valid OpenAPI 3.1
    retry = spec["paths"]["/api/v1/jobs/{job_id}/retry"]["post"]["responses"]
    assert {"200", "401", "403", "404", "409"} <= set(retry), "the error answers are documented"
    assert "Error" in spec["components"]["schemas"] and "Study" in spec["components"]["schemas"]
    assert httpx.get(node.base_url + "/docs").status_code == 200
    routes = _api_routes(node)
    posts = [r for r in routes if r[0] == "POST"]
    assert len(posts) >= 7 and len(routes) >= 12, routes

    anonymous, stranger = node.client(token=None), node.client(token="not-a-token-of-this-node-at-all")
    malformed = node.client(token=None, headers={"Authorization": f"Basic {ADMIN_TOKEN}"})
    for method, path in routes:
        for client in (anonymous, stranger, malformed):
            response = client.request(method, path)
            assert response.status_code == 401, (method, path, response.text)
            assert set(response.json()) == {"detail"}, "a 401 carries no data"
            assert response.headers["www-authenticate"] == "Bearer"
        as_reader = node.reader.request(method, path)
        if method == "POST":
            assert as_reader.status_code == 403, (method, path, as_reader.text)
            assert "viewer" in as_reader.json()["detail"]
        else:
            assert as_reader.status_code in (200, 404), (method, path, as_reader.text)
        assert node.admin.request(method, path).status_code not in (401, 403), (method, path)

    # Health: open on loopback, no token needed.
    assert anonymous.get("/healthz").json() == {"status": "alive"}
    assert anonymous.get("/readyz").status_code in (200, 503)


def test_pages_login_session_and_cross_origin_posts(http_nodes: list[HttpNode], tmp_path: Path) -> None:
    node = start_http_node(tmp_path)
    http_nodes.append(node)
    db = node.service.database_url
    out = storescu(node.service.port, HEAD_CT)
    assert out.returncode == 0, out.stderr
    job = queued_job(db, study_uid(HEAD_CT))
    engine = make_engine(db)
    queue = JobQueue(make_session_factory(engine))
    claim = queue.claim("http-test-worker")
    assert claim is not None
    queue.fail(claim, "simulated", permanent=False)  # dead (max_attempts 1)

    browser = node.client(token=None, follow_redirects=False)
    for page in ("/", "/worklist", "/failures", "/studies/1"):
        response = browser.get(page)
        assert response.status_code == 303 and response.headers["location"].startswith("/login?next=")
    # A wrong token: no cookie, the form again with the reason.
    wrong = browser.post(
        "/login", data={"token": "guess-guess-guess-guess"}, headers={"Origin": node.base_url}
    )
    assert wrong.status_code == 401 and "unknown token" in wrong.text and not browser.cookies
    # The read token logs in; its cookie opens the pages and the API, not the admin routes.
    ok = browser.post(
        "/login", data={"token": READ_TOKEN, "next": "/failures"}, headers={"Origin": node.base_url}
    )
    assert ok.status_code == 303 and ok.headers["location"] == "/failures"
    cookie = ok.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert browser.get("/worklist").status_code == 200
    assert browser.get("/api/v1/studies").status_code == 200
    failures = browser.get("/failures").text
    assert (
        f'data-job-id="{job}"' in failures
        and "button" not in failures.split("<main>")[1].split("Not routed")[0]
    )
    assert browser.post(f"/api/v1/jobs/{job}/retry", headers={"Origin": node.base_url}).status_code == 403

    # The admin token's session may retry, but only from this origin.
    admin = node.client(token=None, follow_redirects=False)
    admin.post("/login", data={"token": ADMIN_TOKEN}, headers={"Origin": node.base_url})
    for headers in ({"Origin": "http://evil.example"}, {"Referer": "http://evil.example/page"}, {}):
        refused = admin.post(f"/api/v1/jobs/{job}/retry", headers=headers)
        assert refused.status_code == 403 and "cross-origin" in refused.text, headers
    assert queue.get(job).state.value == "dead", "a refused request changes nothing"
    # A bearer token with a foreign Origin is refused too (a browser would send it).
    assert (
        node.admin.post(f"/api/v1/jobs/{job}/retry", headers={"Origin": "http://evil.example"}).status_code
        == 403
    )
    done = admin.post(f"/api/v1/jobs/{job}/retry", headers={"Origin": node.base_url})
    assert done.status_code == 200 and done.json()["job"]["state"] == "queued"
    assert queue.get(job).state.value == "queued"

    # Logging out ends the session; a tampered cookie is nobody.
    admin.post("/logout", headers={"Origin": node.base_url})
    assert admin.get("/worklist").status_code == 303
    forged = node.client(token=None, follow_redirects=False)
    forged.cookies.set("pacs_triage_session", ok.headers["set-cookie"].split(";")[0].split("=", 1)[1] + "x")
    assert forged.get("/api/v1/studies").status_code == 401
    engine.dispose()


def test_health_endpoints_can_require_a_token(http_nodes: list[HttpNode], tmp_path: Path) -> None:
    node = start_http_node(tmp_path, health_open=False)
    http_nodes.append(node)
    anonymous = node.client(token=None)
    for path in ("/healthz", "/readyz"):
        assert anonymous.get(path).status_code == 401
        assert node.reader.get(path).status_code in (200, 503)


def test_serve_creates_a_private_admin_token_on_first_start(
    http_nodes: list[HttpNode], tmp_path: Path
) -> None:
    node = start_http_node(tmp_path, configured_tokens=False)
    http_nodes.append(node)
    token_file = node.service.home / "api-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert f"admin token created in {token_file}" in node.service.log_text()
    token = token_file.read_text().strip()
    assert len(token) >= 32 and token not in node.service.log_text()
    assert node.client(token).get("/api/v1/jobs").status_code == 200
    assert node.client(token).post("/api/v1/dead/retry").json() == {"jobs": [], "deliveries": []}
    assert node.client(ADMIN_TOKEN).get("/api/v1/jobs").status_code == 401


def test_https_with_the_configured_certificate(http_nodes: list[HttpNode], tmp_path: Path, pki: Pki) -> None:
    node = start_http_node(
        tmp_path,
        env={
            "PACS_TRIAGE_HTTP__CERTIFICATE": str(pki.server_cert),
            "PACS_TRIAGE_HTTP__PRIVATE_KEY": str(pki.server_key),
        },
        scheme="https",
        verify=ssl.create_default_context(cafile=str(pki.ca)),
    )
    http_nodes.append(node)
    assert node.base_url.startswith("https://")
    assert node.admin.get("/api/v1/jobs").status_code == 200
    with pytest.raises(httpx.HTTPError):
        httpx.get(node.base_url.replace("https://", "http://") + "/healthz", timeout=5)
    with pytest.raises(httpx.ConnectError):  # an untrusted server certificate is refused by the client
        httpx.get(
            node.base_url + "/healthz",
            timeout=5,
            verify=ssl.create_default_context(cafile=str(pki.rogue_cert)),
        )
    # The session cookie of a login over HTTPS is marked Secure.
    login = node.client(token=None, follow_redirects=False).post(
        "/login", data={"token": ADMIN_TOKEN}, headers={"Origin": node.base_url}
    )
    assert login.status_code == 303 and "secure" in login.headers["set-cookie"].lower()


def test_a_taken_http_port_stops_serve_with_a_clear_message(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = start_service(tmp_path, env={"PACS_TRIAGE_HTTP__LISTEN": f"127.0.0.1:{port}"}, wait=False)
        try:
            assert service.process.wait(timeout=60) == 1
        finally:
            service.kill9()
    log = service.log_text()
    assert f"HTTP server could not listen on 127.0.0.1:{port}" in log and "PACS_TRIAGE_HTTP__LISTEN" in log
    assert "Traceback" not in log
