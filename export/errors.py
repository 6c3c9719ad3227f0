"""The export's errors, torch-free so that every module of the package can raise them.

Whatever raises one of them has written nothing: the output file appears only after every gate passed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .parity import ParityReport
    from .quantize import QuantizationReport


class ExportError(RuntimeError):
    """The checkpoint cannot be exported as asked; the message says why and what to try. Nothing was written."""


class ParityError(ExportError):
    """The exported graph's logits differ from PyTorch's by more than the tolerance."""

    def __init__(self, message: str, report: ParityReport) -> None:
        super().__init__(message)
        self.report = report


class AgreementError(ExportError):
    """The int8 graph's top-1 predictions agree with PyTorch's fp32 ones on fewer images than required."""

    def __init__(self, message: str, report: QuantizationReport) -> None:
        super().__init__(message)
        self.report = report
