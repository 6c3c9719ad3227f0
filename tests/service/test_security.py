"""Security: the API key guards every inference and metadata route and is compared in constant time;
model names in URLs never reach the filesystem; checkpoints and models are never unpickled; no
response carries a stack trace."""

from __future__ import annotations

import hmac
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from fastapi.routing import APIRoute

import service.security

from .conftest import png, serve
from .harness import ROOT, live_server

OPEN_ROUTES = {"/v2/health/live", "/v2/health/ready"}  # probes answer without the key, as in KServe and Triton
PNG_TYPE = {"content-type": "image/png"}


def all_routes(routes: list[Any]) -> Iterator[Any]:
    """Every route of an app, through included routers (which FastAPI may keep as one entry each)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        yield from all_routes(included.routes) if included is not None else [route]


def guarded_requests(app: Any) -> list[tuple[str, str]]:
    """(method, path) of every /v1 and /v2 route but the health probes, path parameters filled in."""
    found = []
    for route in all_routes(app.routes):
        if not isinstance(route, APIRoute) or not route.path.startswith(("/v1", "/v2")) or route.path in OPEN_ROUTES:
            continue
        path = route.path.replace("{model}", "tiny").replace("{version}", "1")
        found += [(method, path) for method in sorted(route.methods)]
    return found


async def test_the_api_key_guards_every_inference_and_metadata_route(tiny_onnx: Path) -> None:
    async with serve(models=[str(tiny_onnx)], api_key="s3cret-key") as c:
        routes = guarded_requests(c.app)  # type: ignore[attr-defined]
        assert len(routes) >= 10, routes  # classify x2, server and model metadata, readiness, infer, versions
        wrong = [
            {},
            {"authorization": "Bearer nope"},
            {"authorization": "Bearer s3cret-key-and-more"},
            {"authorization": "Bearer s3cret-ke"},
            {"authorization": "Basic s3cret-key"},
            {"authorization": "s3cret-key"},
            {"authorization": "Bearer"},
            {"x-api-key": "s3cret-key"},
        ]
        for method, path in routes:
            for headers in wrong:
                response = await c.request(method, path, headers={**PNG_TYPE, **headers}, content=png())
                assert response.status_code == 401, (method, path, headers, response.text)
                assert response.headers["www-authenticate"] == "Bearer"
                assert "API key" in response.json()["error"]
            right = await c.request(method, path, headers={**PNG_TYPE, "authorization": "Bearer s3cret-key"},
                                    content=png())  # fmt: skip
            assert right.status_code != 401, (method, path)
        in_url = await c.post("/v1/classify?api_key=s3cret-key", content=png(), headers=PNG_TYPE)
        assert in_url.status_code == 401  # never taken from the URL
        for path in OPEN_ROUTES:
            assert (await c.get(path)).status_code == 200
        ok = await c.post("/v1/classify", content=png(), headers={**PNG_TYPE, "authorization": "bearer  s3cret-key "})
        assert ok.status_code == 200  # the scheme is case-insensitive, spaces around the key are ignored


async def test_the_key_comparison_takes_the_same_path_whatever_the_key(
    tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every check goes through hmac.compare_digest on two SHA-256 digests: equal lengths, constant
    time, so neither the key's content nor its length can be learnt from timing."""
    compared: list[tuple[int, int]] = []
    compare = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return compare(a, b)

    monkeypatch.setattr(service.security.hmac, "compare_digest", spy)
    async with serve(models=[str(tiny_onnx)], api_key="k" * 40) as c:
        tokens = ["", "k", "k" * 39, "k" * 40, "k" * 41, "x" * 10_000, "Basic " + "k" * 40]
        for token in tokens:
            await c.post("/v1/classify", content=png(), headers={**PNG_TYPE, "authorization": f"Bearer {token}"})
    assert compared == [(32, 32)] * len(tokens)


AUDIT_SCRIPT = r"""
import asyncio, json, os, pickle, sys, pathlib
import httpx
from model import load_checkpoint
from service import create_app
from service.runtime import ModelLoadError, OnnxModel
from service.settings import Settings

checkpoint, onnx_file, workdir = sys.argv[1:4]
marker = pathlib.Path(workdir) / "unpickled"
events = {"load": [], "attack": []}
phase = ["load"]

def hook(event, args):
    if event == "pickle.find_class" or event == "open" or event.startswith(("os.", "shutil.", "subprocess.")):
        events[phase[0]].append([event, repr(args)[:200]])

class Payload:  # unpickling this would create the marker file
    def __reduce__(self):
        return (pathlib.Path.touch, (marker,))

evil = pickle.dumps(Payload())
for name in ("evil.safetensors", "evil.onnx"):
    (pathlib.Path(workdir) / name).write_bytes(evil)
sys.addaudithook(hook)

refused = []
for call, path in ((load_checkpoint, "evil.safetensors"), (OnnxModel, "evil.onnx")):
    try:
        call(str(pathlib.Path(workdir) / path))
    except (ValueError, ModelLoadError, RuntimeError, OSError) as exc:
        refused.append(type(exc).__name__)
load_checkpoint(checkpoint)

names = ["..%2F..%2Fetc%2Fpasswd", "%2E%2E", "..%2Ftiny", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "%2Fetc%2Fpasswd",
         "tiny%00", "tiny.onnx", "tiny%2F..%2Ftiny", "~root", "C:%5CWindows%5Cwin.ini",
         onnx_file.replace("/", "%2F"), "%252e%252e%252f", "tiny%20", "TINY"]

async def main():
    app = create_app(Settings(models=[onnx_file]))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            png = open(sys.argv[4], "rb").read()
            warm = await c.post("/v1/classify", content=png, headers={"content-type": "image/png"})
            await c.get("/v2/models/nope")
            phase[0] = "attack"
            replies = []
            for name in names:
                for method, path in (("GET", f"/v2/models/{name}"), ("GET", f"/v2/models/{name}/ready"),
                                     ("POST", f"/v2/models/{name}/infer"), ("POST", f"/v1/models/{name}/classify")):
                    r = await c.request(method, path, content=png, headers={"content-type": "image/png"})
                    replies.append([method, path, r.status_code, r.text])
            phase[0] = "after"
            events["after"] = []
    return warm.status_code, replies

warm, replies = asyncio.run(main())
print(json.dumps({"warm": warm, "replies": replies, "events": events, "refused": refused,
                  "unpickled": marker.exists()}))
"""


def test_no_pickle_is_ever_loaded_and_model_names_never_reach_the_filesystem(model_dir: Path, tmp_path: Path) -> None:
    """In a fresh process with an audit hook: a pickle planted as a checkpoint and as an ONNX file is
    refused without being unpickled, loading a real checkpoint and serving unpickle nothing, and
    requests naming models like paths open no file at all."""
    image = tmp_path / "image.png"
    image.write_bytes(png())
    args = [str(model_dir / "tiny.safetensors"), str(model_dir / "onnx" / "tiny.onnx"), str(tmp_path), str(image)]
    result = subprocess.run(
        [sys.executable, "-c", AUDIT_SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["warm"] == 200
    assert not report["unpickled"] and len(report["refused"]) == 2, report["refused"]
    opened = [e[1] for e in report["events"]["load"] if e[0] == "open"]
    assert any(args[3] in e for e in opened), "the audit hook was listening: it saw the image file being read"
    every_event = report["events"]["load"] + report["events"]["attack"]
    assert not [e for e in every_event if e[0] == "pickle.find_class"], "something was unpickled"
    assert report["events"]["attack"] == [], "a request naming a model touched the filesystem"
    model_file = args[1]
    for method, path, status, text in report["replies"]:
        assert status == 404, (method, path, status, text)
        assert "error" in json.loads(text)
        assert model_file not in text or model_file in unquote(path), "an error revealed where the model lies"


async def test_unexpected_errors_answer_500_without_details(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.oip
    import service.pipeline

    # as a server does: take the answer; the error itself goes on to the server's log
    transport = httpx.ASGITransport(app=client.app, raise_app_exceptions=False)  # type: ignore[attr-defined]
    client = httpx.AsyncClient(transport=transport, base_url="http://test")

    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret detail at /srv/private/config.py line 12")

    monkeypatch.setattr(service.pipeline, "top_k", explode)
    monkeypatch.setattr(service.oip, "classification_strings", explode)
    body = {"inputs": [{"name": "image", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": [0] * 3072}],
            "outputs": [{"name": "logits", "parameters": {"classification": 1}}]}  # fmt: skip
    for response in (
        await client.post("/v1/classify", content=png(), headers=PNG_TYPE),
        await client.post("/v2/models/tiny/infer", json=body),
    ):
        assert response.status_code == 500
        assert response.json() == {"error": "internal server error; the server logged the details"}
        assert "secret" not in response.text and "Traceback" not in response.text


def test_malformed_http_gets_a_plain_400_from_the_server_without_details(tiny_onnx: Path) -> None:
    import socket

    with live_server(models=[str(tiny_onnx)]) as live:
        for garbage in (b"GARBAGE\r\n\r\n", b"POST /v1/classify HTTP/1.1\r\nContent-Length: x\r\n\r\n"):
            with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
                sock.sendall(garbage)
                answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
            assert b"Traceback" not in answer and b"File " not in answer
