"""Model resolution (bundled default, HF folder, GGUF, tiny test models), LoRA, and heads."""

from rlhfkit.models.loading import (
    BUNDLED,
    ModelNotFound,
    disable_dropout,
    ensure_pad_token,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
    rlhfkit_home,
    tiny_model,
)
from rlhfkit.models.lora import apply_lora, count_parameters, merged, merged_fp32

__all__ = [
    "BUNDLED", "ModelNotFound", "apply_lora", "count_parameters", "disable_dropout", "ensure_pad_token",
    "load_causal_lm", "load_tokenizer", "merged", "merged_fp32", "resolve_model_path", "rlhfkit_home", "tiny_model",
]
