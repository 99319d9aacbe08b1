"""A FHIR server for tests: http.server in a thread that validates every resource with fhir.resources.

It takes transaction Bundles at its base URL (conditional updates keyed by identifier, so a
re-send replaces instead of adding), answers 401 without the right bearer token, and can be told
to refuse (``refuse = 400`` or ``503``...) or be stopped and started again on the same port.
"""

from __future__ import annotations

import json
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from tests.support.peers import free_port
from tests.support.threaded_server import ThreadedPeer

TOKEN = "test-fhir-token-0123456789abcdef"
# Value sets the models do not check (they take any code): the ones our Bundle must get right.
VALUE_SETS = {
    ("DiagnosticReport", "status"): {"registered", "partial", "preliminary", "final", "amended"},
    ("Observation", "status"): {"registered", "preliminary", "final", "amended"},
    ("Task", "status"): {"draft", "requested", "received", "accepted", "ready", "in-progress"},
    ("Task", "intent"): {"unknown", "proposal", "plan", "order", "original-order"},
    ("Task", "priority"): {"routine", "urgent", "asap", "stat"},
}


def problems_of(bundle: Any) -> list[str]:
    """What is wrong with a transaction Bundle: the Bundle and every resource validated as R4(B)."""
    found = []
    try:
        get_fhir_model_class("Bundle").model_validate(bundle)
    except ValidationError as exc:
        found.append(f"Bundle: {exc}")
    if bundle.get("type") != "transaction":
        found.append(f"Bundle.type is {bundle.get('type')!r}")
    for index, entry in enumerate(bundle.get("entry", [])):
        resource = entry.get("resource", {})
        kind = resource.get("resourceType", "?")
        try:
            get_fhir_model_class(kind).model_validate(resource)
        except (ValidationError, KeyError, ValueError) as exc:
            found.append(f"entry {index} ({kind}): {exc}")
        for (of, key), allowed in VALUE_SETS.items():
            if kind == of and resource.get(key) not in allowed:
                found.append(f"entry {index}: {kind}.{key} {resource.get(key)!r} not in its value set")
        if entry.get("request", {}).get("method") not in ("POST", "PUT"):
            found.append(f"entry {index}: request.method {entry.get('request')!r}")
    return found


@dataclass
class FhirPeer(ThreadedPeer):
    port: int = field(default_factory=free_port)
    refuse: int | None = None  # answer this HTTP status to every POST
    tls: ssl.SSLContext | None = None  # a server context: HTTPS
    posts: list[dict[str, Any]] = field(default_factory=list)  # every Bundle received
    problems: list[str] = field(default_factory=list)
    stored: dict[str, dict[str, Any]] = field(default_factory=dict)  # conditional URL -> resource
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/fhir"

    def handle(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, dict[str, Any]]:
        if headers.get("Authorization") != f"Bearer {TOKEN}":
            return 401, _outcome("security", "bearer token missing or wrong")
        if method == "GET" and path == "/fhir/metadata":
            return 200, {"resourceType": "CapabilityStatement", "status": "active", "kind": "instance"}
        if method != "POST" or path != "/fhir":
            return 404, _outcome("not-found", path)
        if not headers.get("Content-Type", "").startswith("application/fhir+json"):
            return 415, _outcome("invalid", "Content-Type must be application/fhir+json")
        bundle = json.loads(body)
        with self._lock:
            self.posts.append(bundle)
            if self.refuse is not None:
                return self.refuse, _outcome("processing", f"refused by the test ({self.refuse})")
            found = problems_of(bundle)
            self.problems += found
            if found:
                return 400, _outcome("invalid", "; ".join(found)[:1000])
            answers = []
            for entry in bundle["entry"]:
                key = entry["request"]["url"]
                status = "200 OK" if key in self.stored else "201 Created"
                self.stored[key] = entry["resource"]
                answers.append({"response": {"status": status}})
        return 200, {"resourceType": "Bundle", "type": "transaction-response", "entry": answers}

    def start(self) -> None:
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                status, answer = peer.handle(self.command, self.path, self.headers, self.rfile.read(length))
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = _serve
            do_POST = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._serve(ThreadingHTTPServer(("127.0.0.1", self.port), Handler), "fhir-peer", self.tls)

    def resources(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.stored.values() if r["resourceType"] == kind]


def _outcome(code: str, text: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": text}],
    }
