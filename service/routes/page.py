"""``/``: a page to try the served models in a browser. Hand-written HTML, CSS and JavaScript shipped in
the package (``service/static``), no build step and nothing fetched from elsewhere, so it works offline.
The page itself is public; it calls ``/v1`` and ``/v2`` with the API key typed into it, like any client."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from ..errors import not_found

STATIC = Path(__file__).resolve().parent.parent / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
# Everything the page loads comes from this server; pictures the user picks are shown from blob: URLs.
POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {"Content-Security-Policy": POLICY, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

router = APIRouter(tags=["page"], include_in_schema=False)


def _files() -> dict[str, Path]:
    """The files the page may serve: the flat contents of ``service/static`` with a known type."""
    if not STATIC.is_dir():
        return {}
    return {p.name: p for p in sorted(STATIC.iterdir()) if p.is_file() and p.suffix in MEDIA_TYPES}


FILES = _files()


def _serve(name: str, page: bool = False) -> FileResponse:
    path = FILES.get(name)
    if path is None or (path.suffix == ".html") != page:
        hint = "" if FILES else " (service/static is missing from this install; reinstall the package)"
        raise not_found(f"no page file {name!r}{hint}; open / for the page, /docs for the API")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)


@router.get("/")
def index() -> FileResponse:
    """The try-it page."""
    return _serve("index.html", page=True)


@router.get("/static/{name}")
def static_file(name: str) -> FileResponse:
    """The page's stylesheet and script."""
    return _serve(name)
