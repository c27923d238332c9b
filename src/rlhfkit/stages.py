"""Every stage, registered once: its module, its config dataclass and its entry point ``run(cfg)``.

The command line (``rlhfkit <stage>``) and the pipeline both look stages up here and call the same
``run(cfg)``; a config checks itself (``cfg.resolve()``: presets, required fields, consistency) at the
start of ``run``, and the pipeline calls ``resolve()`` on every stage's config before the first stage
starts. Modules are imported only when their stage is used, so ``rlhfkit --help`` stays fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    module: str
    config: str
    help: str
    function: str = "run"

    def config_class(self) -> type:
        return getattr(importlib.import_module(self.module), self.config)

    def entry(self):
        """The stage's ``run(cfg)``: a :class:`rlhfkit.run.Run` for stages with a run directory."""
        return getattr(importlib.import_module(self.module), self.function)


STAGES: dict[str, Stage] = {
    "data inspect": Stage("rlhfkit.eval.inspect", "InspectConfig",
                          "report a data file's format, counts, token lengths and problems"),
    "sft": Stage("rlhfkit.train.sft", "SFTConfig", "stage 0: supervised fine-tuning on demonstrations"),
    "rm train": Stage("rlhfkit.train.reward", "RMConfig", "train a reward model (pairwise, ranking, rating, orm, prm)"),
    "rm eval": Stage("rlhfkit.eval.reward", "RMEvalConfig",
                     "evaluate a reward model: accuracy, calibration, best-of-n, step detection"),
    "rm score": Stage("rlhfkit.eval.score", "ScoreConfig", "score (prompt, response) records with any --reward (RM, rules, HTTP, sums)"),
    "ppo": Stage("rlhfkit.train.ppo", "PPOConfig", "PPO actor-critic with a KL penalty to the reference"),
    "pg": Stage("rlhfkit.train.policy_gradient", "PGConfig", "critic-free policy gradient: reinforce, rloo, grpo, dr_grpo"),
    "bon": Stage("rlhfkit.train.best_of_n", "BoNConfig", "best-of-n sampling against a reward"),
    "dpo": Stage("rlhfkit.train.dpo", "DPOConfig", "direct preference optimisation and its variants"),
    "judge": Stage("rlhfkit.feedback.judge", "JudgeConfig",
                   "LLM-as-judge: pairwise (order-swapped) or single-answer grading"),
    "label": Stage("rlhfkit.feedback.label", "LabelConfig",
                   "AI feedback: sample responses and label them with a judge, RM or rule"),
    # eval policy, with --human the blind human A/B on its answers (people/ sits above eval/)
    "eval policy": Stage("rlhfkit.people.ab", "EvalPolicyHumanConfig",
                         "evaluate a policy against its reference on held-out prompts (--human: and by people, blind)",
                         "run_eval_policy"),
    "pipeline": Stage("rlhfkit.pipeline", "PipelineConfig",
                      "the whole loop from one config: feedback, RM, RL, eval, report"),
    "serve reward": Stage("rlhfkit.serve.reward", "ServeRewardConfig",
                          "serve a reward model over HTTP (OpenRLHF's /get_reward and /v1/score)"),
    "serve policy": Stage("rlhfkit.serve.policy", "ServePolicyConfig",
                          "serve a policy over the OpenAI chat-completions API"),
    "annotate create": Stage("rlhfkit.people.projects", "CreateConfig",
                             "create an annotation project (pairwise, ranking, likert, steps, critique)", "run_create"),
    "annotate serve": Stage("rlhfkit.annotate.serve", "AnnotateServeConfig",
                            "serve the annotation web app (SQLite or PostgreSQL)", "run_serve"),
    "annotate users": Stage("rlhfkit.people.projects", "UsersConfig",
                            "add, list, disable or enable annotators and admins", "run_users"),
    "annotate export": Stage("rlhfkit.people.projects", "AnnotateExportConfig",
                             "export judgements for rm train / dpo, and every annotator event", "run_export"),
    "annotate collect": Stage("rlhfkit.people.collect", "CollectConfig",
                              "human feedback as a stage: put samples to people, wait, export for the RM"),
    "annotate ab": Stage("rlhfkit.people.ab", "ABConfig",
                         "blind human A/B evaluation of a policy against its reference (from an eval policy run)"),
    "annotate stats": Stage("rlhfkit.people.projects", "StatsConfig",
                            "progress of an annotation project, per annotator", "run_stats"),
    "export": Stage("rlhfkit.serve.export", "ExportConfig",
                    "export a policy: merged Hugging Face folder or GGUF (f16, bf16, Q8_0)"),
}
