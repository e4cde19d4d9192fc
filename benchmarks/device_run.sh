#!/usr/bin/env bash
# The benchmarks that want a machine with an accelerator, as one prepared run (bounded):
# real-size SD 1.5 generation and DPO throughput (benchmarks/sd15.py), the online-RL battery
# (benchmarks/rl_loop.py) with oracle-reward ablations, and the default DPO recipe on every toy
# preference (benchmarks/dpo_recipe.py), all on the GPU.
#
#   OUT=/tmp/device bash benchmarks/device_run.sh                  # all parts side by side
#   OUT=/tmp/device PARTS="sd15 dpo" SERIAL=1 bash benchmarks/device_run.sh
#
# SERIAL=1 runs the parts one after another, so that sd15's throughput is measured on an idle
# GPU (side by side, a dozen toy runs share it). Wheels in .whl/ (pinned versions the machine
# lacks) are installed to /tmp/site first. Results: $OUT/{gpu.txt, sd15.json, rl.json, rl.png,
# rl_table.txt, dpo.jsonl, dpo_table.txt, logs.txt}.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/prefloop-device}
LIMIT=${LIMIT:-510}
PARTS=${PARTS:-"sd15 rl dpo"}
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
PREFS="larger left centered brighter darker lighter prompted_position prompted_size prompted_colour"

part_sd15() {
  # shellcheck disable=SC2086  # SD15_ARGS: extra options, word-split on purpose
  timeout "${SD15_LIMIT:-$LIMIT}" python3 benchmarks/sd15.py ${SD15_ARGS:-} --out "$OUT/sd15.json" \
    > "$OUT/sd15.log" 2>&1 &
}

rl() {  # tag, then rl_loop arguments
  local tag=$1; shift
  OMP_NUM_THREADS=1 timeout "$LIMIT" python3 benchmarks/rl_loop.py --rl-until "$UNTIL" "$@" \
    --out "$OUT/rl_$tag.json" > "$OUT/rl_$tag.log" 2>&1 &
}

part_rl() {
  # One process per preference (the GPU and 16 cores take them side by side).
  for pref in $PREFS; do
    rl "$pref" --preference "$pref" --rl-minutes "${RL_MINUTES:-6}"
  done
  # Ablations where RL has not moved a preference: the preference itself as the reward (what
  # RL reaches when the reward sees what the annotator sees), as many steps as the bound
  # allows, with the LoRA recipe and with the whole UNet trained.
  local cap=(--reward oracle --rl-steps 100000 --rl-minutes "${ABLATE_MINUTES:-7}")
  rl oracle_pos_lora "${cap[@]}" --preference prompted_position
  rl oracle_pos_full "${cap[@]}" --preference prompted_position --rl lora_rank=0 --lr 1e-4
  rl oracle_left_lora "${cap[@]}" --preference left
}

part_dpo() {
  # The job's default recipe; each process caches its own pool of training images.
  for pref in $PREFS; do
    OMP_NUM_THREADS=1 DPO_RECIPE_CACHE="/tmp/dpo-cache-$pref" timeout "${DPO_LIMIT:-$LIMIT}" \
      python3 benchmarks/dpo_recipe.py --preference "$pref" --out "$OUT/dpo.jsonl" \
      > "$OUT/dpo_$pref.log" 2>&1 &
  done
}

for part in $PARTS; do
  "part_$part"
  if [ "${SERIAL:-0}" = 1 ]; then wait; fi
done
wait

if ls "$OUT"/rl_*.json > /dev/null 2>&1; then
  python3 benchmarks/rl_loop.py --merge "$OUT"/rl_*.json --out "$OUT/rl.json" \
    --plot "$OUT/rl.png" > "$OUT/rl_table.txt" 2>&1
  rm -f "$OUT"/rl_*.json
fi
if [ -f "$OUT/dpo.jsonl" ]; then
  python3 benchmarks/dpo_recipe.py --table --out "$OUT/dpo.jsonl" > "$OUT/dpo_table.txt" 2>&1
fi
for log in "$OUT"/*.log; do
  echo "=== $log"
  grep -v -i -E "warn|torchvision|float32|^\s*$" "$log" | tail -40
done > "$OUT/logs.txt"
rm -f "$OUT"/*.log
cat "$OUT"/*_table.txt "$OUT/sd15.json" 2>/dev/null; tail -100 "$OUT/logs.txt"
