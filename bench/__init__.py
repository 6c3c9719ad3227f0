"""The benchmark: engines (PyTorch eager vs ONNX Runtime), decoding, serving under load against peers (plain
FastAPI endpoints, LitServe), the in-process limit, the server's thread settings and int8 against fp32.
``python -m bench`` runs it and writes a Markdown report, JSON results and PNG plots; ``python -m bench gpu``
checks the GPU path on a machine with an NVIDIA GPU. Speed claims in the documentation are only what this
measures."""
