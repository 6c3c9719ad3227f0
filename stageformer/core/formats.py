"""The files the project writes and reads: their format names, versions and metadata keys.

A checkpoint (``.safetensors``) and an exported model (``.onnx``) each carry, as string metadata, the
model's config, preprocessing and labels, so nothing has to be typed twice. These keys are the
contract between ``model/`` (writes checkpoints), ``export/`` (reads them, writes ONNX) and
``service/`` (reads ONNX).
"""

from __future__ import annotations

# --- metadata keys, the same in checkpoints and ONNX files ----------------------------------------
FORMAT_KEY = "format"  # which of the formats below the file is
FORMAT_VERSION_KEY = "format_version"  # integer, as a string; a reader refuses newer versions
CONFIG_KEY = "config"  # JSON of the model config (model.ModelConfig)
PREPROCESS_KEY = "preprocess"  # JSON of stageformer.core.preprocess.PreprocessConfig
LABELS_KEY = "labels"  # JSON list of class names, one per output
VERSION_KEY = "stageformer_version"  # the version that wrote the file

# --- checkpoints ---------------------------------------------------------------------------------
CHECKPOINT_FORMAT = "stageformer.checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
CHECKPOINT_REQUIRED_KEYS = (FORMAT_KEY, FORMAT_VERSION_KEY, CONFIG_KEY, PREPROCESS_KEY, LABELS_KEY)

# --- ONNX files ----------------------------------------------------------------------------------
ONNX_FORMAT = "stageformer.onnx"
ONNX_FORMAT_VERSION = 1
NAME_KEY = "name"  # the model's name (stageformer.core.naming), its URL segment when served
INPUT_FORMAT_KEY = "input_format"  # one of INPUT_FORMATS
PRECISION_KEY = "precision"  # "fp32", "fp16" or "int8"
PARITY_KEY = "parity"  # JSON figures of the export's parity gate
QUANTIZATION_KEY = "quantization"  # int8 files only: JSON of the quantization settings and its agreement gate
ONNX_REQUIRED_KEYS = (PREPROCESS_KEY, LABELS_KEY)  # what the server cannot serve without

INPUT_NAME = "image"  # the graph's one input
OUTPUT_NAME = "logits"  # the graph's one output: float32 [batch, num_classes]
RAW_INPUT = "raw"  # uint8 [batch, H, W, 3] RGB pixels, normalized inside the graph
NORMALIZED_INPUT = "normalized"  # float32 [batch, 3, H, W], already normalized
INPUT_FORMATS = (RAW_INPUT, NORMALIZED_INPUT)
