#!/usr/bin/env bash
# The GPU runs of issue 8, each one device call of under 10 minutes (the device tool's per-call
# limit); all were run in sessions 3 and 4 (bench/NOTES.md). Part 4 is checkpointing chosen by the
# budget and packing. Run from the repository root on the GPU machine after installing
# the carried wheels (see bench/NOTES.md), e.g.:
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD; bash bench/issue8_runs.sh 1
#
# Results land in bench/results/ (and $OUT when set); copy them back and record them in NOTES.
set -euo pipefail
part="${1:?part 1, 2, 3 or 4}"
case "$part" in
  1)  # the split-weight fast_lora at the standard case, beside peft's path and the baseline; then its profile
      timeout 330 python3 bench/speed.py --cases 2048x4 --steps 10 --variants "|train.fast_lora=false"
      timeout 150 python3 bench/profile_step.py --seq 2048 --mbs 4
      ;;
  2)  # same math against an fp32 reference on the GPU (which side's gradients are nearer the truth)
      timeout 560 python3 bench/same_math.py --seq 2048 --mbs 2
      ;;
  3)  # 350k tokens again with the split-weight fast_lora, inside an 80 GB card's memory (one step: ~6.5 min,
      # so start it in the background with setsid and collect it with a second call, as NOTES describes)
      timeout 1100 python3 bench/speed.py --cases 350000x1 --steps 1 --warmup 0 --no-baseline --vram-cap-gib 78 \
        --variants "train.offload_activations=true;train.mlp_chunk_tokens=4096"
      ;;
  4)  # gradient_checkpointing auto on the whole card (with the baseline) and under 24/40 GiB caps; packing
      timeout 200 python3 bench/speed.py --cases 2048x4 --steps 10 --variants "train.gradient_checkpointing=auto"
      for cap in 24 40; do
        timeout 120 python3 bench/speed.py --cases 2048x4 --steps 8 --no-baseline --vram-cap-gib $cap \
          --variants "train.gradient_checkpointing=auto"
      done
      timeout 150 python3 bench/speed.py --cases 2048x4 --steps 8 --no-baseline --varlen --variants "|data.packing=true"
      ;;
  *) echo "part 1, 2, 3 or 4" >&2; exit 2 ;;
esac
