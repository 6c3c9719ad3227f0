"""Export: PyTorch checkpoints to ONNX files with a parity gate and metadata."""
