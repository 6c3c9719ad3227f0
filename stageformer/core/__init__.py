"""The ground floor: what training, export and serving share, torch-free and web-framework-free.

Every package of the project may import from here; nothing here imports any of them. It holds the
preprocessing spec and functions (``preprocess``), the model-name rule (``naming``), the metadata keys
and format versions of checkpoint and ONNX files (``formats``), the training recipes (``recipes``) and the
version string. Its only dependencies are NumPy and Pillow.
"""

__version__ = "0.1.0"
