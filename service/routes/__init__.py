"""One APIRouter per feature: classify (v1), Open Inference Protocol (v2), operations (metrics)."""
