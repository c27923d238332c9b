"""LoRA through peft. With an adapter, the frozen reference policy is the same network with the
adapter disabled (``with model.disable_adapter():``), not a second copy in memory."""

from __future__ import annotations

import torch


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


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
