#!/usr/bin/env bash
# The benchmarks that want a machine with an accelerator, as one prepared run (bounded, in
# parallel where they do not compete): real-size SD 1.5 generation and DPO throughput
# (benchmarks/sd15.py, on the GPU), the online-RL battery (benchmarks/rl_loop.py, GPU) with
# oracle-reward ablations, and the default DPO recipe on every toy preference
# (benchmarks/dpo_recipe.py, one CPU process each).
#
#   OUT=/tmp/device bash benchmarks/device_run.sh
#
# Wheels in .whl/ (pinned versions the machine lacks) are installed to /tmp/site first. Results:
# $OUT/{gpu.txt, sd15.json, rl.json, rl.png, rl_table.txt, dpo.jsonl, dpo_table.txt, logs.txt}.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/prefloop-device}
LIMIT=${LIMIT:-510}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PREFLOOP_DATA_DIR=/tmp/prefloop-data
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
nproc >> "$OUT/gpu.txt"

# RL phases end by this instant whatever their cap, leaving time to judge the child.
UNTIL=$(( $(date +%s) + LIMIT - ${JUDGE_SECONDS:-100} ))
timeout "$LIMIT" python3 benchmarks/sd15.py --out "$OUT/sd15.json" > "$OUT/sd15.log" 2>&1 &
# Ablations where RL has not moved a preference: the preference itself as the reward (what RL
# reaches when the reward sees what the annotator sees), as many steps as the cap allows, with
# the LoRA recipe and with the whole UNet trained.
ABLATE_MINUTES=${ABLATE_MINUTES:-7}
ablate() {  # tag, then rl_loop arguments
  local tag=$1; shift
  OMP_NUM_THREADS=1 timeout "$LIMIT" python3 benchmarks/rl_loop.py --reward oracle \
    --rl-steps 100000 --rl-minutes "$ABLATE_MINUTES" --rl-until "$UNTIL" "$@" --out "$OUT/rl_oracle_$tag.json" \
    > "$OUT/rl_oracle_$tag.log" 2>&1 &
}
ablate pos_lora --preference prompted_position
ablate pos_full --preference prompted_position --rl lora_rank=0 --lr 1e-4
ablate left_lora --preference left
PREFS="larger left centered brighter darker lighter prompted_position prompted_size prompted_colour"
# One process per preference and method (the GPU and 16 cores take them side by side); each
# DPO point caches its own pool of training images.
for pref in $PREFS; do
  OMP_NUM_THREADS=1 timeout "$LIMIT" python3 benchmarks/rl_loop.py --preference "$pref" \
    --rl-minutes "${RL_MINUTES:-6}" --rl-until "$UNTIL" --out "$OUT/rl_$pref.json" > "$OUT/rl_$pref.log" 2>&1 &
  OMP_NUM_THREADS=1 DPO_RECIPE_CACHE="/tmp/dpo-cache-$pref" timeout "$LIMIT" \
    python3 benchmarks/dpo_recipe.py --preference "$pref" --out "$OUT/dpo.jsonl" \
    > "$OUT/dpo_$pref.log" 2>&1 &
done
wait
python3 benchmarks/rl_loop.py --merge "$OUT"/rl_*.json --out "$OUT/rl.json" --plot "$OUT/rl.png" \
  > "$OUT/rl_table.txt" 2>&1
rm -f "$OUT"/rl_*.json
python3 benchmarks/dpo_recipe.py --table --out "$OUT/dpo.jsonl" > "$OUT/dpo_table.txt" 2>&1
for log in "$OUT"/*.log; do
  echo "=== $log"
  grep -v -i -E "warn|torchvision|^\s*$" "$log" | tail -40
done > "$OUT/logs.txt"
rm -f "$OUT"/*.log
cat "$OUT/rl_table.txt" "$OUT/dpo_table.txt"; tail -150 "$OUT/logs.txt"
