"""The try-it page end to end: a real server process with the digits demo model, headless Chromium, real
uploads. What a person sees: the model's metadata, each image with its top-5 bars and latency, the API's
own message for a refused file, the API-key field working against a server that has a key, digits drawn
on the pad with the mouse and by touch, and the samples built into the page."""

from __future__ import annotations

import base64
import itertools
import json
import re
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, FilePayload, JSHandle, Locator, Page, Request, expect

from service.registry import DEMO_MODEL

from ..service.harness import server_process
from .conftest import digit_png, is_png

TEXT_FILE = FilePayload(name="notes.txt", mimeType="text/plain", buffer=b"this is not an image\n")
KEY = "page-test-key"

# Digits as a person draws them on the pad: strokes of points, in fractions of the pad's side.
SEVEN = [[(0.24, 0.2), (0.76, 0.2), (0.44, 0.84)]]  # the bar, then down to the foot without lifting the pen
FOUR = [[(0.56, 0.14), (0.26, 0.6), (0.8, 0.6)], [(0.66, 0.34), (0.66, 0.88)]]  # open 4, two strokes
ONE = [[(0.4, 0.3), (0.54, 0.14), (0.54, 0.86)]]
PAD_IS_BLANK = (
    "(() => { const c = document.getElementById('pad'); return c.getContext('2d')"
    ".getImageData(0, 0, c.width, c.height).data.every((v) => v === 255); })()"
)


class Watched:
    """A page with its JavaScript errors, console errors and requests recorded."""

    def __init__(self, page: Page, base: str) -> None:
        self.page = page
        self.base = base
        self.page_errors: list[str] = []
        self.console_errors: list[str] = []
        self.requests: list[str] = []
        page.on("pageerror", lambda exc: self.page_errors.append(str(exc)))
        page.on("console", self._console)
        page.on("request", self._request)
        page.set_default_timeout(20_000)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console_errors.append(message.text)

    def _request(self, request: Request) -> None:
        self.requests.append(request.url)

    def check_clean(self) -> None:
        """No script error, nothing blocked by the page's security policy, nothing fetched from elsewhere."""
        assert not self.page_errors, self.page_errors
        blocked = [m for m in self.console_errors if "Content Security Policy" in m or "Refused to" in m]
        assert not blocked, blocked
        foreign = [u for u in self.requests if not u.startswith((self.base, "blob:", "data:"))]
        assert not foreign, foreign


@pytest.fixture
def tab(chromium: Browser) -> Iterator[Page]:
    context = chromium.new_context(viewport={"width": 1100, "height": 900}, device_scale_factor=1)
    try:
        yield context.new_page()
    finally:
        context.close()


def api_json(base: str, path: str, key: str | None = None) -> dict:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    with urllib.request.urlopen(urllib.request.Request(base + path, headers=headers), timeout=30) as response:
        return json.loads(response.read())


def card(page: Page, filename: str) -> Locator:
    return page.locator(".result").filter(has=page.locator(".filename", has_text=re.compile(f"^{filename}$")))


def transfer_of(page: Page, name: str, data: bytes) -> JSHandle:
    """A DataTransfer holding one PNG file, as dragging or pasting it gives the page."""
    return page.evaluate_handle(
        """([name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "image/png" }));
            return transfer;
        }""",
        [name, base64.b64encode(data).decode()],
    )


def drop_file(page: Page, name: str, data: bytes) -> None:
    """Drops a file on the drop zone as a person dragging it from a file manager would."""
    transfer = transfer_of(page, name, data)
    page.dispatch_event("#drop", "dragenter", {"dataTransfer": transfer})
    expect(page.locator("#drop")).to_have_class(re.compile(r"\bover\b"))
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    expect(page.locator("#drop")).not_to_have_class(re.compile(r"\bover\b"))


def paste_file(page: Page, name: str, data: bytes) -> None:
    """Pastes an image into the page, as after copying it in an image viewer."""
    transfer = transfer_of(page, name, data)
    page.evaluate(
        "(t) => document.dispatchEvent(new ClipboardEvent('paste', { clipboardData: t, bubbles: true }))", transfer
    )


def expect_prediction(page: Page, filename: str, digit: int) -> None:
    result = card(page, filename)
    expect(result).to_have_class(re.compile(r"\bdone\b"), timeout=30_000)
    expect(result.locator(".predictions li")).to_have_count(5)
    expect(result.locator(".predictions li.best .label")).to_have_text(str(digit))
    expect(result.locator(".latency")).to_have_text(re.compile(r"^\d+ ms$"))
    assert result.locator("img").evaluate("img => img.complete && img.naturalWidth > 0"), "the image is shown"


def test_page_classifies_uploaded_and_dropped_digits_and_shows_refusals(tab: Page, artifacts: Path) -> None:
    page = tab
    with server_process() as (port, _):
        base = f"http://127.0.0.1:{port}"
        seen = Watched(page, base)
        page.goto(base + "/")
        expect(page).to_have_title(re.compile("stageformer"))

        # The model's metadata, as the v2 metadata route gives it.
        meta = api_json(base, "/v2/models/digits")["parameters"]
        expect(page.locator("#model")).to_have_value("digits")
        expect(page.locator("#model-info")).to_be_visible()
        expect(page.locator("#meta-input")).to_contain_text("24×24 RGB")
        expect(page.locator("#meta-classes")).to_have_text("10: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9")
        expect(page.locator("#meta-provider")).to_have_text(meta["provider"])
        expect(page.locator("#meta-batching")).to_contain_text(f"up to {meta['max_batch_size']} images per run")
        assert meta["max_batch_size_measured"]  # the demo serves with --max-batch-size auto, the default
        expect(page.locator("#meta-batching")).to_contain_text("measured when the model loaded")
        for link, path in (("#docs-link", "/docs"), ("#metrics-link", "/metrics")):
            href = page.locator(link).evaluate("a => a.href")
            assert href == base + path
            assert page.request.get(href).status == 200

        # Two images chosen at once: each shown with its top 5 and its latency; scores as the API gives them.
        (three, three_png), (seven, seven_png) = digit_png(3), digit_png(7)
        assert (three, seven) == (3, 7)
        page.set_input_files(
            "#files",
            [
                FilePayload(name="three.png", mimeType="image/png", buffer=three_png),
                FilePayload(name="seven.png", mimeType="image/png", buffer=seven_png),
            ],
        )
        expect_prediction(page, "three.png", 3)
        expect_prediction(page, "seven.png", 7)
        answer = httpx.post(base + "/v1/classify", files={"file": ("three.png", three_png, "image/png")}).json()
        best = answer["results"][0]["predictions"][0]
        shown = card(page, "three.png").locator(".predictions li.best .score")
        expect(shown).to_have_text(f"{100 * best['score']:.1f}%")

        # One image dropped on the drop zone.
        zero, zero_png = digit_png(0)
        drop_file(page, "zero.png", zero_png)
        expect_prediction(page, "zero.png", zero)
        expect(page.locator(".result").first.locator(".filename")).to_have_text("zero.png")  # newest first

        # One image pasted.
        one, one_png = digit_png(1)
        paste_file(page, "one.png", one_png)
        expect_prediction(page, "one.png", one)

        # A text file: the API refuses it, and the page shows the API's own message.
        refusal = httpx.post(base + "/v1/classify", files={"file": ("notes.txt", TEXT_FILE["buffer"], "text/plain")})
        assert refusal.status_code == 415
        message = refusal.json()["error"]
        assert "not an image" in message
        page.set_input_files("#files", TEXT_FILE)
        refused = card(page, "notes.txt")
        expect(refused).to_have_class(re.compile(r"\bfailed\b"))
        expect(refused.locator(".error")).to_have_text(message)
        expect(refused.locator(".latency")).to_have_text(re.compile(r"^HTTP 415 · \d+ ms$"))
        expect(refused.locator(".predictions li")).to_have_count(0)
        expect(page.locator(".result.done")).to_have_count(4)  # the earlier results stay

        shot = page.screenshot(path=str(artifacts / "page-demo.png"), full_page=True)
        assert is_png(shot)
        seen.check_clean()

        page.click("#clear")
        expect(page.locator(".result")).to_have_count(0)


def test_page_asks_for_the_api_key_and_works_with_it(tab: Page, artifacts: Path, tmp_path: Path) -> None:
    page = tab
    second = tmp_path / "digits-copy" / "1" / "model.onnx"  # a second model, named by its folder
    second.parent.mkdir(parents=True)
    shutil.copyfile(DEMO_MODEL, second)
    with server_process(str(DEMO_MODEL), str(second), STAGEFORMER_API_KEY=KEY) as (port, _):
        base = f"http://127.0.0.1:{port}"
        seen = Watched(page, base)
        page.goto(base + "/")  # the page itself needs no key
        notice = page.locator("#notice")
        expect(notice).to_contain_text("missing or wrong API key")
        expect(page.locator("#api-key")).to_have_attribute("aria-invalid", "true")
        expect(page.locator("#model-info")).to_be_hidden()
        page.screenshot(path=str(artifacts / "page-api-key-missing.png"))

        page.fill("#api-key", "wrong-key")
        page.click("#key-apply")
        expect(notice).to_contain_text("missing or wrong API key")
        expect(page.locator("#model-info")).to_be_hidden()

        page.fill("#api-key", KEY)
        page.press("#api-key", "Enter")
        expect(page.locator("#model-info")).to_be_visible()
        expect(notice).to_be_hidden()
        assert api_json(base, "/v1/models", KEY) == {"default": "digits", "models": ["digits", "digits-copy"]}
        expect(page.locator("#model option")).to_have_text(["digits (default)", "digits-copy"])

        four, four_png = digit_png(4)
        page.set_input_files("#files", FilePayload(name="four.png", mimeType="image/png", buffer=four_png))
        expect_prediction(page, "four.png", four)
        expect(card(page, "four.png").locator(".model")).to_have_text("digits")

        page.select_option("#model", "digits-copy")  # picking the model: its metadata, then its endpoint
        expect(page.locator("#model-name")).to_have_text("digits-copy")
        expect(page.locator("#endpoint")).to_have_text("/v1/models/digits-copy/classify")
        page.set_input_files("#files", FilePayload(name="four-again.png", mimeType="image/png", buffer=four_png))
        expect_prediction(page, "four-again.png", four)
        expect(card(page, "four-again.png").locator(".model")).to_have_text("digits-copy")

        page.reload()  # the key is kept for the browser tab's session, and so is the model picked
        expect(page.locator("#api-key")).to_have_value(KEY)
        expect(page.locator("#model")).to_have_value("digits-copy")
        expect(page.locator("#model-name")).to_have_text("digits-copy")
        page.set_input_files("#files", TEXT_FILE)
        expect(card(page, "notes.txt").locator(".error")).to_contain_text("not an image in a supported format")

        shot = page.screenshot(path=str(artifacts / "page-api-key.png"), full_page=True)
        assert is_png(shot)
        seen.check_clean()


def draw_with_mouse(page: Page, strokes: list[list[tuple[float, float]]]) -> None:
    """Draws on the pad with the mouse: button down, moves in small steps along each stroke, button up."""
    box = page.locator("#pad").bounding_box()
    assert box is not None
    for points in strokes:
        page.mouse.move(box["x"] + points[0][0] * box["width"], box["y"] + points[0][1] * box["height"])
        page.mouse.down()
        for x, y in points[1:]:
            page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"], steps=12)
        page.mouse.up()


def draw_with_touch(page: Page, strokes: list[list[tuple[float, float]]]) -> None:
    """Draws on the pad with a finger: the pointer events a touch screen sends (pointerType "touch")."""
    dense = []
    for points in strokes:
        path = [points[0]]
        for (x0, y0), (x1, y1) in itertools.pairwise(points):
            path += [(x0 + (x1 - x0) * t / 12, y0 + (y1 - y0) * t / 12) for t in range(1, 13)]
        dense.append(path)
    page.evaluate(
        """(strokes) => {
            const pad = document.getElementById("pad");
            const box = pad.getBoundingClientRect();
            const send = (type, [x, y], buttons) => pad.dispatchEvent(new PointerEvent(type, {
                pointerId: 11, pointerType: "touch", isPrimary: true, bubbles: true, cancelable: true, buttons,
                clientX: box.left + x * box.width, clientY: box.top + y * box.height,
            }));
            for (const points of strokes) {
                send("pointerdown", points[0], 1);
                for (const point of points.slice(1)) send("pointermove", point, 1);
                send("pointerup", points[points.length - 1], 0);
            }
        }""",
        dense,
    )


def test_page_reads_digits_drawn_on_the_pad_and_its_samples(tab: Page, artifacts: Path) -> None:
    page = tab
    with server_process() as (port, _):
        base = f"http://127.0.0.1:{port}"
        seen = Watched(page, base)
        page.goto(base + "/")
        expect(page.locator("#model-info")).to_be_visible()
        assert page.evaluate(PAD_IS_BLANK)
        expect(page.locator("#pad-send")).to_be_disabled()
        expect(page.locator("#pad-clear")).to_be_disabled()

        # A 7 drawn with the mouse, sent: a card like an upload's, with 7 on top.
        draw_with_mouse(page, SEVEN)
        assert not page.evaluate(PAD_IS_BLANK)
        expect(page.locator("#pad-send")).to_be_enabled()
        page.click("#pad-send")
        expect_prediction(page, "drawing-1.png", 7)
        page.screenshot(path=str(artifacts / "page-drawn-7.png"), full_page=True)

        # What was sent is a PNG of the pad, and the API says the same of it as the card shows.
        url = page.evaluate("document.getElementById('pad').toDataURL('image/png')")
        drawing = base64.b64decode(url.split(",", 1)[1])
        assert is_png(drawing)
        answer = httpx.post(base + "/v1/classify", files={"file": ("drawing.png", drawing, "image/png")}).json()
        best = answer["results"][0]["predictions"][0]
        assert best["label"] == "7"
        shown = card(page, "drawing-1.png").locator(".predictions li.best .score")
        expect(shown).to_have_text(f"{100 * best['score']:.1f}%")

        # Clearing leaves white paper; a 4 in two strokes, then a 1 drawn by touch.
        page.click("#pad-clear")
        assert page.evaluate(PAD_IS_BLANK)
        expect(page.locator("#pad-send")).to_be_disabled()
        draw_with_mouse(page, FOUR)
        page.click("#pad-send")
        expect_prediction(page, "drawing-2.png", 4)
        page.click("#pad-clear")
        draw_with_touch(page, ONE)
        page.click("#pad-send")
        expect_prediction(page, "drawing-3.png", 1)

        # The samples built into the page: each a click away from its answer.
        samples = page.evaluate("window.STAGEFORMER_SAMPLES")
        assert len(samples) == 3
        expect(page.locator(".sample img")).to_have_count(3)
        for sample in samples:
            button = page.locator(f'.sample[data-name="{sample["name"]}"]')
            assert button.locator("img").evaluate("img => img.complete && img.naturalWidth > 0")
            button.click()
            expect_prediction(page, sample["name"], int(sample["label"]))

        shot = page.screenshot(path=str(artifacts / "page-pad-and-samples.png"), full_page=True)
        assert is_png(shot)
        seen.check_clean()
