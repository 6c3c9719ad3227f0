"""LitServe with its batching: ``decode_request`` decodes each image (the server's own preprocessing),
``batch`` stacks them, ``predict`` runs one ``session.run`` per batch, ``encode_response`` returns the
same top-5 answer as the server's ``/v1``. ``max_batch_size`` and ``batch_timeout`` are set to the
server's defaults (16 images, 2 ms) unless given.

Each batch's size is appended to ``--batch-log`` (one line per batch) so the benchmark can report the
mean batch size, as it does for the server from ``/metrics``.

Run: ``python -m bench.peers.litserve_peer MODEL.onnx --port 8002``; ``POST /predict`` with a multipart
``file`` part; ``GET /health``. Needs ``pip install litserve`` (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
from typing import Any

import litserve as ls
import numpy as np

from bench.peers.common import PeerModel


class OnnxClassifier(ls.LitAPI):
    def __init__(self, model_path: str, batch_log: str | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_path = model_path
        self.batch_log_path = batch_log

    def setup(self, device: str) -> None:
        self.model = PeerModel.load(self.model_path)
        self.batch_log = open(self.batch_log_path, "a", buffering=1) if self.batch_log_path else None  # noqa: SIM115

    def decode_request(self, request) -> np.ndarray:  # type: ignore[no-untyped-def,unused-ignore]
        # No annotation: LitServe then hands over the parsed form of a multipart request.
        upload = request["file"]
        return self.model.pixels(upload.file.read())

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.batch_log is not None:
            self.batch_log.write(f"{len(x)}\n")
        return self.model.run(x)

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, output: np.ndarray) -> dict[str, Any]:
        return {"predictions": self.model.top_k(output)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-timeout-ms", type=float, default=2.0)
    parser.add_argument("--batch-log", default=None, help="file to append each batch's size to")
    args = parser.parse_args()
    api = OnnxClassifier(
        args.model, args.batch_log, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout_ms / 1000.0
    )
    server = ls.LitServer(api, accelerator="auto", workers_per_device=1, timeout=60)
    server.run(host=args.host, port=args.port, num_api_servers=1, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
