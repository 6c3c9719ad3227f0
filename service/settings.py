"""Server settings: one pydantic-settings class, filled from ``STAGEFORMER_*`` environment variables and
from ``stageformer serve`` flags (flags win). Invalid values fail at start-up with a clear message."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Device = Literal["auto", "cpu", "cuda", "tensorrt"]
AUTO_OR_RANGE = {"max_batch_size": (1, 1024), "lanes": (0, 64)}  # settings that take auto or a number in range


class Settings(BaseSettings):
    """Every setting of the server. ``stageformer serve`` makes one flag of each field (its name, its
    description as the help, the choices of a ``Literal``), so a setting is declared here and nowhere else."""

    model_config = SettingsConfigDict(env_prefix="STAGEFORMER_", extra="forbid", validate_default=True)

    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 for all interfaces)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    models: list[str] = Field(
        default_factory=list,
        description="ONNX files or folders of them; empty serves the built-in demo (digits) model",
    )
    default_model: str | None = Field(None, description="model answering /v1/classify; default: the first one")
    device: Device = Field("auto", description="auto (CUDA when it really starts, else CPU), cpu, cuda or tensorrt")
    max_batch_size: int | Literal["auto"] = Field(
        "auto",
        description="largest batch one inference call runs; auto: the smallest power of two within 5% of the "
        "best images/s, measured per model at start-up",
    )
    auto_batch_limit: int = Field(64, ge=1, le=1024, description="with --max-batch-size auto, the largest size tried")
    auto_batch_budget_s: float = Field(
        4.0, gt=0.0, le=120.0, description="with --max-batch-size auto, the seconds per model the measurement may take"
    )
    max_queue_delay_ms: float = Field(
        2.0, ge=0.0, le=10_000.0, description="how long a batch waits for more requests after its first one"
    )
    max_queue_size: int = Field(256, ge=1, description="images waiting per model beyond which requests get 503")
    request_timeout_s: float = Field(30.0, gt=0.0, description="longest a request may wait for inference (504)")
    drain_timeout_s: float = Field(
        25.0, gt=0.0, description="on SIGTERM, longest wait for admitted requests to finish before exiting"
    )
    instances: int = Field(1, ge=1, le=64, description="ONNX Runtime sessions per model, each with its own thread")
    lanes: int | Literal["auto"] = Field(
        "auto",
        description="CPU only: narrow sessions (the cores split among them) that run batches side by side while "
        "requests queue; a batch that runs alone still gets the full session. auto: one per core (at most 4), kept "
        "unless measured at start-up more than 5% slower than the full session (off with --threads or --instances); "
        "0: off",
    )
    threads: int = Field(
        0,
        ge=0,
        description="ONNX Runtime intra-op threads per session; 0 lets ONNX Runtime decide (one per physical core, "
        "measured best overall on 2 cores)",
    )
    decode: Literal["fast", "exact"] = Field(
        "fast",
        description="fast: decode large JPEGs at a reduced scale, down to --decode-oversample times the model's "
        "resize target; exact: decode every pixel, bit-identical to training's preprocessing",
    )
    decode_oversample: float = Field(
        2.0,
        ge=1.0,
        le=8.0,
        description="with --decode fast, the least image size kept, in multiples of the resize target",
    )
    decode_workers: int = Field(
        0, ge=0, description="threads decoding and preprocessing images; 0: one per CPU, at most 8"
    )
    api_key: SecretStr | None = Field(
        None, description="require `Authorization: Bearer KEY` on inference and metadata routes"
    )
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="largest request body (413 beyond)")
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="largest image, width x height, checked before decoding"
    )
    max_images: int = Field(64, ge=1, description="most images in one request (at most --max-queue-size)")
    header_timeout_s: float = Field(
        5.0, gt=0.0, description="a request's headers must arrive within this many seconds (408 and close)"
    )
    body_timeout_s: float = Field(
        10.0, gt=0.0, description="a request's body must arrive within this many seconds plus 1 s per --body-min-rate"
    )
    body_min_rate: int = Field(
        64 * 1024, ge=1, description="bytes per second a request body must keep up after --body-timeout-s (408)"
    )
    max_connections: int = Field(
        1000, ge=1, description="open connections beyond which new ones get 503 and are closed"
    )
    keep_alive_timeout_s: float = Field(5.0, gt=0.0, description="idle kept-alive connections close after this")
    grpc_port: int = Field(
        8001, ge=0, le=65535, description="port of the Open Inference Protocol over gRPC, on --host; 0 turns it off"
    )
    watch: bool = Field(
        False, description="follow the model folders: load new or changed .onnx files, unload removed ones"
    )
    watch_interval_s: float = Field(2.0, gt=0.0, description="with --watch, seconds between looks at the folders")
    cors_origins: list[str] = Field(default_factory=list, description="origins allowed by CORS; empty: CORS off")
    trt_cache_dir: str = Field(".trt_cache", description="TensorRT engine cache folder (--device tensorrt)")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

    def decode_threads(self) -> int:
        """Threads of the decode pool: ``decode_workers``, or one per CPU (at most 8) when 0."""
        return self.decode_workers or min(8, os.cpu_count() or 1)

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("api_key")
    @classmethod
    def _real_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError(
                "the API key is empty or blank, which would let anyone in; set a real key or unset STAGEFORMER_API_KEY"
            )
        return value

    @field_validator(*AUTO_OR_RANGE)
    @classmethod
    def _auto_or_in_range(cls, value: int | str, info: ValidationInfo) -> int | str:
        low, high = AUTO_OR_RANGE[info.field_name or ""]
        if isinstance(value, int) and not low <= value <= high:
            raise ValueError(f"{info.field_name} must be auto or an integer from {low} to {high}, got {value}")
        return value

    @model_validator(mode="after")
    def _fits(self) -> Settings:
        if self.max_images > self.max_queue_size:
            raise ValueError(
                f"max_images ({self.max_images}) is larger than max_queue_size ({self.max_queue_size}): such a request "
                "could never be queued; lower --max-images or raise --max-queue-size"
            )
        if isinstance(self.lanes, int) and self.lanes > 0 and self.instances > 1:
            raise ValueError("--lanes and --instances above 1 do not go together; choose one way to run side by side")
        return self
