"""Export: PyTorch checkpoints to ONNX files with a parity gate, metadata and a Triton repository.

``from export import export_onnx`` works; torch is imported only when ``export_onnx`` (or another
name of ``export.onnx``) is first used, so ``export.cli`` can build its parser without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .onnx import AgreementError as AgreementError
    from .onnx import ExportError as ExportError
    from .onnx import ExportReport as ExportReport
    from .onnx import ParityError as ParityError
    from .onnx import export_onnx as export_onnx
    from .onnx import read_onnx_metadata as read_onnx_metadata

_LAZY = ("AgreementError", "ExportError", "ExportReport", "ParityError", "export_onnx", "read_onnx_metadata")

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import onnx

        return getattr(onnx, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
