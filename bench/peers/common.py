"""What the plain FastAPI and LitServe peers share with each other and with the server: the model's own metadata,
the project's preprocessing function (so they do the same decoding work as the server) and the same top-k answer.
(The idiomatic peer, ``fastapi_own_decode``, shares nothing.)"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from service.images import prepare
from stageformer.core.preprocess import PreprocessConfig

MAX_PIXELS = 40_000_000  # the server's default limit


@dataclass(frozen=True)
class PeerModel:
    session: ort.InferenceSession
    input_name: str
    labels: tuple[str, ...]
    preprocess: PreprocessConfig

    @classmethod
    def load(cls, path: str) -> PeerModel:
        """A plain ONNX Runtime session with default options, on CUDA when onnxruntime-gpu has it."""
        available = ort.get_available_providers()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        session = ort.InferenceSession(path, providers=[p for p in providers if p in available])
        meta = session.get_modelmeta().custom_metadata_map
        return cls(
            session,
            session.get_inputs()[0].name,
            tuple(json.loads(meta["labels"])),
            PreprocessConfig.from_json(meta["preprocess"]),
        )

    def pixels(self, jpeg: bytes) -> np.ndarray:
        """JPEG bytes -> ``uint8 [H, W, 3]``, with the server's own decoding and preprocessing."""
        return prepare(jpeg, self.preprocess, MAX_PIXELS)

    def run(self, batch: np.ndarray) -> np.ndarray:
        logits: np.ndarray = self.session.run(None, {self.input_name: batch})[0]
        return logits

    def top_k(self, logits: np.ndarray, k: int = 5) -> list[dict[str, object]]:
        """The same answer as the server's ``/v1``: the k best classes with softmax scores."""
        shifted = logits.astype(np.float64) - logits.max()
        probs = np.exp(shifted) / np.exp(shifted).sum()
        order = np.argsort(-probs, kind="stable")[:k]
        return [{"label": self.labels[i], "index": int(i), "score": float(probs[i])} for i in order]
