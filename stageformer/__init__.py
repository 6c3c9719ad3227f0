"""stageformer: hierarchical vision transformers from stage configs, exported to ONNX and served."""

__version__ = "0.1.0"
