"""Rollout throughput: Hugging Face ``generate``, rlhfkit's ``hf`` engine and its ``vllm`` engine, side by
side in one run, against the decode limit of this machine.

Same model (the bundled SmolLM2-135M-Instruct), the same chat-templated prompts from
examples/prompts.jsonl, the same temperature and number of new tokens, top-p = 1 and top-k off, EOS
disabled everywhere (every row generates exactly --new-tokens tokens, so each side does the same
work). Each side returns what RL needs: the tokens and the temperature-scaled logprob of each sampled
token (``generate`` through ``output_logits=True`` and a log-softmax of logits / T afterwards). HF
``generate`` and the hf engine run --repeats times each, alternating; the median is reported. vLLM
runs in a child process, in its own environment where vLLM is not installed here (``make
vllm-venv``), and its start-up is reported separately.

The decode limit: the least work any engine must do, at this machine's measured matmul peak (a
1024^3 product) and read bandwidth. Each of the B x N new tokens costs 2 FLOPs per weight of the
linear layers and the LM head, and each decoding step reads those weights once. The prompts must be
prefilled through the layers once per distinct token (their common prefix once, as the hf engine
does), with the LM head at each prompt's last position only. With W = layer weights, H = LM-head
weights and P = distinct prompt tokens, the limit is
B N / max(2 (W (P + B N) + H B (N + 1)) / peak, N bytes(W + H) / bandwidth). Engines are reported as a
fraction of it.

    .venv/bin/python bench/rollout.py                      # batch 32 and 128, 64 new tokens, fp32
    .venv/bin/python bench/rollout.py --batches 32 --repeats 2 --dtype bf16

Prints one JSON line per engine and batch, then the ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
from _common import timings

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def prompts_for(tok, n: int) -> list[list[int]]:
    from rlhfkit.data.template import encode_prompt

    rows = [json.loads(line) for line in open(ROOT / "examples" / "prompts.jsonl")]
    rows = (rows * (n // len(rows) + 1))[:n]
    return [encode_prompt(tok, [{"role": "user", "content": r["prompt"]}]) for r in rows]


def probe() -> dict:
    """This machine's fp32 matmul peak (GFLOP/s, a 1024^3 product, the faster of ``F.linear``'s BLAS and
    oneDNN, which differ by 2x on some CPUs) and read bandwidth (GB/s)."""
    from rlhfkit.platform.kernels import onednn_linear

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    x = torch.randn(64 * 2**20)

    def best(fn, n):
        return min(timings(fn, n))

    kernels = {"blas": lambda: a @ b}
    if torch.backends.mkldnn.is_available():
        kernels["onednn"] = lambda: onednn_linear(a, b)
    peaks = {name: round(2 * 1024**3 / best(fn, 20) / 1e9, 1) for name, fn in kernels.items()}
    return {"matmul_gflops": max(peaks.values()), "matmul_gflops_by_kernel": peaks,
            "read_gbps": round(x.numel() * 4 / best(x.sum, 20) / 1e9, 1)}


def decode_limit(model, prompts, new_tokens: int, machine: dict, bytes_per_weight: int) -> float:
    """Tokens/s the machine allows at best (see the module docstring)."""
    head = model.get_output_embeddings().weight.numel()
    layers = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)) - head
    shared = len(os.path.commonprefix(prompts))
    distinct = shared + sum(len(p) - shared for p in prompts)
    tokens = len(prompts) * new_tokens
    flops = 2 * (layers * (distinct + tokens) + head * len(prompts) * (new_tokens + 1))
    compute = flops / (machine["matmul_gflops"] * 1e9)
    memory = new_tokens * (layers + head) * bytes_per_weight / (machine["read_gbps"] * 1e9)
    return tokens / max(compute, memory)


def never_token(tok) -> int:
    return len(tok) + 10  # an id no token has: no engine stops early


def measured(fn, repeats: int, tokens: int) -> dict:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"seconds": round(med, 3), "tokens_per_s": round(tokens / med, 1), "runs": [round(t, 2) for t in times]}


def engine_run(engine, prompts, params, new_tokens: int) -> None:
    ro = engine.generate(prompts, params, torch.Generator().manual_seed(0))
    assert tuple(ro.response_ids.shape) == (len(prompts), new_tokens), ro.response_ids.shape


def generate_run(model, tok, ids, mask, args) -> None:
    """HF generate, returning what RL needs: tokens and their temperature-scaled logprobs."""
    torch.manual_seed(0)
    res = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=args.temperature,
                         top_p=1.0, top_k=0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                         pad_token_id=tok.pad_token_id, output_logits=True, return_dict_in_generate=True)
    new = res.sequences[:, ids.shape[1]:]
    logits = torch.stack(res.logits, 1).float() / args.temperature
    logits.log_softmax(-1).gather(-1, new[..., None])
    assert tuple(new.shape) == (ids.shape[0], args.new_tokens)


def hf_side(args, batches, machine) -> list[dict]:
    """HF generate and the hf engine, alternating, for each batch size."""
    from rlhfkit.data.template import pad
    from rlhfkit.models import load_causal_lm
    from rlhfkit.rollout.engine import SamplingParams, make_engine

    model, tok = load_causal_lm(args.model)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    device = torch.device(args.device)
    model = model.to(dtype)
    engine = make_engine("hf", model, device)
    out = []
    for batch in batches:
        prompts = prompts_for(tok, batch)
        params = SamplingParams(tok.pad_token_id, never_token(tok), max_new_tokens=args.new_tokens,
                                temperature=args.temperature)
        ids = pad(prompts, tok.pad_token_id, "left").to(device)
        mask = pad([[1] * len(p) for p in prompts], 0, "left").to(device)

        ours = partial(engine_run, engine, prompts, params, args.new_tokens)
        hf = partial(generate_run, model, tok, ids, mask, args)

        limit = decode_limit(model, prompts, args.new_tokens, machine, 2 if dtype == torch.bfloat16 else 4)
        tokens = batch * args.new_tokens
        with torch.no_grad():
            ours(), hf()  # warm-up (and the hf engine packs its weights)
            times: dict = {"hf_generate": [], "hf": []}
            for _ in range(args.repeats):
                for name, fn in (("hf", ours), ("hf_generate", hf)):
                    times[name].append(measured(fn, 1, tokens)["seconds"])
        for name, ts in times.items():
            med = statistics.median(ts)
            out.append({"engine": name, "batch": batch, "new_tokens": args.new_tokens, "dtype": args.dtype,
                        "seconds": round(med, 3), "tokens_per_s": round(tokens / med, 1), "runs": ts,
                        "fraction_of_limit": round(tokens / med / limit, 3), "limit_tokens_per_s": round(limit, 1)})
    return out


def vllm_child(args) -> None:
    """In the vLLM environment: start the engine (timed), then each batch --repeats times."""
    from rlhfkit.models import load_causal_lm
    from rlhfkit.rollout.engine import SamplingParams, make_engine

    model, tok = load_causal_lm(args.model)
    model = model.to(torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    t = time.perf_counter()
    engine = make_engine("vllm", model, torch.device(args.device))
    start = time.perf_counter() - t
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = prompts_for(tok, batch)
        params = SamplingParams(tok.pad_token_id, never_token(tok), max_new_tokens=args.new_tokens,
                                temperature=args.temperature)

        run = partial(engine_run, engine, prompts, params, args.new_tokens)

        run()  # warm-up
        print(json.dumps({"engine": "vllm", "batch": batch, "new_tokens": args.new_tokens, "dtype": args.dtype,
                          "startup_s": round(start, 1), **measured(run, args.repeats, batch * args.new_tokens)}),
              flush=True)


def vllm_side(args) -> list[dict]:
    python = sys.executable if importlib.util.find_spec("vllm") else str(VLLM_PYTHON)
    if not Path(python).exists():
        print(json.dumps({"engine": "vllm", "skipped": "vLLM is not installed here and .venv-vllm is missing "
                                                      "(make vllm-venv)"}))
        return []
    cmd = [python, __file__, "--child-vllm", "--model", args.model, "--device", args.device, "--batches", args.batches, "--new-tokens", str(args.new_tokens),
           "--temperature", str(args.temperature), "--repeats", str(args.repeats), "--dtype", args.dtype]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if res.returncode:
        sys.exit(f"vllm failed:\n{res.stderr[-4000:]}")
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="32,128")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the machine probe is the CPU's)")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--child-vllm", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_vllm:
        return vllm_child(args)
    machine = probe()
    print(json.dumps({"machine": machine, "threads": torch.get_num_threads()}), flush=True)
    rows = hf_side(args, [int(b) for b in args.batches.split(",")], machine)
    for row in rows:
        print(json.dumps(row), flush=True)
    if not args.no_vllm:
        for row in vllm_side(args):
            limit = next(r["limit_tokens_per_s"] for r in rows if r["batch"] == row["batch"])
            row["fraction_of_limit"] = round(row["tokens_per_s"] / limit, 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    speed = {(r["engine"], r["batch"]): r["tokens_per_s"] for r in rows}
    for batch in sorted({r["batch"] for r in rows}):
        base = speed[("hf_generate", batch)]
        print(json.dumps({"batch": batch, **{f"{e}_over_hf_generate": round(speed[(e, b)] / base, 2)
                                            for e, b in speed if b == batch and e != "hf_generate"}}))


if __name__ == "__main__":
    main()
