"""``rlhfkit rm eval``: reward-model evaluation, written as JSON plus PNG plots.

* pairwise: accuracy (ties count as wrong), per-subset accuracy and RewardBench-style sections,
  calibration (ECE and a reliability plot of sigma(r_c - r_r)), a margin histogram, and the
  "shorter response wins" / "longer response wins" baselines on the same pairs;
* orm: best-of-n selection accuracy (n = solutions per question) against random, longest and
  shortest choice, and the AUC of the final-token score;
* prm: step accuracy and first-wrong-step detection against "no mistake" and "last step".
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from rlhfkit.config import Precision, announce
from rlhfkit.data import load_records, split_records
from rlhfkit.errors import ConfigError
from rlhfkit.eval import metrics
from rlhfkit.eval.report import pyplot
from rlhfkit.losses.supervision import prm_aggregate
from rlhfkit.models.groups import RECORD_KIND, encode_groups, forward_groups
from rlhfkit.models.reward import load_reward_model
from rlhfkit.platform.placement import make_accelerator, place


@dataclass
class RMEvalConfig:
    """Evaluate a reward model on held-out data; writes eval.json and PNG plots."""

    model: str = "smollm2-135m-instruct"
    """The reward model: a run's final/ folder or any AutoModelForSequenceClassification folder (a causal LM gets an untrained head)."""
    data: str = ""
    """Evaluation data (any format rlhfkit reads)."""
    kind: Literal["pairwise", "orm", "prm"] = "pairwise"
    """What the data holds: preference pairs, outcome-labelled solutions or step-labelled solutions."""
    eval_size: float = 0.0
    """Evaluate only the held-out part of --data: the same split as rm train's --eval-size/--split-seed."""
    split_seed: int = 0
    """Seed of that split."""
    split_by: str = ""
    """Hold out whole groups sharing this metadata field (as rm train's --split-by)."""
    fields: str = ""
    """Column mapping, e.g. 'prompt=input'."""
    group_by: str = "question_id"
    """ORM: the metadata field that groups solutions of one question for best-of-n."""
    sections: str = ""
    """RewardBench-style weighting: a JSON file {"section": ["subset", ...]} (and optionally "counts": {"subset": n})."""
    prm_aggregate: Literal["product", "min", "last"] = "product"
    """PRM: how step probabilities become a solution score."""
    threshold: float = 0.5
    """PRM: a step is flagged wrong when P(wrong) exceeds this."""
    max_length: int = 1024
    """Maximum tokens of prompt plus response."""
    batch_size: int = 16
    """Groups per forward pass."""
    mixed_precision: Precision = "no"
    """'bf16' or 'fp16': score under that autocast (about 3x faster on a CPU with AMX; results differ in the
    third digit); 'auto' picks by the hardware as the training stages do; 'no' is fp32."""
    seed: int = 0
    """Seed of the head when --model is a causal LM (an untrained reward head)."""
    output: str = ""
    """Folder for eval.json and plots (default: <model>/../eval, or ./rm-eval)."""

    def resolve(self) -> RMEvalConfig:
        if not self.data:
            raise ConfigError("rm eval: --data FILE is required")
        return self


@torch.no_grad()
def group_scores(rm, groups, pad_id: int, batch_size: int) -> list[list[torch.Tensor]]:
    """Head outputs per group: a list (one per group) of per-response token scores (T_k, labels)."""
    rm.eval()
    order = sorted(range(len(groups)), key=lambda i: len(groups[i].prompt) + max(map(len, groups[i].responses)))
    out: list = [None] * len(groups)
    for i in range(0, len(order), batch_size):
        idx = order[i: i + batch_size]
        chunk = [groups[j] for j in idx]
        scores, mask, k = forward_groups(rm, chunk, pad_id, share_prefix=True)
        lengths = mask.sum(-1).tolist()
        for b, j in enumerate(idx):
            out[j] = [scores[b * k + r, : int(lengths[b * k + r])].float().cpu() for r in range(len(chunk[b].responses))]
    return out


def evaluate_pairwise(groups, scores, records, cfg: RMEvalConfig) -> dict:
    rc = [s[0][-1, 0].item() for s in scores]
    rr = [s[1][-1, 0].item() for s in scores]
    ece, rows = metrics.reliability(rc, rr)
    acc = metrics.pairwise_accuracy(rc, rr)
    lc = [len(g.responses[0]) for g in groups]
    lr = [len(g.responses[1]) for g in groups]
    report = {
        "n": len(rc), "accuracy": acc, "accuracy_ci95": metrics.bootstrap_ci([float(c > r) for c, r in zip(rc, rr)]),
        "ties": sum(c == r for c, r in zip(rc, rr)), "ece": ece, "reliability": rows,
        "margin_mean": sum(c - r for c, r in zip(rc, rr)) / len(rc),
        "reward_mean": sum(rc + rr) / (2 * len(rc)),
        "baselines": {"shorter_wins": metrics.pairwise_accuracy([-x for x in lc], [-x for x in lr]),
                      "longer_wins": metrics.pairwise_accuracy(lc, lr)},
    }
    by_subset = defaultdict(list)
    for rec, c, r in zip(records, rc, rr):
        if rec.subset is not None:
            by_subset[rec.subset].append(float(c > r))
    if by_subset:
        report["subsets"] = {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(by_subset.items())}
        if cfg.sections:
            spec = json.loads(Path(cfg.sections).read_text())
            counts = {k: v["n"] for k, v in report["subsets"].items()} | spec.pop("counts", {})
            report["sections"] = metrics.section_scores({k: v["accuracy"] for k, v in report["subsets"].items()},
                                                        counts, spec)
    report["_plot"] = {"margins": [c - r for c, r in zip(rc, rr)]}
    return report


def evaluate_orm(groups, scores, records, cfg: RMEvalConfig) -> dict:
    final = [s[0][-1, 0].item() for s in scores]
    correct = [bool(r.correct) for r in records]
    by_q: dict = defaultdict(list)
    for rec, f, ok, g in zip(records, final, correct, groups):
        by_q[rec.meta.get(cfg.group_by, rec.source)].append((f, ok, len(g.responses[0])))
    qs = [v for v in by_q.values() if len(v) > 1]
    sizes = sorted({len(v) for v in qs})
    return {
        "n_solutions": len(final), "n_questions": len(qs), "candidates_per_question": sizes,
        "auc": metrics.auc(final, [int(x) for x in correct]),
        "best_of_n": metrics.best_of_n_accuracy([[(s, ok) for s, ok, _ in v] for v in qs]),
        "baselines": {
            "random": sum(sum(ok for _, ok, _ in v) / len(v) for v in qs) / max(len(qs), 1),
            "longest": metrics.best_of_n_accuracy([[(n, ok) for _, ok, n in v] for v in qs]),
            "shortest": metrics.best_of_n_accuracy([[(-n, ok) for _, ok, n in v] for v in qs]),
        },
        "fraction_correct": sum(correct) / max(len(correct), 1),
    }


def evaluate_prm(groups, scores, records, cfg: RMEvalConfig) -> dict:
    hits = seen = exact = none_base = last_base = 0
    solution_scores, outcome = [], []
    for g, s, rec in zip(groups, scores, records):
        probs = s[0][g.step_ends].softmax(-1)  # (steps, 3): wrong, neutral, correct
        labels = g.step_labels
        for p, lab in zip(probs, labels):
            if lab != -100:
                seen += 1
                hits += int(p.argmax().item() == lab)
        truth = next((i for i, lab in enumerate(rec.labels) if lab == -1), None)
        pred = metrics.first_wrong_step(probs[:, 0].tolist(), cfg.threshold)
        exact += pred == truth
        none_base += truth is None
        last_base += truth == len(rec.steps) - 1
        p_ok = probs[:, 2][None]
        solution_scores.append(prm_aggregate(p_ok, torch.ones_like(p_ok, dtype=torch.bool), cfg.prm_aggregate).item())
        outcome.append(int(truth is None))
    n = max(len(groups), 1)
    return {"n_traces": len(groups), "step_accuracy": hits / max(seen, 1), "labelled_steps": seen,
            "first_wrong_step_accuracy": exact / n,
            "baselines": {"no_mistake": none_base / n, "last_step": last_base / n},
            "aggregate": cfg.prm_aggregate, "solution_auc_no_mistake": metrics.auc(solution_scores, outcome)}


EVALUATORS = {"pairwise": evaluate_pairwise, "orm": evaluate_orm, "prm": evaluate_prm}


def evaluate(cfg: RMEvalConfig) -> dict:
    loaded = load_records(cfg.data, kind=RECORD_KIND[cfg.kind], fields=cfg.fields)
    records = loaded.records
    if cfg.eval_size:
        records = split_records(records, cfg.eval_size, cfg.split_seed, cfg.split_by)[1]
    rm, tokenizer = load_reward_model(cfg.model, num_labels=3 if cfg.kind == "prm" else 1, seed=cfg.seed)
    groups, report = encode_groups(records, cfg.kind, tokenizer, cfg.max_length)
    accelerator = make_accelerator(cfg)  # the bf16 autocast, as in training
    place(rm, accelerator.device)
    with accelerator.autocast():
        scores = group_scores(rm, groups, tokenizer.pad_token_id, cfg.batch_size)
    result = {"model": cfg.model, "data": cfg.data, "kind": cfg.kind, "eval_size": cfg.eval_size,
              "split_seed": cfg.split_seed, "mixed_precision": cfg.mixed_precision, "truncation": report}
    result.update(EVALUATORS[cfg.kind](groups, scores, records, cfg))
    return result


def write(result: dict, folder: Path) -> Path:
    """eval.json plus PNG plots (reliability diagram and margin histogram for pairwise)."""
    folder.mkdir(parents=True, exist_ok=True)
    plot = result.pop("_plot", None)
    (folder / "eval.json").write_text(json.dumps(result, indent=2))
    plt = pyplot() if plot is not None else None
    if plt is not None:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        rows = result["reliability"]
        ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
        ax.plot([r[2] for r in rows], [r[3] for r in rows], "o-", label=f"model (ECE {result['ece']:.3f})")
        ax.set(xlabel="predicted P(first preferred) = sigma(r_a - r_b)", ylabel="observed frequency",
               title="Reliability")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "reliability.png", dpi=100)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.hist(plot["margins"], bins=40, color="tab:blue")
        ax.axvline(0, color="black", lw=1)
        ax.set(xlabel="r(chosen) - r(rejected)", ylabel="pairs",
               title=f"Margins (accuracy {result['accuracy']:.3f})")
        fig.tight_layout()
        fig.savefig(folder / "margins.png", dpi=100)
        plt.close(fig)
    return folder


def run(cfg: RMEvalConfig) -> dict:
    """Evaluate, write eval.json and the plots, print the headline figures; returns the result."""
    cfg.resolve()
    announce(cfg, "rm eval")
    result = evaluate(cfg)
    model_dir = Path(cfg.model)
    folder = Path(cfg.output) if cfg.output else (model_dir.parent / "eval" if model_dir.is_dir() else Path("rm-eval"))
    write(result, folder)
    shown = {k: v for k, v in result.items() if k not in ("reliability", "truncation", "data", "model")}
    print(json.dumps(shown, indent=2))
    print(f"wrote {folder}/eval.json")
    return result
