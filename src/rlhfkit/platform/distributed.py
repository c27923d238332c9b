"""Distributed strategies through accelerate: DeepSpeed's and FSDP2's settings on CPU processes as on
GPUs, and whole weights from sharded models (gathered for sampling, evaluation and export; frozen
models sharded as the trained one is).

Nothing here is a home-made engine: accelerate prepares the trained model; these functions fill the
gaps accelerate leaves on CPU processes and around generation with sharded weights.
"""

from __future__ import annotations

import contextlib
import copy
import os
import weakref

import torch
from accelerate import PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

from rlhfkit.config import ModelArgs
from rlhfkit.errors import ConfigError
from rlhfkit.platform.kernels import release_freed_memory


def deepspeed_requested() -> bool:
    """Whether the launch config asked for DeepSpeed (``accelerate launch`` sets ACCELERATE_USE_DEEPSPEED)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def fsdp_requested() -> bool:
    """Whether the launch config asked for FSDP (``accelerate launch`` sets ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def configure_deepspeed(plugin, cfg: ModelArgs, grad_accum: int) -> None:
    """The stage's own settings in the DeepSpeed config the launch config gave: its accumulation (accelerate
    would otherwise take the config's and overrule the stage's), its clipping, and a micro-batch size
    (DeepSpeed's bookkeeping only: the stages cut their own micro-batches). Models load whole, as under
    every other strategy, unless the launch config sets ``zero3_init_flag``: accelerate registers the
    ZeRO-3 config with transformers either way, and transformers then builds every model partitioned,
    each process drawing its own random weights for its own part."""
    ds = plugin.deepspeed_config
    ds["gradient_accumulation_steps"] = grad_accum
    ds["gradient_clipping"] = getattr(cfg, "max_grad_norm", 1.0)
    ds["train_micro_batch_size_per_gpu"] = getattr(cfg, "micro_batch_size", 1)
    if not plugin.zero3_init_flag:
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


def shard_on_cpu(accelerator, mixed_precision: str) -> None:
    """Make ``accelerator`` shard with FSDP on CPU processes (gloo).

    accelerate 1.16 sets up FSDP only on accelerator devices: ``accelerate launch --cpu`` drops the FSDP
    config, and its state puts CPU processes in plain DDP. PyTorch's FSDP2 (``fully_shard``) itself runs
    on CPU tensors over gloo, so this switches the state to FSDP with the plugin the launch config
    describes (read from the environment accelerate launch set); ``accelerator.prepare``, ``save_state``,
    ``load_state`` and ``get_state_dict`` then take accelerate's own FSDP2 paths, as on GPUs."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ConfigError("FSDP on CPU processes needs fsdp_version: 2 in the accelerate config (FSDP1 is GPU-only here)")
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    state = AcceleratorState()
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if not accelerator.is_fsdp2:
        raise RuntimeError("could not switch accelerate to FSDP2 on CPU processes")


def is_sharded(model) -> bool:
    """Whether FSDP2 shards ``model`` or a module inside it."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())




_SKELETONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> (root's skeleton, root, name)


def zero3(accelerator) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions the trained model's parameters over the processes."""
    return accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3


def shards_parameters(accelerator) -> bool:
    """Whether the trained model's parameters are split over the processes (FSDP2 or ZeRO-3)."""
    return accelerator.is_fsdp2 or zero3(accelerator)


def keep_skeleton(model) -> None:
    """Remember ``model``'s structure (modules, adapters, heads, tied weights) on the meta device, taking
    no memory, before FSDP shards it in place: :func:`full_model` fills it with the gathered weights, for
    the model or any module inside it (PPO's policy inside its actor-critic)."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    skeleton = copy.deepcopy(model, memo)  # buffers (rotary frequencies) are small and copied as they are
    for name, module in model.named_modules():
        _SKELETONS[module] = (skeleton, model, name)


def broadcast_weights(model) -> None:
    """Every process starts from the main process's weights, as DDP's wrapper makes it: FSDP2 shards
    each process's own copy, and the random parts (LoRA's A matrices, new heads) were drawn from each
    process's own seed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)


def full_model(accelerator, model):
    """The model as one plain module with all its weights: ``unwrap_model`` when nothing is sharded; under
    FSDP the full state dict gathered on the main process (collective: every process calls) and loaded
    into the skeleton kept before sharding; None on the other processes."""
    unwrapped = accelerator.unwrap_model(model)
    if unwrapped not in _SKELETONS:
        return unwrapped
    skeleton, root, name = _SKELETONS[unwrapped]
    if zero3(accelerator):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(root.parameters())):
            state = {k: v.detach().clone() for k, v in root.state_dict().items()} if accelerator.is_main_process else None
    else:
        state = accelerator.get_state_dict(root)
    if not accelerator.is_main_process:
        return None
    from transformers import PreTrainedModel

    plain = copy.deepcopy(skeleton)
    plain.load_state_dict(state, assign=True)
    for module in plain.modules():
        if isinstance(module, PreTrainedModel):
            module.tie_weights()  # loading gave tied weights (embeddings and LM head) one tensor each
    return plain.get_submodule(name)


def shard_frozen(accelerator, model, name: str, log) -> None:
    """Under FSDP2, shard a frozen model (a separate reference, a reward model) in place as accelerate
    shards the trained one: each decoder layer, then the whole, over every process, with the launch
    config's offload. Each layer is all-gathered for its forward and freed after, so every process
    holds 1/N of its weights between forwards; ``log`` says the main process's share. Every process must
    then call it equally often (:func:`gathered` lifts that). Nothing happens when nothing is sharded."""
    if not accelerator.is_fsdp2:
        return
    from torch.distributed.fsdp import fully_shard

    keep_skeleton(model)  # for gathered() at the held-out comparison
    broadcast_weights(model)
    kwargs = {"reshard_after_forward": True, "offload_policy": accelerator.state.fsdp_plugin.cpu_offload}
    layers = set(getattr(model, "_no_split_modules", None) or [])
    for module in [m for m in model.modules() if type(m).__name__ in layers]:
        fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    if accelerator.device.type == "cpu":
        release_freed_memory()  # the whole weights sharding replaced
    held = sum(p.to_local().numel() for p in model.parameters())
    log(f"{name} sharded over {accelerator.num_processes} processes: {held / sum(p.numel() for p in model.parameters()):.1%} "
        "of its weights on this process")


@contextlib.contextmanager
def gathered(accelerator, model):
    """Every parameter of ``model`` whole on every process inside the block: FSDP2 all-gathers them on
    entry (every process must enter) and keeps them through forwards, so processes may run different
    numbers of forwards inside (sampling to different lengths, held-out evaluation on one process);
    resharded on exit. ``model`` may be a module inside the prepared one: the whole prepared model is
    gathered. Nothing happens when nothing is sharded. No backward inside."""
    if zero3(accelerator):
        with zero3_gathered(accelerator):
            yield
        return
    if not accelerator.is_fsdp2:
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    root = _SKELETONS[accelerator.unwrap_model(model)][1]
    root._get_fsdp_state()._lazy_init()  # before any inner module runs first and takes itself for the root
    modules = [m for m in root.modules() if isinstance(m, FSDPModule)]
    groups = [g for m in modules for g in m._get_fsdp_state()._fsdp_param_groups]
    after_forward = [g.post_forward_mesh_info for g in groups]  # each group's reshard-after-forward setting
    for m in modules:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for g, info in zip(groups, after_forward, strict=True):
            g.post_forward_mesh_info = info
        for m in modules:
            m.reshard()


@contextlib.contextmanager
def zero3_gathered(accelerator):
    """:func:`gathered` under DeepSpeed ZeRO-3: the partitions all-gathered, and DeepSpeed's module hooks
    off inside the block, since they fetch and release parameters and check that every process runs the
    same forwards (collectives), while processes here sample to different lengths and one process alone
    makes the held-out comparison. The hooks are put back on exit. This is what TRL does to generate
    under ZeRO-3; it goes through DeepSpeed's ``parameter_offload``, not a public API."""
    import deepspeed

    offload = accelerator.deepspeed_engine_wrapped.engine.optimizer.parameter_offload
    with deepspeed.zero.GatheredParameters(list(offload.module.parameters())):
        for p in offload.module.parameters():
            p.ds_active_sub_modules.clear()
        offload._remove_module_hooks()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload.setup_zero_stage3_hooks()
