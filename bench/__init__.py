"""The benchmark: engines (PyTorch eager vs ONNX Runtime), serving under load against peers (plain
FastAPI, LitServe), and the in-process limit. ``python -m bench`` runs it and writes a Markdown
report, JSON results and PNG plots. Speed claims in the README are only what this measures."""
