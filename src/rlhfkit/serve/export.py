"""``rlhfkit export RUN/final --to hf|gguf``: a trained policy in the formats other tools load.

* ``hf``: a Hugging Face folder with the LoRA adapter merged into the base weights (a run's final/ is
  saved merged already; an adapter folder is merged here), the tokenizer and its chat template.
  transformers and ``vllm serve`` load it.
* ``gguf``: one GGUF file in llama.cpp's layout for Llama-architecture models (SmolLM2 and its
  fine-tunes), written with the ``gguf`` package: f16 or bf16, or quantised to Q8_0. The
  tokenizer (BPE vocabulary, merges, special tokens, chat template) goes with it. Query and key
  projections are permuted to GGML's rotary layout, as llama.cpp's converter does; readers (llama.cpp,
  transformers' GGUF loader) undo it.
* A reward model (``*ForSequenceClassification``) stays in the Hugging Face format it already has:
  ``export`` says so and copies the folder.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import tyro
from peft import PeftModel

from rlhfkit.errors import ConfigError
from rlhfkit.models import load_causal_lm, merged

try:  # the gguf writer is a core dependency, but keep the error clear if it is missing
    import gguf
except ImportError:  # pragma: no cover
    gguf = None


@dataclass
class ExportConfig:
    """Export a trained policy: a merged Hugging Face folder, or a GGUF file for llama.cpp."""

    path: Annotated[str, tyro.conf.Positional]
    """The model: a run's final/ folder (or any folder rlhfkit loads, or 'smollm2-135m-instruct')."""
    to: Literal["hf", "gguf"] = "hf"
    """Format: 'hf' (merged Hugging Face folder) or 'gguf' (one file for llama.cpp)."""
    output: str = ""
    """Where to write (default: <path>/../export-hf/ or <path>/../<name>-<type>.gguf)."""
    gguf_type: Literal["f16", "bf16", "q8_0"] = "f16"
    """GGUF weight type of the matrices (norms stay f32)."""
    gguf_pre: str = "smollm"
    """llama.cpp's pre-tokenizer name written into the GGUF ('smollm' for SmolLM2 and its fine-tunes)."""


def is_reward_model(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and any(a.endswith("ForSequenceClassification")
                                    for a in json.loads(config.read_text()).get("architectures") or [])


# ---------------------------------------------------------------------------------------------
# GGUF


GGUF_TYPES = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
FILE_TYPE = {"f16": 1, "q8_0": 7, "bf16": 32}  # llama.cpp's LLAMA_FTYPE_* (general.file_type)


def gguf_name(name: str) -> str | None:
    """The llama.cpp tensor name of a Hugging Face Llama parameter (None: not written)."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name]
    parts = name.split(".")
    if parts[:2] != ["model", "layers"]:
        return None
    layer, rest = parts[2], ".".join(parts[3:])
    mapping = {"self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
               "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
               "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
               "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
               "post_attention_layernorm.weight": "ffn_norm.weight"}
    return f"blk.{layer}.{mapping[rest]}" if rest in mapping else None


def rotary_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's rotary layout (the two halves of each head) to GGML's (interleaved pairs), for
    q_proj and k_proj weights of shape (heads * head_dim, in):

        w.reshape(heads, 2, head_dim / 2, in).swapaxes(1, 2).reshape(w.shape)
    """
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensor(data: np.ndarray, kind: str) -> tuple[np.ndarray, object]:
    """(data, raw dtype) of one fp32 array: 1-D arrays (norms) stay f32; matrices get ``kind``."""
    if data.ndim == 1:
        return data.astype(np.float32), None
    if kind == "f16":
        return data.astype(np.float16), None
    qtype = getattr(gguf.GGMLQuantizationType, GGUF_TYPES[kind])
    return gguf.quants.quantize(data, qtype), qtype


def tokenizer_tables(tokenizer) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, GGUF token types, BPE merges) of a byte-level BPE tokenizer."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend["model"]["type"] != "BPE":
        raise ConfigError(f"export --to gguf: a {backend['model']['type']} tokenizer is not supported (BPE only)")
    vocab = {**backend["model"]["vocab"], **{t["content"]: t["id"] for t in backend.get("added_tokens", [])}}
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for text, i in vocab.items():
        tokens[i] = text
    special = {t["id"] for t in backend.get("added_tokens", []) if t.get("special")}
    added = {t["id"] for t in backend.get("added_tokens", [])}
    types = [3 if i in special else 4 if i in added else 1 for i in range(size)]  # control, user-defined, normal
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    return tokens, types, merges


def write_gguf(model, tokenizer, path: Path, kind: str, pre: str) -> Path:
    """The policy as one GGUF file (see the module docstring)."""
    if gguf is None:
        raise ConfigError("export --to gguf needs the gguf package: pip install gguf")
    c = model.config
    if c.model_type != "llama":
        raise ConfigError(f"export --to gguf: architecture {c.model_type!r} is not supported (llama only)")
    heads, kv = c.num_attention_heads, c.num_key_value_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(path.stem)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(float(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(head_dim)
    w.add_file_type(FILE_TYPE[kind])
    tokens, types, merges = tokenizer_tables(tokenizer)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                       ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if value is not None:
            getattr(w, f"add_{key}_token_id")(value)
    w.add_add_bos_token(False)
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)
    for name, tensor in model.state_dict().items():
        target = gguf_name(name)
        if target is None or (name == "lm_head.weight" and c.tie_word_embeddings):
            continue
        data = tensor.detach().float().cpu().numpy()
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            data = rotary_permute(data, heads if name.endswith("q_proj.weight") else kv)
        array, raw = gguf_tensor(data, kind)
        if raw is None:
            w.add_tensor(target, array)
        else:
            w.add_tensor(target, array, raw_shape=array.shape, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---------------------------------------------------------------------------------------------


def load_policy_to_export(src: Path, spec: str):
    """The plain transformers model to export, in fp32: a LoRA adapter folder (``adapter_config.json``, as
    peft saves it) is loaded onto its base model and merged; anything else loads as rlhfkit loads it."""
    if (src / "adapter_config.json").is_file():
        base = json.loads((src / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"{src}/adapter_config.json names no base_model_name_or_path")
        model, tokenizer = load_causal_lm(base)
        model = PeftModel.from_pretrained(model, str(src))
    else:
        model, tokenizer = load_causal_lm(spec)
    return merged(model).float().eval(), tokenizer


def run(cfg: ExportConfig) -> Path:
    src = Path(cfg.path)
    if src.is_dir() and is_reward_model(src):
        out = Path(cfg.output) if cfg.output else src.parent / "export-rm"
        if cfg.to == "gguf":
            raise ConfigError(f"{src} is a reward model: it stays in the Hugging Face "
                              "AutoModelForSequenceClassification format (export --to hf copies it)")
        shutil.copytree(src, out, dirs_exist_ok=True)
        print(f"{src} is a reward model (AutoModelForSequenceClassification): it is already in the Hugging Face "
              f"format that transformers, TRL and RewardBench load; copied to {out}")
        return out
    model, tokenizer = load_policy_to_export(src, cfg.path)
    stem = src.parent.name if src.name == "final" else src.name
    if cfg.to == "hf":
        out = Path(cfg.output) if cfg.output else (src.parent if src.is_dir() else Path(".")) / "export-hf"
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    else:
        out = Path(cfg.output) if cfg.output else (src.parent if src.is_dir() else Path(".")) / f"{stem}-{cfg.gguf_type}.gguf"
        out.parent.mkdir(parents=True, exist_ok=True)
        write_gguf(model, tokenizer, out, cfg.gguf_type, cfg.gguf_pre)
    size = sum(p.stat().st_size for p in ([out] if out.is_file() else out.rglob("*")) if p.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB)")
    return out


__all__ = ["ExportConfig", "gguf_name", "rotary_permute", "run", "write_gguf"]
