"""Headless Chromium (Debian's ``chromium`` package) driven by Playwright, and helpers for the page tests.

Playwright cannot download a browser of its own here, so it drives the system's ``/usr/bin/chromium``;
``.ci/run`` installs that package. Screenshots go to ``tests/artifacts/`` (ignored by git)."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, sync_playwright

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="package")
def chromium() -> Iterator[Browser]:
    """A headless Chromium browser; the tests skip (with the reason) only when Chromium is not installed.

    Package-scoped, not session-scoped: Playwright's sync API keeps an event loop running in this thread
    while it is open, and the async tests of other packages need the thread free of one."""
    if not CHROMIUM.exists() and shutil.which("chromium") is None:
        pytest.skip("Chromium is not installed (apt-get install chromium); .ci/run installs it")
    executable = str(CHROMIUM) if CHROMIUM.exists() else shutil.which("chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def digit_png(index: int, size: int = 96) -> tuple[int, bytes]:
    """scikit-learn's digit number ``index`` drawn as the demo model was trained on it: (label, PNG bytes)."""
    from sklearn.datasets import load_digits

    from model.data import render_digit

    digits = load_digits()
    buffer = io.BytesIO()
    render_digit(np.asarray(digits.images[index]), size).save(buffer, format="PNG")
    return int(digits.target[index]), buffer.getvalue()


def is_png(data: bytes) -> bool:
    return Image.open(io.BytesIO(data)).format == "PNG"
