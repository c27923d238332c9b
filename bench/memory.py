"""Peak memory of each training stage on the bundled model: resident memory (RSS) on the CPU, and
``torch.cuda.max_memory_allocated`` on a GPU, with the phase of the run where each peak fell.

Each stage runs in its own process, from a shipped config, for a few steps, with its held-out evaluation
and final save. A thread in that process reads its resident memory every 10 ms; the RL stages' phases
(load, rollout, logprobs, update, held-out, save) are marked by wrapping the loop's phase functions, so
the report says which part needs the memory.

    .venv/bin/python bench/memory.py                              # ppo and pg (the rule configs), 2 steps
    .venv/bin/python bench/memory.py --stages sft,rm,dpo,pg,ppo --steps 3
    .venv/bin/python bench/memory.py --stages pg --set gradient_checkpointing=true   # any config override
    .venv/bin/python bench/memory.py --launch fsdp2 --processes 2  # under configs/accelerate/fsdp2.yaml

Prints one JSON line per stage and process (peak GB, peak per phase, seconds), then a table. The peak
is the kernel's high-water mark (``ru_maxrss``); the phases' peaks are sampled, and on a busy machine
the sampling thread can miss a short peak. GB here are 2^30 bytes, as in the other benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RULE = f"rule:{ROOT / 'configs' / 'rules' / 'concise-python.yaml'}"
PROMPTS = str(ROOT / "examples" / "prompts.jsonl")

HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
PAIRS = str(HH if HH.is_file() else ROOT / "examples" / "judge-pairs.jsonl")  # HH-RLHF when ../shared has it

# (command, config, overrides): each stage at a shipped config's size (a short held-out set)
STAGES = {
    "sft": (["sft"], "demo-sft.yaml", {"train": str(ROOT / "examples" / "demonstrations.jsonl"), "eval_size": 8}),
    "rm": (["rm", "train"], "hh-harmless-rm.yaml", {"train": PAIRS, "eval_size": 16, "ood_fit": 0}),
    "dpo": (["dpo"], "hh-harmless-dpo.yaml", {"train": PAIRS, "eval_size": 16}),
    "ppo": (["ppo"], "ppo-rule.yaml", {"train": PROMPTS, "reward": RULE}),
    "pg": (["pg"], "rloo-rule.yaml", {"train": PROMPTS, "reward": RULE}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", default="ppo,pg")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], help="a config override KEY=VALUE (repeatable)")
    ap.add_argument("--launch", default="", help="a config of configs/accelerate (e.g. fsdp2): run each stage "
                    "under accelerate launch with --processes processes and report every process's peak")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    rows = []
    for stage in args.stages.split(","):
        with tempfile.TemporaryDirectory() as out:
            cmd = [__file__, "--child", stage, "--steps", str(args.steps), *[f"--set={s}" for s in args.set]]
            if args.launch:
                cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
                       str(ROOT / "configs" / "accelerate" / f"{args.launch}.yaml"), "--num_processes",
                       str(args.processes), "--main_process_port", "0", *cmd]
            else:
                cmd = [sys.executable, *cmd]
            env = {**os.environ, "RLHFKIT_BENCH_OUT": out, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")
                   if args.launch else os.environ.get("OMP_NUM_THREADS", "")}
            proc = subprocess.run(cmd, capture_output=True, text=True, env={k: v for k, v in env.items() if v})
            lines = [json.loads(p.read_text()) for p in sorted(Path(out).glob("memory-rank*.json"))]
        if proc.returncode or not lines:
            print(proc.stdout[-2000:] + proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{stage} failed")
        for line in lines:
            line["strategy"] = args.launch or "one process"
            print(json.dumps(line), flush=True)
        rows += sorted(lines, key=lambda r: r["rank"])
    print(f"\n{'stage':<6} {'rank':>4} {'peak GB':>8}  {'where':<10} phases (GB)")
    for r in rows:
        phases = ", ".join(f"{k} {v:.2f}" for k, v in r["phases"].items())
        print(f"{r['stage']:<6} {r['rank']:>4} {r['peak_gb']:>8.2f}  {r['peak_phase']:<10} {phases}")


class Sampler(threading.Thread):
    """Reads this process's resident memory every 10 ms and keeps the peak of each phase."""

    def __init__(self):
        super().__init__(daemon=True)
        self.phase, self.peaks, self.page = "load", {}, os.sysconf("SC_PAGE_SIZE")
        self.timeline = [["load", 0]]  # each phase as it came, with its own peak: where in the run a peak fell
        self.cuda = None

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def mark(self, phase: str) -> None:
        self.take()
        self.phase = phase
        self.timeline.append([phase, 0])

    def take(self) -> None:
        used = self.rss() if self.cuda is None else self.cuda.max_memory_allocated()
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), used)
        self.timeline[-1][1] = max(self.timeline[-1][1], used)
        if self.cuda is not None:
            self.cuda.reset_peak_memory_stats()

    def run(self):
        while True:
            self.take()
            time.sleep(0.01)


def wrap(module, name: str, sampler: Sampler, phase: str, after: str | None = None) -> None:
    """Mark ``phase`` while ``module.name`` runs (and ``after`` once it returns)."""
    fn = getattr(module, name)

    def marked(*a, **kw):
        previous = sampler.phase
        sampler.mark(phase)
        try:
            return fn(*a, **kw)
        finally:
            sampler.mark(after or previous)

    setattr(module, name, marked)


def child(args) -> None:
    import torch
    import yaml

    import rlhfkit.run as run_module
    import rlhfkit.train.dpo as dpo
    import rlhfkit.train.policy_gradient as pg
    import rlhfkit.train.ppo as ppo
    import rlhfkit.train.reward as rm
    import rlhfkit.train.rl as rl
    import rlhfkit.train.sft as sft
    from rlhfkit.cli import main as cli

    stage = args.child
    command, config, overrides = STAGES[stage]
    cfg = yaml.safe_load((ROOT / "configs" / config).read_text())
    cfg.update(overrides, max_steps=args.steps, save_every=args.steps, progress=False,
               output_dir=os.environ["RLHFKIT_BENCH_OUT"], name=stage)
    for item in args.set:
        key, value = item.split("=", 1)
        cfg[key] = yaml.safe_load(value)
    path = Path(os.environ["RLHFKIT_BENCH_OUT"]) / f"config-rank{os.environ.get('RANK', '0')}.yaml"
    path.write_text(yaml.safe_dump(cfg))

    sampler = Sampler()
    if torch.cuda.is_available():
        sampler.cuda = torch.cuda
    for module in (ppo, pg):
        wrap(module, "rollout_phase", sampler, "rollout")
        wrap(module, "logprob_phase", sampler, "logprobs", after="update")
    for module in (sft, rm, dpo):
        wrap(module, "prepare_training", sampler, "load", after="train")
    wrap(rl, "compare_policies", sampler, "held-out")
    wrap(run_module.Run, "save_checkpoint", sampler, "checkpoint")
    wrap(run_module.Run, "save_final", sampler, "save")
    sampler.start()
    t0 = time.time()
    cli([*command, "--config", str(path)])
    sampler.mark("end")
    phases = {k: round(v / 2**30, 3) for k, v in sampler.peaks.items() if k != "end"}  # GB = 2^30 bytes, as elsewhere
    peak = max(phases, key=phases.get)
    # the kernel's own high-water mark: the sampling thread can miss a short peak on a busy machine
    exact = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 if sampler.cuda is None else phases[peak]
    rank = int(os.environ.get("RANK", "0"))  # each process writes its own file: printed lines would interleave
    (Path(os.environ["RLHFKIT_BENCH_OUT"]) / f"memory-rank{rank}.json").write_text(json.dumps({
        "stage": stage, "rank": rank, "config": config, "steps": args.steps, "overrides": args.set,
        "measure": "cuda max_memory_allocated" if sampler.cuda else "RSS", "peak_gb": round(exact, 3),
        "peak_phase": peak, "phases": phases, "seconds": round(time.time() - t0, 1),
        "timeline": [[p, round(v / 2**30, 3)] for p, v in sampler.timeline]}))


if __name__ == "__main__":
    main()
