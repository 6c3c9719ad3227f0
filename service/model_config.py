"""A served model described as Triton's ``ModelConfig`` (what ``perf_analyzer`` and Triton clients read): its
batch size, input, output, batching and instances. Over gRPC (``ModelConfig``) as the protobuf message, over
HTTP (``GET /v2/models/{m}/config``) as its JSON form."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc

from .pipeline import ModelPipeline

DATA_TYPES = {"UINT8": mc.TYPE_UINT8, "FP32": mc.TYPE_FP32}


def model_config(model: ModelPipeline) -> mc.ModelConfig:
    spec, info, batcher = model.input_spec, model.info, model.batcher
    kind = mc.ModelInstanceGroup.KIND_GPU if model.runtime.on_gpu else mc.ModelInstanceGroup.KIND_CPU
    return mc.ModelConfig(
        name=info.name,
        platform="onnxruntime_onnx",
        backend="onnxruntime",
        max_batch_size=batcher.max_batch_size,
        input=[mc.ModelInput(name=spec.name, data_type=DATA_TYPES[spec.datatype], dims=list(spec.shape[1:]))],
        output=[mc.ModelOutput(name=info.output_name, data_type=mc.TYPE_FP32, dims=[info.num_classes])],
        dynamic_batching=mc.ModelDynamicBatching(
            preferred_batch_size=[batcher.max_batch_size],
            max_queue_delay_microseconds=round(batcher.max_queue_delay_s * 1e6),
        ),
        instance_group=[mc.ModelInstanceGroup(count=batcher.instances, kind=kind)],
    )


def model_config_json(model: ModelPipeline) -> dict[str, Any]:
    """The config as Triton's HTTP API returns it (field names as in the protobuf)."""
    result: dict[str, Any] = json_format.MessageToDict(model_config(model), preserving_proto_field_name=True)
    return result
