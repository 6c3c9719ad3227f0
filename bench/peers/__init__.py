"""The peers the server is measured against, each serving the same ONNX file the same way a user
would write it: ``plain_fastapi`` (one ``session.run`` per request, no batching) and ``litserve_peer``
(LitServe with its own batching). Each runs as ``python -m bench.peers.NAME MODEL.onnx --port N``."""
