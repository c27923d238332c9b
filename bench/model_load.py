"""Time loading the bundled model: the first load (GGUF de-quantised and converted to a
safetensors cache) against later loads (read from the cache), each in a fresh process.

    .venv/bin/python bench/model_load.py [--fresh-cache]

Prints one JSON line per measurement. Library imports (torch, transformers) are timed apart
from the load itself, since every Python process pays them once whatever it loads.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, time
t0 = time.perf_counter()
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
import transformers.models.llama.modeling_llama
from rlhfkit.models import load_causal_lm
t1 = time.perf_counter()
model, tok = load_causal_lm("smollm2-135m-instruct")
t2 = time.perf_counter()
print(json.dumps({"imports_s": round(t1 - t0, 3), "load_s": round(t2 - t1, 3)}))
"""


def run(env) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fresh-cache", action="store_true", help="convert into an empty temporary cache first")
    args = ap.parse_args()
    env = dict(os.environ)
    if args.fresh_cache:
        env["RLHFKIT_HOME"] = tempfile.mkdtemp(prefix="rlhfkit-bench-")
        print(json.dumps({"load": "first (GGUF conversion)", **run(env)}))
    for i in range(3):
        print(json.dumps({"load": f"cached #{i + 1}", **run(env)}))


if __name__ == "__main__":
    main()
