#!/usr/bin/env bash
# The GPU check: what only a GPU machine can show, in one script that ends within 5 minutes on one GPU.
#
#   bash bench/gpu_check.sh        # writes $OUT/gpu_check.log (OUT defaults to /tmp/gpu-check)
#
# 1. the CUDA + bf16 training path: `rlhfkit pg` (RLOO, LoRA) for 3 steps on the GPU under bf16;
# 2. rollout tokens/s on the GPU: the hf engine against HF generate, batch 32 and 128 x 64 new tokens,
#    and the vllm engine when vLLM is importable (bench/rollout.py --device cuda);
# 3. the vLLM engine on the GPU: greedy output against the hf engine, weight sync, and the logprob
#    mismatch with the trainer (tests/test_rollout_vllm.py with RLHFKIT_TEST_DEVICE=cuda);
# 4. every training stage for 2 steps under configs/accelerate/fsdp2.yaml and zero3.yaml (world size 1).
#
# The lent machines have torch, transformers, peft and accelerate but not tyro or gguf: carry them as
# wheels in .whl/ (bench/gpu_wheels.sh fetches them here), installed below into /tmp/site. The bundled
# GGUF (94 MB) is over what travels, so without it the check uses a random model of SmolLM2-135M's
# depth and width (tiny:30x576): the same work per token, and no learning is claimed from it. vLLM's GPU
# wheel is over the limit too; without vLLM, parts 2 and 3 say so and skip it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
status=0
step() { echo "== $1" | tee -a "$LOG"; shift; timeout "$@" 2>&1 | tee -a "$LOG"; local rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || { echo "!! rc=$rc" | tee -a "$LOG"; status=1; }; }

$PY -c "import torch; print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '', 'bf16', torch.cuda.is_available() and torch.cuda.is_bf16_supported(), 'torch', torch.__version__)" | tee "$LOG"
MODEL=$($PY -c "from rlhfkit.models.loading import resolve_model_path as r; r('smollm2-135m-instruct'); print('smollm2-135m-instruct')" 2>/dev/null || echo "tiny:30x576")
echo "model: $MODEL" | tee -a "$LOG"

step "1. pg on the GPU under bf16" 120 $PY -m rlhfkit pg --model "$MODEL" --train examples/prompts.jsonl \
  --reward rule:configs/rules/concise-python.yaml --estimator rloo --samples-per-prompt 4 --batch-size 8 \
  --micro-batch-size 8 --lora-r 16 --mixed-precision bf16 --max-steps 3 --eval-size 16 --eval-prompts 16 \
  --output-dir "$OUT/runs" --name gpu-pg --no-progress
$PY - "$OUT/runs/gpu-pg/metrics.jsonl" <<'EOF' 2>&1 | tee -a "$LOG" || status=1
import json, math, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
keys = ("time", "policy_loss", "kl", "ratio_first_minibatch", "time_generate", "time_train")
for r in rows:
    print({k: r.get(k) for k in keys})
assert all(math.isfinite(r["policy_loss"]) for r in rows) and abs(rows[0]["ratio_first_minibatch"] - 1) < 1e-2
EOF

step "2. rollout throughput on the GPU" 150 $PY bench/rollout.py --device cuda --model "$MODEL" --batches 32,128 \
  --repeats 3 --dtype bf16 $($PY -c "import vllm" 2>/dev/null || echo --no-vllm)

if $PY -c "import vllm" 2>/dev/null; then
  step "3. the vLLM engine on the GPU" 150 env RLHFKIT_TEST_DEVICE=cuda $PY -m pytest -q -s -p no:cacheprovider \
    tests/test_rollout_vllm.py $([ "$MODEL" = smollm2-135m-instruct ] && echo "-k not pg_with" || echo "-k full_fine_tuning")
else
  echo "== 3. the vLLM engine on the GPU: skipped, vLLM is not installed on this machine" | tee -a "$LOG"
fi
# 4. every training stage for 2 steps under FSDP2 and DeepSpeed ZeRO-3 at world size 1, in bf16
declare -A ARGS=(
  [sft]="sft --train examples/demonstrations.jsonl --batch-size 8 --micro-batch-size 4"
  [rm]="rm train --train examples/judge-pairs.jsonl --batch-size 8 --micro-batch-size 4 --ood-fit 0"
  [dpo]="dpo --train examples/judge-pairs.jsonl --batch-size 8 --micro-batch-size 4"
  [pg]="pg --train examples/prompts.jsonl --reward rule:configs/rules/concise-python.yaml --estimator rloo --samples-per-prompt 4 --batch-size 4 --micro-batch-size 8 --lora-r 16 --max-new-tokens 32 --eval-prompts 0"
  [ppo]="ppo --train examples/prompts.jsonl --reward rule:configs/rules/concise-python.yaml --batch-size 4 --micro-batch-size 4 --lora-r 16 --max-new-tokens 32 --eval-prompts 0")
for strategy in fsdp2 zero3; do
  if [ $strategy = zero3 ] && ! $PY -c "import deepspeed" 2>/dev/null; then
    echo "== 4. zero3: skipped, DeepSpeed is not installed on this machine" | tee -a "$LOG"; continue
  fi
  for stage in sft rm dpo pg ppo; do
    step "4. $stage under $strategy" 45 $PY -m accelerate.commands.launch --config_file configs/accelerate/$strategy.yaml \
      --num_processes 1 --main_process_port 0 -m rlhfkit ${ARGS[$stage]} --model "$MODEL" --max-steps 2 \
      --mixed-precision bf16 --eval-size 0 --output-dir "$OUT/runs" --name "$strategy-$stage" --no-progress
  done
done
echo "gpu_check: $([ $status = 0 ] && echo ok || echo FAILED)" | tee -a "$LOG"
exit $status
