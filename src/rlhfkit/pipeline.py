"""The whole loop from one config (``rlhfkit pipeline --config configs/quickstart.yaml``), as seed 004
lays it out and as InstructGPT and Anthropic's iterated online RLHF run it::

    0. split the prompts once into train and held-out (prompts/train.jsonl, prompts/heldout.jsonl)
    1. sft            optional: supervised fine-tuning; the result is the policy and the reference
    for each round r = 1..rounds, from the current policy:
    2. feedback       sample k responses per training prompt and label the pairs: a simulated
                      annotator with a hidden utility, an AI judge, a rule or reward, human labels
                      read from a file, or people in the annotation app (source: human): the
                      pipeline stops as "waiting" until they are done, and --resume goes on
    3. rm             train a reward model on those pairs (and evaluate it on the pairs held out)
    4. rl             ppo / pg against the RM with a KL tether to the reference, or dpo on the pairs
                      directly, or best-of-n sampling with the best answers as an SFT set (bon)
    5. eval           the new policy against the reference on the held-out prompts: proxy (RM) and
                      gold (the hidden utility, when there is one), KL, win rates, samples

Every stage's config is built from its section and checked (``resolve()``) before the first stage
runs, so a misspelt key or a bad value anywhere in the YAML fails at once, naming the section and the
key. The pipeline fills in what it owns (the model, the data, the reward model it just trained, the
seed); a field a section sets wins over the pipeline's value, and the pipeline says so.

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

from rlhfkit.config import RunArgs, announce, from_dict
from rlhfkit.data import load_records
from rlhfkit.data.split import split_records
from rlhfkit.errors import ConfigError, Waiting
from rlhfkit.eval.report import write_pipeline_report
from rlhfkit.eval.reward import RMEvalConfig, evaluate, write
from rlhfkit.run import Run
from rlhfkit.stages import STAGES


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
    {file: prefs.jsonl} for human labels read from a file; or {source: human, min_judgements: N, overlap: K,
    ...} (`rlhfkit annotate collect`) for people judging the round's samples in the annotation app."""
    wait: bool = False
    """With human feedback: poll until the people are done, instead of stopping as waiting."""
    reward_model: dict = field(default_factory=dict)
    """Reward-model fields (`rlhfkit rm train`)."""
    rl: dict = field(default_factory=dict)
    """Fields of the RL stage (`rlhfkit pg|ppo|dpo|bon`); for bon, rl.sft holds the fields of the SFT on
    the best answers."""
    evaluate: dict = field(default_factory=dict)
    """Fields of `rlhfkit eval policy` (eval_prompts, judge_model, ...); evaluate.human ({} or fields of
    `rlhfkit annotate ab`) adds a blind human A/B evaluation of the final policy."""
    name: str = "pipeline"
    """Pipeline name: its folder is <output-dir>/<name>."""

    def resolve(self) -> PipelineConfig:
        if not self.prompts:
            raise ConfigError("pipeline: --prompts FILE is required")
        if "file" in self.feedback and len(self.feedback) > 1:
            raise ConfigError(f"pipeline: feedback: with 'file' (human labels read from a file) no other field applies; "
                              f"got {', '.join(sorted(k for k in self.feedback if k != 'file'))}")
        source = self.feedback.get("source", "")
        if source not in ("", "human"):
            raise ConfigError(f"pipeline: feedback: source must be 'human' (people in the annotation app) or absent, "
                              f"got {source!r}")
        if (self.algorithm in ("pg", "ppo", "bon") and "file" not in self.feedback and not source
                and not self.feedback.get("labeler")):
            raise ConfigError("pipeline: feedback: give a labeler (simulated, reward, judge), a file of human labels, "
                              "or source: human")
        return self


RESUMABLE = {"sft", "rm", "ppo", "pg", "dpo"}  # stages with checkpoints; the others start again
OWNED = ("output_dir", "name", "resume")  # each stage's run directory is the pipeline's to choose
RL_STAGES = {"pg": ("pg", "pg"), "ppo": ("ppo", "ppo"), "dpo": ("dpo", "dpo")}  # algorithm -> (command, kind)
# every stage the pipeline may run: each one's module must sit in a layer below the pipeline's
# (tests/test_seams.py checks it against the import-linter layers, which cannot see a lookup by name)
RUNS = ("sft", "label", "annotate collect", "rm train", "pg", "ppo", "dpo", "bon", "eval policy", "annotate ab")


@dataclass
class Planned:
    """One stage of the pipeline, its config built and checked before anything runs."""

    name: str  # its run directory inside the pipeline's folder
    kind: str  # the run's stage kind (manifest)
    command: str  # its entry in rlhfkit.stages.STAGES
    cfg: object
    policy: bool = False  # its final/ is the round's new policy


def stage_config(p: PipelineConfig, folder: Path, name: str, kind: str, command: str, section: str,
                 filled: dict, fields: dict, notes: list[str]) -> Planned:
    """The config of one stage: the pipeline's ``filled`` values, then the section's ``fields`` over them
    (a section field that replaces a pipeline value is noted), checked by ``from_dict`` (unknown keys,
    types) and by the config's own ``resolve()``."""
    if command not in RUNS:
        raise RuntimeError(f"the pipeline runs only the stages in pipeline.RUNS, not '{command}'")
    owned = sorted(set(fields) & set(OWNED))
    if owned:
        raise ConfigError(f"pipeline: {section}: {', '.join(owned)} cannot be set in a section (the pipeline "
                          f"places each stage's run directory in {folder})")
    base = {"seed": p.seed, "progress": p.progress, "report_to": p.report_to, **filled}
    for key in sorted(set(fields) & set(base)):
        if fields[key] != base[key]:
            notes.append(f"{name}: {key} = {fields[key]!r} from the {section} section (the pipeline's: {base[key]!r})")
    resume = kind in RESUMABLE and (folder / name / "config.yaml").is_file()
    values = {**base, **fields, "output_dir": str(folder), "name": name, "resume": resume}
    cls = STAGES[command].config_class()
    cfg = from_dict(cls, values, where=f"pipeline: {section}")
    try:
        cfg.resolve()
    except ConfigError as e:
        raise ConfigError(f"pipeline: {section}: {e}") from None
    return Planned(name, kind, command, cfg)


def plan(p: PipelineConfig, folder: Path, train: str, held: str) -> tuple[list[Planned], list[str]]:
    """Every stage of every round, built and checked before the first one runs; and the notes on
    section fields that replace the pipeline's values."""
    notes: list[str] = []
    stages: list[Planned] = []

    def add(name, kind, command, section, filled, fields) -> Planned:
        stages.append(stage_config(p, folder, name, kind, command, section, filled, fields, notes))
        return stages[-1]

    # 1. optional SFT: its model is the policy and the reference from here on
    base = p.model
    if p.sft:
        base = str(folder / add("sft", "sft", "sft", "sft", {"model": p.model}, p.sft).name / "final")
    feedback = {k: v for k, v in p.feedback.items() if k not in ("file", "source")}
    human = p.feedback.get("source") == "human"
    utility = feedback.get("utility", "")
    gold = p.gold or utility
    policy = base
    for r in range(1, p.rounds + 1):
        # 2. feedback on the current policy's samples
        if "file" in p.feedback:
            prefs = p.feedback["file"]
        elif human:  # people judge the round's samples in the annotation app; the pipeline waits for them
            collect = add(f"r{r}-feedback", "human-feedback", "annotate collect", "feedback",
                          {"model": policy, "train": train, "dir": str(folder / "annotations"),
                           "project": f"{p.name}-r{r}", "wait": p.wait}, feedback)
            prefs = str(folder / collect.name / "preferences.jsonl")
        else:
            label = add(f"r{r}-feedback", "label", "label", "feedback", {"model": policy, "train": train}, feedback)
            prefs = str(folder / label.name / "preferences.jsonl")
        # 3. reward model
        rm = ""
        if p.algorithm != "dpo" or p.reward_model:
            rm_stage = add(f"r{r}-rm", "rm", "rm train", "reward_model", {"model": p.model, "train": prefs},
                           p.reward_model)
            rm = str(folder / rm_stage.name / "final")
        # 4. policy optimisation from the current policy, tethered to the base model
        common = {"model": policy, **({"reference": base} if policy != base else {})}
        if p.algorithm == "dpo":
            rl = add(f"r{r}-dpo", "dpo", "dpo", "rl", {**common, "train": prefs}, p.rl)
        elif p.algorithm == "bon":  # rejection-sampling fine-tuning: rl.sft holds the SFT fields
            bon = add(f"r{r}-bon", "bon", "bon", "rl", {"model": policy, "train": train, "reward": rm},
                      {k: v for k, v in p.rl.items() if k != "sft"})
            rl = add(f"r{r}-sft-best", "sft", "sft", "rl.sft",
                     {"model": policy, "train": str(folder / bon.name / "best.jsonl")}, p.rl.get("sft", {}))
        else:
            command, kind = RL_STAGES[p.algorithm]
            rl = add(f"r{r}-{p.algorithm}", kind, command, "rl", {**common, "train": train, "eval": held, "reward": rm,
                                                                   "gold": gold, "eval_prompts": 0}, p.rl)
        rl.policy = True
        policy = str(folder / rl.name / "final")
        # 5. evaluation on the held-out prompts: proxy, gold, KL, win rates, samples
        shared = {k: v for k, v in p.rl.items() if k in ("max_new_tokens", "temperature", "mixed_precision", "max_length")}
        evaluation = add(f"r{r}-eval", "eval-policy", "eval policy", "evaluate",
                         {"model": policy, "reference": base, "eval": held, "reward": rm, "gold": gold, **shared},
                         {k: v for k, v in p.evaluate.items() if k != "human"})
    # 6. optional: people compare the final policy with the reference, blind (annotate ab)
    if "human" in p.evaluate:
        add(f"r{p.rounds}-human-eval", "human-eval", "annotate ab", "evaluate.human",
            {"eval_run": str(folder / evaluation.name), "dir": str(folder / "annotations"), "project": f"{p.name}-ab",
             "wait": p.wait}, p.evaluate["human"] or {})
    return stages, notes


class Pipeline:
    """The pipeline folder, its manifest, and running or skipping one stage."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        if (Path(cfg.output_dir) / cfg.name / "config.yaml").is_file():
            cfg.resume = True  # a re-run continues: finished stages are skipped
        self.run = Run.open(cfg, "pipeline", inputs={"prompts": cfg.prompts, "model": cfg.model})
        self.path = self.run.path
        self.stages: list[dict] = []

    def log(self, msg: str) -> None:
        print(f"[pipeline] {msg}", file=sys.stderr, flush=True)

    def stage(self, planned: Planned) -> Path:
        """Run a planned stage unless it finished already; returns its run directory."""
        path, kind = self.path / planned.name, planned.kind
        status = Run(path, kind).manifest().get("status")
        record = {"name": planned.name, "stage": kind, "path": planned.name, "status": "finished"}
        if status == "finished":
            self.log(f"{planned.name}: finished before, skipped")
            self.stages.append(record | {"seconds": self.seconds(path)})
            self.save()
            return path
        resume = planned.cfg.resume
        if not resume and path.exists():
            shutil.rmtree(path)  # an interrupted stage without checkpoints starts again
        self.log(f"{planned.name}: {'resuming' if resume else 'running'} rlhfkit {planned.command}")
        t0 = time.time()
        STAGES[planned.command].entry()(planned.cfg)
        seconds = time.time() - t0 + (self.seconds(path) if resume else 0.0)
        Run(path, kind).update_manifest(pipeline_seconds=seconds)
        self.stages.append(record | {"seconds": seconds})
        self.save()
        return path

    @staticmethod
    def seconds(path: Path) -> float:
        return float(Run(path, "").manifest().get("pipeline_seconds", 0.0))

    def save(self) -> None:
        self.run.update_manifest(stages=self.stages)


def split_prompts(cfg: PipelineConfig, folder: Path) -> tuple[str, str]:
    """prompts/train.jsonl and prompts/heldout.jsonl, written once (the same split on every re-run)."""
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


def run(cfg: PipelineConfig) -> Run:
    cfg.resolve()
    announce(cfg, "pipeline", Path(cfg.output_dir) / cfg.name)
    folder = Path(cfg.output_dir) / cfg.name
    # every stage's config, checked before anything runs or is written
    stages, notes = plan(cfg, folder, str(folder / "prompts" / "train.jsonl"), str(folder / "prompts" / "heldout.jsonl"))
    p = Pipeline(cfg)
    for note in notes:
        p.log(note)
    t_start = time.time()
    # 0. the prompt split
    split_prompts(cfg, p.path / "prompts")
    result, policy = {}, cfg.model
    for planned in stages:
        try:
            path = p.stage(planned)
        except Waiting as w:  # human feedback: stop here until the people are done
            p.stages.append({"name": planned.name, "stage": planned.kind, "path": planned.name, "status": "waiting"})
            p.save()
            p.run.update_manifest(status="waiting", waiting=planned.name)
            write_pipeline_report(p.path, p.stages)
            p.log(f"{planned.name}: {w}")
            return p.run
        if planned.kind == "rm":
            evaluate_rm(path, planned.cfg)
        if planned.policy:
            policy = str(path / "final")
        if planned.kind == "eval-policy":
            result = json.loads((path / "eval.json").read_text())
            p.log(f"{planned.name}: " + ", ".join(f"{name} {x['reference']:.3f} -> {x['policy']:.3f} "
                                                  f"({x['difference']:+.3f} ± {x['difference_se']:.3f})"
                                                  for name, x in result["rewards"].items()) + f", KL {result['kl']:.2f}")

    report = write_pipeline_report(p.path, p.stages)
    p.run.finish(policy=policy, seconds=time.time() - t_start, **{
        f"{name}_{k}": v for name, x in result.get("rewards", {}).items() for k, v in x.items()})
    p.log(f"done in {time.time() - t_start:.0f} s; report: {report}")
    return p.run


def evaluate_rm(rm_dir: Path, rm_cfg) -> None:
    """Accuracy and calibration of a pipeline's reward model on the preference pairs its stage held out
    (written to <rm run>/eval; skipped when it held none out or did already)."""
    if not rm_cfg.eval_size or (rm_dir / "eval" / "eval.json").is_file():
        return
    result = evaluate(RMEvalConfig(model=str(rm_dir / "final"), data=rm_cfg.train, eval_size=rm_cfg.eval_size,
                                   split_seed=rm_cfg.split_seed, max_length=rm_cfg.max_length))
    write(result, rm_dir / "eval")
