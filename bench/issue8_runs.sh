#!/usr/bin/env bash
# The GPU runs issue 8 still needs, in three parts of under 10 minutes each (one device call
# per part; the device tool's per-call limit). Run from the repository root on the GPU machine
# after installing the carried wheels (see bench/NOTES.md), e.g.:
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD; bash bench/issue8_runs.sh 1
#
# Results land in bench/results/ (and $OUT when set); copy them back and record them in NOTES.
set -euo pipefail
part="${1:?part 1, 2 or 3}"
case "$part" in
  1)  # speed per checkpointed layer at the standard case, with the baseline in the same call
      timeout 560 python bench/speed.py --cases 2048x4 --steps 12 \
        --variants "|train.checkpoint_layers=24|train.checkpoint_layers=16|train.checkpoint_layers=8|train.gradient_checkpointing=false"
      ;;
  2)  # long context with offload + MLP chunks against the budget's estimates (engine only)
      timeout 560 python bench/speed.py --cases 131072x1,262144x1,350000x1 --steps 2 --no-baseline \
        --variants "train.offload_activations=true;train.mlp_chunk_tokens=4096"
      ;;
  3)  # same math against an fp32 reference (which side's gradients are nearer the truth)
      timeout 560 python bench/same_math.py --seq 2048 --mbs 2 --variant "train.kernels=liger"
      ;;
  *) echo "part 1, 2 or 3" >&2; exit 2 ;;
esac
