"""Shared config pieces and the one path from dataclass to CLI.

Each stage's config is a dataclass built from the shared pieces below (model, data, optimiser,
run) plus its own fields. Its fields are its command-line flags (through tyro): the docstring under
each field is its help line, written once. ``--config file.yaml`` supplies defaults, which flags
override. The resolved config is printed at start and saved in the run directory.

Batch arithmetic lives in one place, :func:`accumulation_steps`.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import tyro
import yaml

from rlhfkit.errors import ConfigError

C = TypeVar("C")
Precision = Literal["auto", "no", "fp16", "bf16"]


@dataclass
class ModelArgs:
    model: str = "smollm2-135m-instruct"
    """Model: 'smollm2-135m-instruct' (bundled), 'tiny' (random, for tests), a local Hugging Face folder or a .gguf file."""
    lora_r: int = 0
    """LoRA rank; 0 trains every weight."""
    lora_alpha: float = 32.0
    """LoRA scale numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input (kept 0 for RL stages)."""
    lora_targets: str = "all-linear"
    """Modules that get LoRA: 'all-linear' or a comma list such as 'q_proj,v_proj'."""
    load_in_4bit: bool = False
    """QLoRA: keep the frozen base in 4-bit NF4 (bitsandbytes, the 'qlora' extra) and train a LoRA adapter
    on it (needs --lora-r). The reference is the 4-bit base with the adapter off; final/ is the de-quantised
    base with the adapter merged, in fp32."""
    trainable_layers: int = 0
    """Train only the top N transformer layers (plus the head and final norm); 0 trains them all.
    The frozen bottom needs no backward pass: about a third less compute at N = half the layers."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% more compute."""
    mixed_precision: Precision = "no"
    """'auto' picks by the hardware (bf16 on GPUs and CPUs with bf16 units, fp16 on GPUs without bf16, fp32 on
    CPUs without bf16 units) and says why; 'bf16' or 'fp16' run forward and backward under that autocast (fp16
    with dynamic loss scaling); 'no' is fp32. Trained weights stay fp32; frozen linear weights (LoRA base,
    frozen layers) are stored in the autocast dtype, which autocast would cast them to anyway: the same
    numbers, half the memory, no per-call casts."""
    disable_dropout: bool = True
    """Set every dropout to 0 (required for RL: reproducible logprobs, PPO ratio 1 at the start)."""


@dataclass
class DataArgs:
    train: str = ""
    """Training data: jsonl/json/csv/parquet (optionally .gz) or a datasets save_to_disk folder; several as a,b or a glob."""
    eval: str = ""
    """Held-out data; when empty, --eval-size records are held out of --train."""
    eval_size: float = 0.0
    """Records held out of --train for evaluation: a count (>= 1) or a fraction (< 1)."""
    split_seed: int = 0
    """Seed of the deterministic train/eval split."""
    split_by: str = ""
    """Hold out whole groups: records sharing this metadata field (e.g. question_id) stay on one side."""
    fields: str = ""
    """Column mapping, e.g. 'prompt=question,response=answer'; 'prompt=instruction+input' joins columns by a blank line."""
    completions: Literal["ranking", "best-vs-random", "best-vs-worst"] = "ranking"
    """Rows of scored completions (UltraFeedback): a ranking by score, or one pair, the best against a random
    lower-scored one (Zephyr's recipe) or against the worst."""
    on_bad_record: Literal["error", "skip"] = "error"
    """A malformed record stops the run ('error', naming file, line and field) or is skipped and counted ('skip')."""
    max_length: int = 512
    """Maximum tokens of prompt plus response."""
    truncation: Literal["prompt_left", "right", "drop"] = "prompt_left"
    """Overlong pairs: cut the prompt's oldest tokens, cut the end, or drop the pair (all reported)."""
    limit: int = 0
    """Use only the first N valid training records (0: all)."""


@dataclass
class OptimArgs:
    lr: float = 2e-5
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay, applied to matrices only."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    warmup_ratio: float = 0.03
    """Fraction of the steps spent warming the learning rate up linearly from 0."""
    min_lr_ratio: float = 0.0
    """Cosine decay ends at lr * min_lr_ratio (0 anneals to zero, as in Ziegler et al.)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    batch_size: int = 8
    """Examples per optimiser step, summed over all processes."""
    micro_batch_size: int = 8
    """Examples per forward pass on one process; gradient accumulation makes up the rest."""
    epochs: int = 1
    """Passes over the training data."""
    max_steps: int = 0
    """Stop after this many optimiser steps (0: run the epochs)."""


@dataclass
class RunArgs:
    name: str = ""
    """Run name; the run directory is <output-dir>/<name> (default: stage and time)."""
    output_dir: str = "runs"
    """Parent folder of run directories."""
    seed: int = 0
    """Seed for initialisation, data order and sampling."""
    resume: bool = False
    """Continue the named run (or the newest unfinished run of this stage) from its last good checkpoint."""
    save_every: int = 50
    """Write a checkpoint every N optimiser steps, and always at the end (0: only at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk; older ones are deleted."""
    eval_every: int = 0
    """Evaluate every N steps (0: only at the end)."""
    progress: bool = True
    """Show progress bars with ETA."""
    verbose: bool = False
    """Print the whole resolved config at start (it is always saved in the run's config.yaml)."""
    report_to: Literal["none", "tensorboard", "wandb", "mlflow", "trackio"] = "none"
    """Also log every step to this experiment tracker (through accelerate; metrics.jsonl is always written)."""


# ---------------------------------------------------------------------------------------------


def accumulation_steps(batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Micro-batches per optimiser step on each process: batch = micro * accumulation * processes.

    >>> accumulation_steps(8, 2, 2)
    2
    """
    per_step = micro_batch_size * world_size
    if batch_size < 1 or micro_batch_size < 1 or batch_size % per_step:
        raise ValueError(
            f"batch_size {batch_size} must be a positive multiple of micro_batch_size {micro_batch_size} x "
            f"{world_size} process(es) = {per_step}"
        )
    return batch_size // per_step


def load_yaml(cls: type[C], path: str | Path, section: str | None = None) -> C:
    """Defaults for ``cls`` from a YAML file (optionally one top-level section of it).
    Unknown keys are an error that names the file and the key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if section is not None:
        data = data.get(section, {}) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value")
    return from_dict(cls, data, where=str(path))


def from_dict(cls: type[C], data: dict, where: str = "config") -> C:
    """``cls(**data)``, checked: an unknown key or a value of the wrong type (a string where a number
    belongs, a choice outside a Literal) is a :class:`ConfigError` naming ``where`` and the key."""
    data = {k.replace("-", "_"): v for k, v in data.items()}
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)} for {cls.__name__}; "
                          f"known: {', '.join(names)}")
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        problem = type_problem(hints[key], value)
        if problem:
            raise ConfigError(f"{where}: field '{key}': {problem}")
    return cls(**data)


def type_problem(hint, value) -> str:
    """Why ``value`` does not fit the annotation ``hint`` ('' when it does). Knows the types config
    fields use: bool, int, float, str, Literal, dict, list and ``X | None``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "" if value in args else f"expected one of {', '.join(map(repr, args))}, got {value!r}"
    if origin in (typing.Union, types.UnionType):
        problems = [type_problem(a, value) for a in args]
        return "" if any(not p for p in problems) else problems[0]
    if hint is type(None):
        return "" if value is None else f"expected null, got {value!r}"
    if hint is bool:
        return "" if isinstance(value, bool) else f"expected true or false, got {value!r}"
    if hint is int:
        return "" if isinstance(value, int) and not isinstance(value, bool) else f"expected an integer, got {value!r}"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return "" if ok else f"expected a number, got {value!r}"
    if hint is str:
        return "" if isinstance(value, str) else f"expected a string, got {value!r}"
    if hint is dict or origin is dict:
        return "" if isinstance(value, dict) else f"expected a mapping, got {value!r}"
    if hint is list or origin is list:
        return "" if isinstance(value, list) else f"expected a list, got {value!r}"
    return ""


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def parse(cls: type[C], argv: list[str], prog: str, description: str = "") -> C:
    """Parse ``argv`` into ``cls``: ``--config file.yaml`` gives defaults, flags override them."""
    default = None
    rest = list(argv)
    for i, arg in enumerate(rest):
        if arg == "--config" or arg.startswith("--config="):
            value = arg.split("=", 1)[1] if "=" in arg else (rest[i + 1] if i + 1 < len(rest) else None)
            if value is None:
                raise ConfigError("--config needs a YAML file")
            del rest[i: i + (1 if "=" in arg else 2)]
            default = load_yaml(cls, value)
            break
    if "-h" in rest or "--help" in rest:
        description += "\n\n--config FILE.yaml supplies defaults for these flags."
    return tyro.cli(cls, args=rest, default=default, prog=prog, description=description)


def print_config(cfg, stream=sys.stderr) -> None:
    print(f"# resolved {type(cfg).__name__}\n{dump(cfg)}", file=stream, flush=True)


# what a stage's start line names, when its config has the field: (label, field)
_HEADLINE = (("", "algorithm"), ("", "estimator"), ("loss", "loss"), ("", "kind"), ("task", "task"),
             ("on", "model"), ("data", "train"), ("prompts", "prompts"), ("data", "data"), ("reward", "reward"))


def stage_line(cfg, stage: str, where: str | Path = "", precision: str = "") -> str:
    """The one line a stage prints at start: what it does, on which model, with which data and reward,
    in which precision (and why), and where its run goes.

    >>> from types import SimpleNamespace as S
    >>> stage_line(S(model="tiny", lora_r=8, train="a.jsonl", reward=""), "sft", "runs/x", "fp32 (asked for)")
    'rlhfkit sft: on tiny (LoRA r=8), data a.jsonl, precision fp32 (asked for) -> runs/x'
    """
    parts = []
    for label, key in _HEADLINE:
        value = getattr(cfg, key, "")
        if value and isinstance(value, str):
            text = f"{label} {value}".strip()
            if key == "model" and getattr(cfg, "lora_r", 0):
                text += f" (LoRA r={cfg.lora_r}{', 4-bit base' if getattr(cfg, 'load_in_4bit', False) else ''})"
            parts.append(text)
    if precision:
        parts.append(f"precision {precision}")
    return f"rlhfkit {stage}: {', '.join(parts)}" + (f" -> {where}" if where else "")


def announce(cfg, stage: str, where: str | Path = "", precision: str = "", stream=sys.stderr) -> None:
    """Print the stage's start line (:func:`stage_line`); the whole resolved config too under ``--verbose``."""
    if getattr(cfg, "verbose", False):
        print_config(cfg, stream)
    print(stage_line(cfg, stage, where, precision), file=stream, flush=True)
