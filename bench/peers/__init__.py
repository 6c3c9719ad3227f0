"""The peers the server is measured against, each serving the same ONNX file the way a user would write it:
``fastapi_own_decode`` (the idiomatic endpoint: its own Pillow decoding, one ``session.run`` per request),
``plain_fastapi`` (the same kind of endpoint with the server's decoding function) and ``litserve_peer``
(LitServe with its own batching). Each runs as ``python -m bench.peers.NAME MODEL.onnx --port N``."""
