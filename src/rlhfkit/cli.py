"""``rlhfkit <stage> [flags]``: one subcommand per stage. Each stage's flags are its config
dataclass (``rlhfkit <stage> --help``); ``--config file.yaml`` supplies their defaults."""

from __future__ import annotations

import importlib
import sys

# command -> (module with main(argv), one-line description). Stages without a module yet are
# listed so the loop is visible, and say which issue brings them.
STAGES: dict[str, tuple[str | None, str]] = {
    "data inspect": ("rlhfkit.data.inspect", "report a data file's format, counts, token lengths and problems"),
    "sft": ("rlhfkit.train.sft", "stage 0: supervised fine-tuning on demonstrations"),
    "rm train": ("rlhfkit.train.reward", "train a reward model (pairwise, ranking, rating, orm, prm)"),
    "rm eval": ("rlhfkit.eval.reward", "evaluate a reward model: accuracy, calibration, best-of-n, step detection"),
    "rm score": ("rlhfkit.eval.score", "score (prompt, response) records with a reward model"),
    "ppo": ("rlhfkit.train.ppo", "PPO actor-critic with a KL penalty to the reference"),
    "pg": ("rlhfkit.train.policy_gradient", "critic-free policy gradient: reinforce, rloo, grpo, dr_grpo"),
    "bon": ("rlhfkit.train.best_of_n", "best-of-n sampling against a reward"),
    "dpo": ("rlhfkit.train.dpo", "direct preference optimisation and its variants"),
    "judge": ("rlhfkit.feedback.judge", "LLM-as-judge: pairwise (order-swapped) or single-answer grading"),
    "label": ("rlhfkit.feedback.label", "AI feedback: sample responses and label them with a judge, RM or rule"),
    "eval policy": ("rlhfkit.eval.policy", "evaluate a policy against its reference on held-out prompts"),
    "pipeline": ("rlhfkit.pipeline", "the whole loop from one config: feedback, RM, RL, eval, report"),
}


def usage() -> str:
    lines = ["usage: rlhfkit <stage> [flags]   (rlhfkit <stage> --help lists a stage's flags)", "", "stages:"]
    for name, (module, desc) in STAGES.items():
        lines.append(f"  {name:<14} {desc}" + ("" if module else "  [not built yet]"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    if argv[0] in ("-V", "--version"):
        from rlhfkit import __version__

        print(f"rlhfkit {__version__}")
        return
    command = " ".join(argv[:2]) if " ".join(argv[:2]) in STAGES else argv[0]
    if command not in STAGES:
        groups = sorted({n.split()[0] for n in STAGES if n.startswith(argv[0] + " ")})
        hint = f"; '{argv[0]}' needs one of: {', '.join(n for n in STAGES if n.split()[0] in groups)}" if groups else ""
        print(f"error: unknown stage '{' '.join(argv[:2])}'{hint}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    module, _ = STAGES[command]
    if module is None:
        print(f"error: 'rlhfkit {command}' is not built yet in this version", file=sys.stderr)
        raise SystemExit(2)
    importlib.import_module(module).main(argv[len(command.split()):])


if __name__ == "__main__":
    main()
