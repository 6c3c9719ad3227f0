"""Whether ONNX Runtime's CUDA provider really runs here. ``onnxruntime-gpu`` lists CUDA as available even on
a machine without a GPU (or without a matching driver) and then quietly falls back to the CPU, so the only
honest answer comes from making a session and asking it which provider it uses.

ONNX Runtime and ONNX are imported only when asked (the ground floor needs no more than NumPy and Pillow to
import); without them the answer is False.
"""

from __future__ import annotations

import functools


@functools.cache
def cuda_provider_works() -> bool:
    """True when a session on ``CUDAExecutionProvider`` really runs on CUDA (answered once per process)."""
    try:
        import onnx  # noqa: F401 - the probe model is built with it
        import onnxruntime as ort
    except ImportError:
        return False
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the fallback's own log lines say nothing the answer does not
    try:
        session = ort.InferenceSession(_probe_model(), options, providers=["CUDAExecutionProvider"])
    except Exception:  # any failure to start it means "no CUDA here"
        return False
    return bool(session.get_providers()[0] == "CUDAExecutionProvider")


def _probe_model() -> bytes:
    """The smallest ONNX model: y = relu(x) on one float."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())
