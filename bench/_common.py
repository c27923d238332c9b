"""What the side-by-side training benchmarks share: the HH-RLHF pairs both frameworks see, the token
count they are measured by, and the driver that runs each framework in its own process and prints
one JSON line per framework and the ratio."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def timings(fn, repeats: int) -> list[float]:
    """Seconds for each of ``repeats`` calls of ``fn``, after one call to warm up."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def pairs(n: int):
    """The first n single-turn-response pairs of the seed-0 training split."""
    from rlhfkit.data import load_records, split_records

    train, _ = split_records(load_records(HH).records, 512, 0)
    return [r for r in train if isinstance(r.chosen, str) and isinstance(r.rejected, str)][:n]


def logical_tokens(records, tokenizer, max_length: int) -> list[int]:
    from rlhfkit.data import encode_prompt, encode_response

    out = []
    for r in records:
        p = len(encode_prompt(tokenizer, r.prompt))
        out.append(sum(min(max_length, p + len(encode_response(tokenizer, x))) for x in (r.chosen, r.rejected)))
    return out


def write_pairs(records, path: Path) -> Path:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps({"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected}) + "\n")
    return path


def trl_pairs(records):
    """The same pairs as a TRL conversational preference dataset."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": r.prompt, "chosen": [{"role": "assistant", "content": r.chosen}],
                               "rejected": [{"role": "assistant", "content": r.rejected}]} for r in records])


def child(args, runners):
    from rlhfkit.models import load_tokenizer

    records = pairs(args.pairs)
    tokens = logical_tokens(records, load_tokenizer("smollm2-135m-instruct"), args.max_length)
    times: list[float] = []
    runners[args.framework](args, records, times)
    steps = len(times)
    per_step_tokens = sum(tokens) / steps  # both frameworks see every pair once, in their own order
    tok_s = per_step_tokens * (steps - 1) / (times[-1] - times[0])
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"framework": args.framework, "pairs": len(records), "steps": steps, "batch": args.batch,
                      "max_length": args.max_length, "tokens_per_s": round(tok_s, 1),
                      "s_per_step": round((times[-1] - times[0]) / (steps - 1), 3), "peak_rss_gb": round(peak_gb, 2)}))


def main(script: str, description: str, runners: dict) -> None:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro", type=int, default=0, help="rlhfkit micro-batch (default: the whole batch, as TRL)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--framework", choices=list(runners), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.framework:
        return child(args, runners)
    results = {}
    for fw in runners:
        cmd = [sys.executable, script, "--framework", fw, "--pairs", str(args.pairs), "--batch", str(args.batch),
               "--micro", str(args.micro), "--max-length", str(args.max_length)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if out.returncode:
            sys.exit(f"{fw} failed:\n{out.stderr[-4000:]}")
        results[fw] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(results[fw]), flush=True)
    ratio = results["rlhfkit"]["tokens_per_s"] / results["trl"]["tokens_per_s"]
    print(json.dumps({"ratio_rlhfkit_over_trl": round(ratio, 2)}))
