"""With no model given the server serves the built-in digits demo, and it reads digits as people send them."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

from service.registry import DEMO_MODEL

from .conftest import serve


def drawn_digit(digit: int, size: int, mode: str) -> bytes:
    image = Image.new("RGB", (size, size), (250, 248, 240))
    draw = ImageDraw.Draw(image)
    s, w = size, max(2, size // 12)
    if digit == 0:
        draw.ellipse((0.3 * s, 0.15 * s, 0.7 * s, 0.85 * s), outline=(20, 20, 30), width=w)
    else:  # 1: one upright stroke
        draw.line((0.5 * s, 0.12 * s, 0.5 * s, 0.88 * s), fill=(20, 20, 30), width=w)
    buffer = io.BytesIO()
    image.convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


async def test_no_model_given_serves_the_digits_demo() -> None:
    assert DEMO_MODEL.is_file(), "service/demo/digits.onnx ships with the package"
    async with serve() as client:
        meta = (await client.get("/v2/models/digits")).json()
        assert meta["parameters"]["labels"] == [str(i) for i in range(10)]
        for digit in (0, 1):
            for size, mode in ((28, "L"), (300, "RGB")):
                response = await client.post(
                    "/v1/classify", content=drawn_digit(digit, size, mode), headers={"content-type": "image/png"}
                )
                assert response.status_code == 200
                body = response.json()
                assert body["model"] == "digits"
                assert body["results"][0]["predictions"][0]["label"] == str(digit), (digit, size, mode, body)
