#!/bin/bash
# Issue 15's CPU check: the bench on `small` against diffusers' script, before (7067fb9) and after (39cea3a) the
# graph-ready step, one after the other on the same machine, same model, same data.
set -u
PEER=/tmp/peer/examples/dreambooth/train_dreambooth.py
SHIM=/work/shared/peer-tools/tv_shim
ARGS="--model small --method full --steps 30 --warmup 5 --repeats 3 --peer $PEER --tv-shim $SHIM --out /tmp/cpu-bench/work"
for round in 1; do
  (cd /tmp/before && PYTHONPATH=/tmp/before/src /work/main/.venv/bin/python bench/bench.py $ARGS --results /tmp/cpu-bench/before) > /tmp/cpu-bench/before.log 2>&1
  (cd /work/main && /work/main/.venv/bin/python bench/bench.py $ARGS --results /tmp/cpu-bench/after) > /tmp/cpu-bench/after.log 2>&1
done
echo done
