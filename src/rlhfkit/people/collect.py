"""Human feedback as a stage of the loop (``rlhfkit annotate collect``; the pipeline's
``feedback: {source: human, ...}``): put the current policy's samples to people and wait for them.

1. The first time: sample ``k`` responses per training prompt from the policy (the rollout engine),
   create an annotation project of every pair in the database (``--dir`` or ``--db``), say how to
   serve it and add annotators, and stop as **waiting** (manifest status ``waiting``; the command
   exits 0). With ``--wait`` it polls instead.
2. Run again (``rlhfkit pipeline --resume``): once ``min_judgements`` items are complete (each with
   ``overlap`` judgements) it exports them to ``preferences.jsonl``, which the reward model trains on,
   writes the agreement statistics to ``agreement.json``, and finishes; otherwise it says how many
   items are missing and waits again.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

from rlhfkit.config import DataArgs, RunArgs, announce
from rlhfkit.errors import ConfigError, Waiting
from rlhfkit.people.projects import AnnotateArgs, items_for, sample_groups, wrap
from rlhfkit.rollout.phase import SamplingArgs
from rlhfkit.run import Run

try:  # the annotate extra
    from rlhfkit.people import store
    from rlhfkit.people.agreement import agreement
    from rlhfkit.people.export import export
except ImportError:  # pragma: no cover - exercised only without the extra
    store = None


@dataclass
class PeopleArgs(AnnotateArgs):
    """What a stage that waits for people needs: the project, how many judge each item, when it is done."""

    project: str = ""
    """The annotation project (default: the run's name)."""
    overlap: int = 3
    """Annotators per item."""
    min_judgements: int = 0
    """Complete items needed before the stage finishes (0: every item)."""
    strength: int = 1
    """The strength scale of the pairwise page (1: left / tie / right; 3: much better ... slightly better)."""
    guidelines: str = ""
    """A Markdown file shown above every item."""
    wait: bool = False
    """Poll until the judgements are in, instead of stopping as waiting."""
    poll_seconds: float = 10.0
    """Seconds between polls with --wait."""
    url: str = "http://127.0.0.1:8200"
    """Where annotators reach the app (printed in the instructions)."""


@dataclass
class CollectConfig(RunArgs, PeopleArgs, DataArgs, SamplingArgs):
    """Put the policy's samples to people as pairwise judgements and wait until enough are complete;
    then export them for the reward model."""

    model: str = "smollm2-135m-instruct"
    """The policy whose samples people judge."""
    k: int = 2
    """Responses sampled per prompt; every pair of them is an item."""
    batch_size: int = 8
    """Prompts per sampling batch."""

    def resolve(self) -> CollectConfig:
        if not self.train:
            raise ConfigError("annotate collect: --train PROMPTS is required")
        if self.k < 2:
            raise ConfigError("annotate collect: --k must be at least 2 to make pairs")
        if self.overlap < 1 or self.min_judgements < 0:
            raise ConfigError("annotate collect: --overlap must be at least 1 and --min-judgements at least 0")
        return self


def instructions(cfg: CollectConfig, project: str, missing: int, total: int) -> str:
    where = f"--db {cfg.db}" if cfg.db else f"--dir {cfg.dir}"
    return (f"waiting for people: project {project!r} has {total - missing} of the {total} complete items it needs "
            f"({missing} missing, {cfg.overlap} judgements each).\n"
            f"  serve it:        rlhfkit annotate serve {where}   (annotators open {cfg.url}/login)\n"
            f"  add annotators:  rlhfkit annotate users add NAME {where}\n"
            f"  progress:        rlhfkit annotate stats --project {project} {where}\n"
            f"then run the same command again (rlhfkit pipeline ... --resume), or pass --wait to poll.")


def wait_for_people(cfg, db, project: str, run: Run) -> dict:
    """Return once ``cfg.min_judgements`` items (0: all) of ``project`` are complete. Otherwise the run is
    marked waiting and :class:`Waiting` says what is missing, or, with ``cfg.wait``, it polls."""
    while True:
        progress = store.completion(db, project)
        need = cfg.min_judgements or progress["items"]
        missing = max(0, need - progress["complete"])
        if not missing:
            return progress
        message = instructions(cfg, project, missing, need)
        run.update_manifest(status="waiting", waiting={"project": project, "complete": progress["complete"],
                                                       "needed": need})
        if not cfg.wait:
            raise Waiting(message)
        print(message, file=sys.stderr, flush=True)
        time.sleep(cfg.poll_seconds)


def run(cfg: CollectConfig) -> Run:
    cfg.resolve()
    run = Run.open(cfg, "human-feedback", inputs={"train": cfg.train, "model": cfg.model})
    announce(cfg, "annotate collect", run.path)
    project = cfg.project or run.path.name
    db = cfg.open()
    if not store.project_exists(db, project):
        items, left = items_for("pairwise", sample_groups(cfg))
        guidelines = open(cfg.guidelines).read() if cfg.guidelines else ""
        wrap(store.create_project, db, project, "pairwise", cfg.overlap, items, (), guidelines,
             {"strength": cfg.strength, "reason": True})
        run.update_manifest(project={"name": project, "items": len(items), "left_out": left})
    wait_for_people(cfg, db, project, run)
    exported = export(db, project, run.path)
    stats = agreement(db, project)
    (run.path / "agreement.json").write_text(json.dumps(stats, indent=1))
    run.finish(project=project, pairs=exported.get("rows", 0), ties_dropped=exported.get("ties_dropped", 0),
               judgements=exported["judgements"], percent_agreement=stats.get("percent_agreement"),
               krippendorff_alpha=stats.get("krippendorff_alpha"))
    print(f"{project}: {exported.get('rows', 0)} preference pairs exported to {run.path / 'preferences.jsonl'}",
          file=sys.stderr)
    return run
