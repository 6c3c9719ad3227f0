"""Bad input, all of it at once while another client keeps sending good requests: every bad request
gets its documented 4xx status and a JSON error, every good one succeeds, and the server is healthy
afterwards. Then the images that look odd but are valid, and the proof that a pixel bomb is refused
before any pixel is decoded."""

from __future__ import annotations

import asyncio
import functools
import io
import json
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image, ImageFile

from service.errors import Kind, ServiceError
from service.images import prepare
from stageformer.core.preprocess import PreprocessConfig

from .conftest import png, serve

MAX_PIXELS = 1_000_000
MAX_BODY = 200_000
PNG_TYPE = {"content-type": "image/png"}


# --- crafted files ---------------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.cache
def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height black pixels: a few hundred kB that decode to gigabytes."""
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed pixels
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height and holds almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")
    )


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def photo(size: tuple[int, int] = (40, 30), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def flipped(data: bytes, start: int, count: int) -> bytes:
    damaged = bytearray(data)
    for i in range(start, start + count):
        damaged[i] ^= 0xFF
    return bytes(damaged)


JPEG = encode(photo(), "JPEG", quality=90)
PNG = encode(photo(), "PNG")


def corrupt_jpeg_tables() -> bytes:
    damaged = bytearray(JPEG)
    at = damaged.find(b"\xff\xc4")  # the first Huffman table
    damaged[at + 4 : at + 30] = bytes(26)
    return bytes(damaged)


def corrupt_png_data() -> bytes:
    at = PNG.find(b"IDAT") + 8
    return flipped(PNG, at, 40)


def corrupt_png_header() -> bytes:
    return flipped(PNG, 29, 1)  # the IHDR checksum


def corrupt_jpeg_header() -> bytes:
    damaged = bytearray(JPEG)
    at = damaged.find(b"\xff\xc0")  # start of frame: zero width and height
    damaged[at + 5 : at + 9] = bytes(4)
    return bytes(damaged)


# --- the bad requests --------------------------------------------------------------------------------------

Case = tuple[str, str, str, dict[str, Any], int, str]  # label, method, path, request kwargs, status, message


def _image(body: bytes, content_type: str = "image/png") -> dict[str, Any]:
    return {"content": body, "headers": {"content-type": content_type}}


def _files(*parts: tuple[str, tuple[str, bytes, str]]) -> dict[str, Any]:
    return {"files": list(parts)}


async def _chunked(body: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(body), 65536):
        yield body[start : start + 65536]


def v1_cases() -> list[Case]:
    c = "/v1/classify"
    good = ("file", ("a.png", PNG, "image/png"))
    return [
        ("empty body", "POST", c, _image(b""), 400, "is empty"),
        ("empty file part", "POST", c, _files(("file", ("a.png", b"", "image/png"))), 400, "is empty"),
        ("text sent as an image", "POST", c, _image(b"just some text", "image/jpeg"), 415, "not an image"),
        ("text content type", "POST", c, _image(b"hello", "text/plain"), 415, "unsupported Content-Type"),
        ("no content type", "POST", c, {"content": PNG}, 415, "unsupported Content-Type"),
        ("truncated JPEG", "POST", c, _image(JPEG[: len(JPEG) // 2], "image/jpeg"), 400, "truncated or corrupt"),
        ("truncated PNG", "POST", c, _image(PNG[: len(PNG) // 2]), 400, "truncated or corrupt"),
        ("corrupt JPEG tables", "POST", c, _image(corrupt_jpeg_tables(), "image/jpeg"), 400, "truncated or corrupt"),
        ("corrupt JPEG header", "POST", c, _image(corrupt_jpeg_header(), "image/jpeg"), 400, "header is corrupt"),
        ("corrupt PNG data", "POST", c, _image(corrupt_png_data()), 400, "truncated or corrupt"),
        ("corrupt PNG header", "POST", c, _image(corrupt_png_header()), 400, "header is corrupt"),
        ("30000x30000 PNG bomb", "POST", c, _image(png_bomb(30000, 30000)), 413, "too many pixels"),
        ("2000x1000 PNG header", "POST", c, _image(png_header_only(2000, 1000)), 413, "the limit is 1,000,000"),
        ("900000x1 strip", "POST", c, _image(encode(Image.new("1", (900_000, 1)), "PNG")), 413, "too elongated"),
        ("oversized body", "POST", c, _image(b"x" * (MAX_BODY + 1)), 413, "the limit is 200,000"),
        ("oversized chunked body", "POST", c,
         {"content": _chunked(b"x" * (MAX_BODY + 1)), "headers": PNG_TYPE}, 413, "larger than 200,000"),
        ("too many files", "POST", c, _files(*[good] * 4), 413, "at most 3 images"),
        ("wrong multipart field", "POST", c, _files(("image", ("a.png", PNG, "image/png"))), 400,
         "no part named 'file'"),
        ("file part as text", "POST", c, {"data": {"file": "text"}, **_files(("x", ("a", b"x", "text/plain")))}, 400,
         "file upload"),
        ("multipart without boundary", "POST", c, _image(b"abc", "multipart/form-data"), 400, "boundary"),
        ("broken multipart", "POST", c, _image(b"garbage", "multipart/form-data; boundary=xyz"), 400, "multipart"),
        ("unknown model", "POST", "/v1/models/nope/classify", _image(PNG), 404, "unknown model 'nope'"),
        ("top_k of 0", "POST", c + "?top_k=0", _image(PNG), 422, "top_k"),
        ("top_k not a number", "POST", c + "?top_k=many", _image(PNG), 422, "top_k"),
        ("unknown route", "GET", "/v1/nothing", {}, 404, "no route GET /v1/nothing"),
        ("wrong method", "GET", c, {}, 405, "method GET is not allowed"),
    ]  # fmt: skip


def _pixels(batch: int = 1) -> list[int]:
    return np.random.default_rng(0).integers(0, 256, batch * 32 * 32 * 3).tolist()


def _infer(body: Any, model: str = "tiny", raw: bytes | None = None, headers: dict[str, str] | None = None) -> dict:
    content = raw if raw is not None else json.dumps(body).encode()
    return {"content": content, "headers": {"content-type": "application/json", **(headers or {})}}


def _json(body: Any) -> bytes:
    """JSON with NaN and Infinity literals, as Python's json module and some clients write them."""
    return json.dumps(body, allow_nan=True).encode()


def _binary(header: dict[str, Any], blob: bytes, length: str | None = None) -> dict[str, Any]:
    head = json.dumps(header).encode()
    return {"content": head + blob, "headers": {"inference-header-content-length": length or str(len(head))}}


def v2_cases() -> list[Case]:
    uint8 = {"name": "image", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": _pixels()}
    fp32 = {"name": "image", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.5] * 3072}
    blob = bytes(3072)
    sized = {**{k: v for k, v in uint8.items() if k != "data"}, "parameters": {"binary_data_size": 3072}}
    i, n = "/v2/models/tiny/infer", "/v2/models/tiny-norm/infer"

    def with_input(**change: Any) -> dict[str, Any]:
        return {"inputs": [{**uint8, **change}]}

    def binary(**change: Any) -> dict[str, Any]:
        return {"inputs": [{**sized, **change}]}

    deep = "[" * 5000 + "]" * 5000
    nan, inf = float("nan"), float("inf")
    nested = {"inputs": [{**uint8, "data": json.loads("[" * 900 + "1" + "]" * 900)}]}
    return [
        ("wrong datatype", "POST", i, _infer(with_input(datatype="FP32")), 400, "this model takes UINT8"),
        ("unknown datatype", "POST", i, _infer(with_input(datatype="INT64")), 400, "this model takes UINT8"),
        ("UINT8 to an FP32 model", "POST", n, _infer({"inputs": [{**fp32, "datatype": "UINT8"}]}), 400, "takes FP32"),
        ("wrong shape", "POST", i, _infer(with_input(shape=[1, 16, 16, 3])), 400, "does not fit the model"),
        ("wrong rank", "POST", i, _infer(with_input(shape=[32, 32, 3])), 400, "does not fit the model"),
        ("empty batch", "POST", i, _infer(with_input(shape=[0, 32, 32, 3], data=[])), 400, "does not fit the model"),
        ("shape longer than data", "POST", i, _infer(with_input(shape=[2, 32, 32, 3])), 400, "values for shape"),
        ("data longer than shape", "POST", i, _infer(with_input(data=_pixels(2))), 400, "more than 3072 values"),
        ("negative dim", "POST", i, _infer(with_input(shape=[-1, 32, 32, 3])), 400, "shape.0: Input should be gr"),
        ("huge dim", "POST", i, _infer(with_input(shape=[1 << 40, 32, 32, 3])), 400, "shape.0: Input should be less"),
        ("float dims", "POST", i, _infer(with_input(shape=[1.0, 32, 32, 3])), 400, "shape.0: Input should be a val"),
        ("boolean dims", "POST", i, _infer(with_input(shape=[True, 32, 32, 3])), 400, "shape.0: Input should be a val"),
        ("shape as a string", "POST", i, _infer(with_input(shape="1,32,32,3")), 400, "shape: Input should be a val"),
        ("NaN in FP32", "POST", n, _infer(None, raw=_json({"inputs": [{**fp32, "data": [nan] * 3072}]})), 400,
         "NaN or Inf"),
        ("Inf in FP32", "POST", n, _infer(None, raw=_json({"inputs": [{**fp32, "data": [0.0] * 3071 + [inf]}]})), 400,
         "NaN or Inf"),
        ("FP32 overflow", "POST", n, _infer({"inputs": [{**fp32, "data": [1e39] * 3072}]}), 400, "NaN or Inf"),
        ("NaN in binary FP32", "POST", n, _binary({"inputs": [{**{k: v for k, v in fp32.items() if k != "data"},
         "parameters": {"binary_data_size": 12288}}]}, np.full(3072, np.nan, "<f4").tobytes()), 400, "NaN or Inf"),
        ("UINT8 out of range", "POST", i, _infer(with_input(data=[300] * 3072)), 400, "0..255"),
        ("UINT8 not integers", "POST", i, _infer(with_input(data=[0.5] * 3072)), 400, "0..255"),
        ("NaN as UINT8", "POST", i, _infer(None, raw=_json(with_input(data=[nan] * 3072))), 400, "0..255"),
        ("strings as data", "POST", i, _infer(with_input(data=["a"] * 3072)), 400, "must be numbers"),
        ("objects as data", "POST", i, _infer(with_input(data=[{}] * 3072)), 400, "must be numbers"),
        ("no data", "POST", i, _infer({"inputs": [{k: v for k, v in uint8.items() if k != "data"}]}), 400,
         "neither 'data'"),
        ("deeply nested data", "POST", i, _infer(nested), 400, "nests JSON too deeply"),
        ("unknown input name", "POST", i, _infer(with_input(name="pixels")), 400, "unknown input 'pixels'"),
        ("two inputs", "POST", i, _infer({"inputs": [uint8, uint8]}), 400, "exactly one tensor"),
        ("no inputs", "POST", i, _infer({"outputs": []}), 400, "inputs: Field required"),
        ("input not an object", "POST", i, _infer({"inputs": [7]}), 400, "inputs.0: Input should be a valid dict"),
        ("binary size beyond the body", "POST", i, _binary(binary(parameters={"binary_data_size": 5000}), blob), 400,
         "does not fit the 3072 binary bytes"),
        ("binary size short of the shape", "POST", i, _binary(binary(parameters={"binary_data_size": 3000}), blob), 400,
         "needs 3072"),
        ("binary bytes left over", "POST", i, _binary(binary(), blob + b"xx"), 400, "2 binary bytes"),
        ("negative binary size", "POST", i, _binary(binary(parameters={"binary_data_size": -1}), blob), 400,
         "binary_data_size -1"),
        ("binary size not a number", "POST", i, _binary(binary(parameters={"binary_data_size": "3072"}), blob), 400,
         "binary_data_size '3072'"),
        ("header length beyond the body", "POST", i, _binary(binary(), blob, "999999"), 400, "outside the body"),
        ("header length negative", "POST", i, _binary(binary(), blob, "-5"), 400, "outside the body"),
        ("header length not a number", "POST", i, _binary(binary(), blob, "x"), 400, "must be an integer"),
        ("header length cuts the JSON", "POST", i, _binary(binary(), blob, "10"), 400, "not valid JSON"),
        ("unknown model", "POST", "/v2/models/nope/infer", _infer(with_input()), 404, "unknown model 'nope'"),
        ("unknown model metadata", "GET", "/v2/models/nope", {}, 404, "unknown model 'nope'"),
        ("unknown version", "POST", "/v2/models/tiny/versions/3/infer", _infer(with_input()), 404, "only version 1"),
        ("malformed JSON", "POST", i, _infer(None, raw=b'{"inputs": [1, 2'), 400, "not valid JSON"),
        ("empty body", "POST", i, _infer(None, raw=b""), 400, "not valid JSON"),
        ("JSON array", "POST", i, _infer([1, 2, 3]), 400, "must be a JSON object"),
        ("JSON nested too deep", "POST", i, _infer(None, raw=deep.encode()), 400, "too deeply"),
        ("not UTF-8", "POST", i, _infer(None, raw=b'{"inputs": "\xff\xfe"}'), 400, "not valid JSON"),
        ("unknown output", "POST", i, _infer({**with_input(), "outputs": [{"name": "probs"}]}), 400, "unknown output"),
        ("outputs not a list", "POST", i, _infer({**with_input(), "outputs": "logits"}), 400, "outputs: Input should"),
        ("classification of 0", "POST", i, _infer({**with_input(), "outputs": [{"name": "logits",
         "parameters": {"classification": 0}}]}), 400, "positive integer"),
        ("oversized body", "POST", i, _infer(None, raw=b" " * (MAX_BODY + 1)), 413, "the limit is 200,000"),
    ]  # fmt: skip


# --- the tests ----------------------------------------------------------------------------------------------


async def good_traffic(client: httpx.AsyncClient, stop: asyncio.Event, statuses: list[int]) -> None:
    """A second client: valid /v1 and /v2 requests, back to back, until told to stop."""
    body = {"inputs": [{"name": "image", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": _pixels()}]}
    seed = 0
    while not stop.is_set():
        seed += 1
        r = await client.post("/v1/classify", content=png(seed=seed), headers=PNG_TYPE)
        statuses.append(r.status_code)
        r = await client.post("/v2/models/tiny/infer", json=body)
        statuses.append(r.status_code)


async def test_every_bad_request_gets_its_status_and_a_json_error_while_good_traffic_flows(
    tiny_onnx: Path, norm_onnx: Path
) -> None:
    settings = {"max_images": 3, "max_body_bytes": MAX_BODY, "max_image_pixels": MAX_PIXELS, "max_batch_size": 8}
    async with serve(models=[str(tiny_onnx), str(norm_onnx)], **settings) as client:
        transport = httpx.ASGITransport(app=client.app)  # type: ignore[attr-defined]
        async with httpx.AsyncClient(transport=transport, base_url="http://good", timeout=30) as other:
            stop, good = asyncio.Event(), []
            traffic = asyncio.create_task(good_traffic(other, stop, good))
            failures = []
            for label, method, path, kwargs, status, message in v1_cases() + v2_cases():
                response = await client.request(method, path, **kwargs)
                try:
                    error = response.json()["error"]
                except (ValueError, KeyError, TypeError):
                    error = None
                if response.status_code != status or error is None or message not in error:
                    failures.append(f"{label}: {response.status_code} {response.text[:300]}")
                assert "Traceback" not in response.text and 'File "' not in response.text
                await asyncio.sleep(0)
            stop.set()
            await traffic
        assert not failures, "\n".join(failures)
        assert len(good) >= 4 and set(good) == {200}, good  # the good client never noticed

        # afterwards the server is healthy and nothing is left over
        assert (await client.get("/v2/health/ready")).status_code == 200
        assert (await client.post("/v1/classify", content=PNG, headers=PNG_TYPE)).status_code == 200
        metrics = (await client.get("/metrics")).text
        assert 'status="500"' not in metrics
        state = client.app.state.stageformer  # type: ignore[attr-defined]
        assert all(m.active == 0 and m.batcher.depth == 0 for m in state.registry.models.values())


def animated_gif() -> tuple[bytes, Image.Image]:
    frames = [Image.new("RGB", (30, 20), colour) for colour in ((250, 10, 10), (10, 250, 10), (10, 10, 250))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return data, frames[0]


async def test_odd_but_valid_images_are_classified(client: httpx.AsyncClient) -> None:
    """Animations give their first frame; every colour mode becomes RGB; tiny and thin images work."""

    async def classify(data: bytes) -> list[dict[str, Any]]:
        response = await client.post("/v1/classify", files=[("file", ("x", data, "application/octet-stream"))])
        assert response.status_code == 200, response.text
        predictions: list[dict[str, Any]] = response.json()["results"][0]["predictions"]
        return predictions

    gif, first = animated_gif()
    assert await classify(gif) == await classify(encode(first, "PNG"))  # the first frame, nothing else
    transparent = Image.new("RGBA", (30, 20), (0, 0, 0, 0))
    white = Image.new("RGB", (30, 20), (255, 255, 255))
    assert await classify(encode(transparent, "PNG")) == await classify(encode(white, "PNG"))  # over white
    deep = Image.fromarray(np.linspace(0, 65535, 600, dtype=np.uint16).reshape(20, 30))
    assert deep.mode.startswith("I;16")
    odd = {
        "CMYK JPEG": encode(photo().convert("CMYK"), "JPEG"),
        "16-bit PNG": encode(deep, "PNG"),
        "RGBA PNG": encode(photo().convert("RGBA"), "PNG"),
        "1x1 PNG": encode(Image.new("RGB", (1, 1), (9, 99, 199)), "PNG"),
        "20000x10 strip": encode(Image.new("L", (20000, 10), 128), "PNG"),
        "grayscale PNG": encode(photo().convert("L"), "PNG"),
        "palette PNG with transparency": encode(photo().convert("P"), "PNG", transparency=0),
        "WEBP": encode(photo(), "WEBP"),
        "BMP": encode(photo(), "BMP"),
        "TIFF": encode(photo(), "TIFF"),
        "JPEG with damaged scan data": flipped(JPEG, len(JPEG) // 2, 40),  # decoded as far as it goes
    }
    for label, data in odd.items():
        predictions = await classify(data)
        assert len(predictions) == 5, label


def test_a_pixel_bomb_is_refused_from_its_header_before_any_pixel_is_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[object] = []
    real_load = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile) -> Any:
        decoded.append(self)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    config = PreprocessConfig(image_size=32)
    for bomb, limit in ((png_bomb(30000, 30000), 40_000_000), (png_bomb(8000, 6000), 40_000_000)):
        with pytest.raises(ServiceError) as refused:
            prepare(bomb, config, limit)
        assert refused.value.kind is Kind.TOO_LARGE
    with pytest.raises(ServiceError, match="too elongated"):
        prepare(encode(Image.new("1", (2_000_000, 1)), "PNG"), PreprocessConfig(image_size=224), 40_000_000)
    assert decoded == [], "refused images must not be decoded"
    prepare(PNG, config, 40_000_000)  # the spy does see an image that is decoded
    assert decoded
