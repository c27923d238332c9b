"""The whole loop from one config (``rlhfkit pipeline --config configs/quickstart.yaml``), as seed 004
lays it out and as InstructGPT and Anthropic's iterated online RLHF run it::

    0. split the prompts once into train and held-out (prompts/train.jsonl, prompts/heldout.jsonl)
    1. sft            optional: supervised fine-tuning; the result is the policy and the reference
    for each round r = 1..rounds, from the current policy:
    2. feedback       sample k responses per training prompt and label the pairs: a simulated
                      annotator with a hidden utility, an AI judge, a rule or reward, or human
                      labels read from a file
    3. rm             train a reward model on those pairs (and evaluate it on the pairs held out)
    4. rl             ppo / pg against the RM with a KL tether to the reference, or dpo on the pairs
                      directly, or best-of-n sampling with the best answers as an SFT set (bon)
    5. eval           the new policy against the reference on the held-out prompts: proxy (RM) and
                      gold (the hidden utility, when there is one), KL, win rates, samples

Every stage is a normal run directory inside the pipeline's folder, listed in its manifest.json with
its status and time. Running the same command again (or with ``--resume``) skips the finished stages
and continues an interrupted one from its last checkpoint; stages without checkpoints (sampling,
evaluation) start again. ``report.html`` gathers the stages' results and plots.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rlhfkit.config import RunArgs, from_dict


@dataclass
class PipelineConfig(RunArgs):
    """The whole RLHF loop from one config: [sft] -> (feedback -> rm -> rl -> eval) x rounds. Each section
    holds the fields of that stage's own config (see `rlhfkit <stage> --help`)."""

    model: str = "smollm2-135m-instruct"
    """The starting policy (and, without an SFT stage, the reference)."""
    prompts: str = ""
    """Prompt file: split once into training prompts and held-out prompts."""
    eval_size: float = 64
    """Prompts held out for evaluation (a count, or a fraction < 1)."""
    split_seed: int = 0
    """Seed of the prompt split."""
    rounds: int = 1
    """Rounds of feedback -> reward model -> RL -> eval, each from the previous round's policy."""
    algorithm: Literal["pg", "ppo", "dpo", "bon"] = "pg"
    """Policy optimisation: pg (rloo/grpo/reinforce), ppo, dpo (on the pairs, no RM needed), or bon
    (best-of-n against the RM, then SFT on the best answers: rejection-sampling fine-tuning)."""
    gold: str = ""
    """The gold metric, watched and evaluated but never trained on (default: feedback's hidden utility)."""
    sft: dict = field(default_factory=dict)
    """SFT stage fields (empty: no SFT stage), e.g. {train: demos.jsonl, lora_r: 16}."""
    feedback: dict = field(default_factory=dict)
    """Sampling and labelling fields (`rlhfkit label`), e.g. {labeler: simulated, utility: rule:u.yaml, k: 2};
    or {file: prefs.jsonl} for human labels read from a file."""
    reward_model: dict = field(default_factory=dict)
    """Reward-model fields (`rlhfkit rm train`)."""
    rl: dict = field(default_factory=dict)
    """Fields of the RL stage (`rlhfkit pg|ppo|dpo|bon`); for bon, rl.sft holds the fields of the SFT on
    the best answers."""
    evaluate: dict = field(default_factory=dict)
    """Fields of `rlhfkit eval policy` (eval_prompts, judge_model, ...)."""
    name: str = "pipeline"
    """Pipeline name: its folder is <output-dir>/<name>."""


RESUMABLE = {"sft", "rm", "ppo", "pg", "dpo"}  # stages with checkpoints; the others start again


class Pipeline:
    """The pipeline folder, its manifest, and running or skipping one stage."""

    def __init__(self, cfg: PipelineConfig):
        from rlhfkit.run import Run

        self.cfg = cfg
        if (Path(cfg.output_dir) / cfg.name / "config.yaml").is_file():
            cfg.resume = True  # a re-run continues: finished stages are skipped
        self.run = Run.open(cfg, "pipeline", inputs={"prompts": cfg.prompts, "model": cfg.model})
        self.path = self.run.path
        self.stages: list[dict] = []

    def log(self, msg: str) -> None:
        print(f"[pipeline] {msg}", file=sys.stderr, flush=True)

    def stage(self, name: str, kind: str, module: str, config_cls: str, fields: dict, entry: str = "train") -> Path:
        """Run stage ``name`` unless it finished already; returns its run directory."""
        import importlib

        from rlhfkit.run import Run

        path = self.path / name
        status = Run(path, kind).manifest().get("status")
        record = {"name": name, "stage": kind, "path": name, "status": "finished"}
        if status == "finished":
            self.log(f"{name}: finished before, skipped")
            self.stages.append(record | {"seconds": self.seconds(path)})
            self.save()
            return path
        resume = kind in RESUMABLE and (path / "config.yaml").is_file()
        if not resume and path.exists():
            shutil.rmtree(path)  # an interrupted stage without checkpoints starts again
        mod = importlib.import_module(module)
        cfg = from_dict(getattr(mod, config_cls), {**fields, "output_dir": str(self.path), "name": name,
                                                   "seed": self.cfg.seed, "progress": self.cfg.progress,
                                                   "resume": resume}, where=f"pipeline stage {name}")
        self.log(f"{name}: {'resuming' if resume else 'running'} rlhfkit {kind}")
        t0 = time.time()
        getattr(mod, entry)(cfg)
        seconds = time.time() - t0 + (self.seconds(path) if resume else 0.0)
        Run(path, kind).update_manifest(pipeline_seconds=seconds)
        self.stages.append(record | {"seconds": seconds})
        self.save()
        return path

    @staticmethod
    def seconds(path: Path) -> float:
        from rlhfkit.run import Run

        return float(Run(path, "").manifest().get("pipeline_seconds", 0.0))

    def save(self) -> None:
        self.run.update_manifest(stages=self.stages)


def split_prompts(cfg: PipelineConfig, folder: Path) -> tuple[str, str]:
    """prompts/train.jsonl and prompts/heldout.jsonl, written once (the same split on every re-run)."""
    from rlhfkit.data import load_records
    from rlhfkit.data.split import split_records

    train, held = folder / "train.jsonl", folder / "heldout.jsonl"
    if not held.is_file():
        records = load_records(cfg.prompts, kind="prompt").records
        parts = split_records(records, cfg.eval_size, cfg.split_seed)
        folder.mkdir(parents=True, exist_ok=True)
        for path, part in zip((train, held), parts):
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps({"prompt": r.prompt, **r.meta}) + "\n" for r in part))
            tmp.replace(path)
    return str(train), str(held)


def run_pipeline(cfg: PipelineConfig) -> Path:
    from rlhfkit.config import print_config
    from rlhfkit.eval.report import write_pipeline_report

    if not cfg.prompts:
        raise SystemExit("error: --prompts FILE is required")
    if cfg.algorithm in ("pg", "ppo", "bon") and cfg.feedback.get("file") is None and not cfg.feedback.get("labeler"):
        raise SystemExit("error: feedback: give a labeler (simulated, reward, judge) or a file of human labels")
    print_config(cfg)
    p = Pipeline(cfg)
    t_start = time.time()
    # 0. the prompt split
    train, held = split_prompts(cfg, p.path / "prompts")
    utility = cfg.feedback.get("utility", "")
    gold = cfg.gold or utility
    base = cfg.model

    # 1. optional SFT: its model is the policy and the reference from here on
    if cfg.sft:
        base = str(p.stage("sft", "sft", "rlhfkit.train.sft", "SFTConfig", {"model": cfg.model, **cfg.sft}) / "final")
    policy = base

    for r in range(1, cfg.rounds + 1):
        # 2. feedback on the current policy's samples
        if "file" in cfg.feedback:
            prefs = cfg.feedback["file"]
        else:
            label = p.stage(f"r{r}-feedback", "label", "rlhfkit.feedback.label", "LabelConfig",
                            {"model": policy, "train": train, **cfg.feedback}, entry="run_label")
            prefs = str(label / "preferences.jsonl")

        # 3. reward model (and its evaluation on the pairs it held out)
        rm = None
        if cfg.algorithm != "dpo" or cfg.reward_model:
            rm_fields = {"model": cfg.model, "train": prefs, **cfg.reward_model}
            rm_dir = p.stage(f"r{r}-rm", "rm", "rlhfkit.train.reward", "RMConfig", rm_fields)
            rm = str(rm_dir / "final")
            evaluate_rm(rm_dir, rm_fields)

        # 4. policy optimisation from the current policy, tethered to the base model
        common = {"model": policy, **({"reference": base} if policy != base else {})}
        rl_fields = {**common, "train": train, "eval": held, "reward": rm, "gold": gold, "eval_prompts": 0, **cfg.rl}
        if cfg.algorithm == "dpo":
            rl_dir = p.stage(f"r{r}-dpo", "dpo", "rlhfkit.train.dpo", "DPOConfig", {**common, "train": prefs, **cfg.rl})
        elif cfg.algorithm == "bon":  # rejection-sampling fine-tuning: rl.sft holds the SFT fields
            rl = {k: v for k, v in cfg.rl.items() if k != "sft"}
            bon = p.stage(f"r{r}-bon", "bon", "rlhfkit.train.best_of_n", "BoNConfig",
                          {"model": policy, "train": train, "reward": rm, **rl}, entry="run_bon")
            rl_dir = p.stage(f"r{r}-sft-best", "sft", "rlhfkit.train.sft", "SFTConfig",
                             {"model": policy, "train": str(bon / "best.jsonl"), **cfg.rl.get("sft", {})})
        else:
            module, cls = {"pg": ("rlhfkit.train.policy_gradient", "PGConfig"), "ppo": ("rlhfkit.train.ppo", "PPOConfig")}[
                cfg.algorithm]
            rl_dir = p.stage(f"r{r}-{cfg.algorithm}", cfg.algorithm, module, cls, rl_fields)
        policy = str(rl_dir / "final")

        # 5. evaluation on the held-out prompts: proxy, gold, KL, win rates, samples
        eval_fields = {"model": policy, "reference": base, "eval": held, "reward": rm or "", "gold": gold,
                       **{k: v for k, v in cfg.rl.items() if k in ("max_new_tokens", "temperature", "mixed_precision",
                                                                    "max_length")}, **cfg.evaluate}
        ev = p.stage(f"r{r}-eval", "eval-policy", "rlhfkit.eval.policy", "EvalPolicyConfig", eval_fields,
                     entry="run_eval")
        result = json.loads((ev / "eval.json").read_text())
        p.log(f"round {r}: " + ", ".join(f"{name} {x['reference']:.3f} -> {x['policy']:.3f} "
                                          f"({x['difference']:+.3f} ± {x['difference_se']:.3f})"
                                          for name, x in result["rewards"].items()) + f", KL {result['kl']:.2f}")

    report = write_pipeline_report(p.path, p.stages)
    p.run.finish(policy=policy, seconds=time.time() - t_start, **{
        f"{name}_{k}": v for name, x in result["rewards"].items() for k, v in x.items()})
    p.log(f"done in {time.time() - t_start:.0f} s; report: {report}")
    return p.path


def evaluate_rm(rm_dir: Path, rm_fields: dict) -> None:
    """Accuracy and calibration of a pipeline's reward model on the preference pairs its stage held out
    (written to <rm run>/eval; skipped when it held none out or did already)."""
    from rlhfkit.eval.reward import RMEvalConfig, evaluate, write

    eval_size = rm_fields.get("eval_size", 0)
    if not eval_size or (rm_dir / "eval" / "eval.json").is_file():
        return
    result = evaluate(RMEvalConfig(model=str(rm_dir / "final"), data=rm_fields["train"], eval_size=eval_size,
                                   split_seed=rm_fields.get("split_seed", 0), max_length=rm_fields.get("max_length", 512)))
    write(result, rm_dir / "eval")


def main(argv: list[str] | None = None) -> None:
    from rlhfkit.config import parse

    cfg = parse(PipelineConfig, sys.argv[1:] if argv is None else argv, prog="rlhfkit pipeline",
                description=PipelineConfig.__doc__)
    run_pipeline(cfg)
