"""Rollout throughput: rlhfkit's sampler against Hugging Face ``generate``, side by side in one run.

Same model (the bundled SmolLM2-135M-Instruct), the same left-padded prompts from
examples/prompts.jsonl, the same temperature, top-p and number of new tokens, EOS disabled in both
(every row generates exactly --new-tokens tokens, so both produce the same amount of work). Both
return what PPO needs: the tokens and the temperature-scaled logprob of each sampled token
(``generate`` through ``output_logits=True`` and a log-softmax of logits / T afterwards).
Each side runs --repeats times, alternating; the median is reported.

    .venv/bin/python bench/rollout.py --batch 16 --new-tokens 48

Prints one JSON line per sampler and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bf16", action="store_true", help="run both under bf16 autocast")
    args = ap.parse_args()

    from rlhfkit.data.template import encode_prompt, pad
    from rlhfkit.models import load_causal_lm
    from rlhfkit.rollout.sampler import sample

    model, tok = load_causal_lm("smollm2-135m-instruct")
    rows = [json.loads(line) for line in open(ROOT / "examples" / "prompts.jsonl")][: args.batch]
    prompts = [encode_prompt(tok, [{"role": "user", "content": r["prompt"]}]) for r in rows]
    n_tokens = args.batch * args.new_tokens
    never = tok.vocab_size + 10  # an id no token has: neither sampler stops early

    def ours():
        out = sample(model, prompts, tok.pad_token_id, never, max_new_tokens=args.new_tokens,
                     temperature=args.temperature, top_p=args.top_p, generator=torch.Generator().manual_seed(0))
        return out.response_ids.shape, out.logprobs

    ids = pad(prompts, tok.pad_token_id, "left")
    mask = pad([[1] * len(p) for p in prompts], 0, "left")

    def hf():
        torch.manual_seed(0)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=args.temperature,
                             top_p=args.top_p, top_k=0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                             pad_token_id=tok.pad_token_id, output_logits=True, return_dict_in_generate=True)
        new = out.sequences[:, ids.shape[1]:]
        logits = torch.stack(out.logits, 1).float() / args.temperature
        logp = logits.log_softmax(-1).gather(-1, new[..., None]).squeeze(-1)
        return new.shape, logp

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else torch.autocast("cpu", enabled=False)
    times = {"rlhfkit": [], "hf_generate": []}
    with torch.no_grad(), ctx:
        ours(), hf()  # warm-up
        for _ in range(args.repeats):
            for name, fn in (("rlhfkit", ours), ("hf_generate", hf)):
                t = time.perf_counter()
                shape, _ = fn()
                times[name].append(time.perf_counter() - t)
                assert tuple(shape) == (args.batch, args.new_tokens), shape
    result = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        result[name] = {"seconds": round(med, 3), "tokens_per_s": round(n_tokens / med, 1), "runs": [round(t, 3) for t in ts]}
        print(json.dumps({"sampler": name, "batch": args.batch, "new_tokens": args.new_tokens, "bf16": args.bf16,
                          **result[name]}))
    print(json.dumps({"ratio_rlhfkit_over_hf": round(result["rlhfkit"]["tokens_per_s"] / result["hf_generate"]["tokens_per_s"], 3)}))


if __name__ == "__main__":
    main()
