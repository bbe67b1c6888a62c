"""open_clip glue: models and references, mimic-layer lookup, the distributed contrastive loss, the embedder."""
from raymimic.clip.embed import ClipEmbedder
from raymimic.clip.layers import ALIASES as MIMIC_LAYER_ALIASES
from raymimic.clip.layers import resolve_mimic_layer, sample_dim
from raymimic.clip.loss import contrastive_loss, gather_with_grad, grad_scale, per_sample_contrastive_loss
from raymimic.clip.models import (
    create_model,
    create_seeded_model,
    get_tokenizer,
    load_reference,
    local_copy,
    parse_reference,
    read_state_dict,
    register_model_configs,
    save_checkpoint,
    transforms_for_model,
)

__all__ = [
    "ClipEmbedder", "MIMIC_LAYER_ALIASES", "contrastive_loss", "create_model", "create_seeded_model", "gather_with_grad", "get_tokenizer",
    "grad_scale",
    "load_reference", "local_copy", "parse_reference", "per_sample_contrastive_loss", "read_state_dict",
    "register_model_configs", "resolve_mimic_layer", "sample_dim", "save_checkpoint", "transforms_for_model",
]
