"""``/``: the try-it page and its static files over HTTP, and the model list it starts from. The page in a
real browser is tested in ``tests/browser``."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import httpx
import tomllib

from service.routes.page import FILES, STATIC

from .conftest import serve

ROOT = Path(__file__).resolve().parents[2]


async def test_the_page_and_its_files_are_served_with_their_types(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy
    html = page.text
    assert 'src="static/app.js"' in html and 'href="static/app.css"' in html
    assert 'href="docs"' in html and 'href="metrics"' in html
    for name, media_type in (("app.js", "text/javascript"), ("app.css", "text/css")):
        response = await client.get(f"/static/{name}")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith(media_type)
        assert response.content == (STATIC / name).read_bytes()


async def test_unknown_page_files_are_json_404s(client: httpx.AsyncClient) -> None:
    for path in ("/static/missing.js", "/static/index.html", "/static/..%2Froutes%2Fpage.py", "/static/%2E%2E"):
        response = await client.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"], path
    for name in ("missing.js", "index.html"):  # the page itself is at /, where its relative links work
        error = (await client.get(f"/static/{name}")).json()["error"]
        assert error == f"no page file {name!r}; open / for the page, /docs for the API"


def test_the_page_loads_nothing_from_elsewhere() -> None:
    """It must work offline: no CDN, no web font, no absolute URL in anything it loads."""
    assert {"index.html", "app.css", "app.js"} <= set(FILES)
    for path in FILES.values():
        text = path.read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.IGNORECASE), path.name
        assert "@import" not in text and "url(" not in text, path.name


def test_the_page_files_ship_in_the_wheel() -> None:
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["service"]
    for path in FILES.values():
        relative = path.relative_to(STATIC.parent).as_posix()
        assert any(fnmatch.fnmatch(relative, g) for g in globs), f"{relative} is not in package-data"


async def test_models_are_listed_with_the_default(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/models")
    assert response.status_code == 200
    assert response.json() == {"default": "tiny", "models": ["tiny", "tiny-norm"]}


async def test_the_page_is_public_while_the_api_it_calls_needs_the_key(tiny_onnx: Path) -> None:
    async with serve(models=[str(tiny_onnx)], api_key="secret") as client:
        assert (await client.get("/")).status_code == 200
        assert (await client.get("/static/app.js")).status_code == 200
        refused = await client.get("/v1/models")
        assert refused.status_code == 401
        assert "missing or wrong API key" in refused.json()["error"]
        allowed = await client.get("/v1/models", headers={"authorization": "Bearer secret"})
        assert allowed.json() == {"default": "tiny", "models": ["tiny"]}
