"""LoRA through peft. With an adapter, the frozen reference policy is the same network with the
adapter disabled (``with model.disable_adapter():``), not a second copy in memory."""

from __future__ import annotations

import copy

import torch

from rlhfkit.models.quant import dequantized, is_4bit


def apply_lora(model: torch.nn.Module, r: int, alpha: float, dropout: float = 0.0,
               targets: str = "all-linear", modules_to_save: list[str] | None = None):
    """Wrap ``model`` with a LoRA adapter of rank ``r`` (scale alpha/r) on ``targets``.

    ``targets`` is "all-linear" or a comma-separated list of module names (e.g. "q_proj,v_proj").
    ``modules_to_save`` lists extra modules trained in full (e.g. a reward or value head).
    """
    from peft import LoraConfig, get_peft_model

    target = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target,
                        modules_to_save=modules_to_save, bias="none")
    return get_peft_model(model, config)


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """The plain transformers model: LoRA weights merged in, or ``model`` itself without an adapter."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def merged_fp32(model: torch.nn.Module, copied: bool = True) -> torch.nn.Module:
    """``model`` as a plain fp32 transformers model to save: LoRA merged in fp32 (a 4-bit base de-quantised
    first, models/quant.py), lower-precision frozen weights back in fp32; ``model`` itself when it is
    already plain fp32. ``copied=False``: ``model`` is a throwaway copy, converted in place."""
    if is_4bit(model):
        return dequantized(model)
    if not hasattr(model, "merge_and_unload") and all(p.dtype == torch.float32 for p in model.parameters()):
        return model
    return merged((copy.deepcopy(model) if copied else model).float())


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
