"""stageformer: hierarchical vision transformers from stage configs, exported to ONNX and served.

This package holds the ``stageformer`` command (``stageformer.cli``) on top of everything, and the
ground floor (``stageformer.core``) below everything.
"""

from stageformer.core import __version__

__all__ = ["__version__"]
