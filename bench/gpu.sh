#!/usr/bin/env bash
# The GPU measurements of the fast path, in one go on a fresh GPU machine (written for one H100/H200 with the
# device tool: 15 minutes a session, start-up included). Every step has its own time limit, writes its output as it
# goes, and a failed step does not stop the next; everything lands in one folder, which regenerates the GPU rows of
# docs/bench.md (`dreambooth bench --table --results OUT/results`).
#
#   bash bench/gpu.sh [OUT]          # OUT defaults to $OUT (the device tool's folder), else runs/gpu
#
# What the machine needs beside the repository (carried in, the machine has no network):
#   .whl/      wheels the machine lacks, filled by `python bench/carry_wheels.py [--bitsandbytes]` (Python 3.12,
#              manylinux; prints the list and the size): diffusers + importlib_metadata, pydantic + pydantic_core +
#              annotated_types + typing_inspection + typing_extensions, PyYAML, pytest, their own small dependencies,
#              bitsandbytes (for the lean-memory run; 43 MB, optional), and setuptools + wheel + packaging: with no
#              network, pip cannot fetch a build environment, so this package installs with --no-build-isolation
#              from what is there (bench/install_offline.sh, which tests/test_offline_install.py runs offline)
#   runs/peer/examples/dreambooth/   diffusers' train_dreambooth.py and train_dreambooth_lora.py (bench/README.md)
# Budget, about 9 minutes: install 0.5, model 0.5, 4 bench pairs x ~1.3, graph on/off pairs 2, class images 0.5,
# profile 0.5, GPU tests 1.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-runs/gpu}}
mkdir -p "$OUT/results"
LOG="$OUT/steps.log"
PEER=runs/peer/examples/dreambooth
MODEL=runs/gpu-model/sd15
started=$(date +%s)

step() {  # step NAME SECONDS COMMAND...: runs it with a limit, its output in OUT/NAME.log, one line in steps.log
    local name=$1 limit=$2 t0 rc
    shift 2
    t0=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc $(( $(date +%s) - t0 ))s (at $(( $(date +%s) - started ))s)" | tee -a "$LOG"
}

peer_flag() {  # the peer script for a method, when it was carried in
    local script=$PEER/train_dreambooth.py
    [ "$1" = lora ] && script=$PEER/train_dreambooth_lora.py
    [ -f "$script" ] && echo "--peer=$script"
}

# 1. Install what the machine lacks, then this package without touching its torch.
step install 120 bash bench/install_offline.sh
step facts 30 bash -c 'nvidia-smi; python -c "import torch, diffusers, transformers, accelerate, peft;
print(torch.__version__, torch.version.cuda, diffusers.__version__, transformers.__version__, accelerate.__version__,
peft.__version__, torch.cuda.get_device_name())"'

# 2. The SD 1.5-shaped model (random weights, exact shapes), built once.
[ -f "$MODEL/model_index.json" ] || step model 120 dreambooth tiny-model "$MODEL" --size sd15

# 3. This tool beside diffusers' scripts: full and LoRA (CUDA graph auto, the default), then the same without the
#    graph (the baseline the issue's table was measured with), then the lean-memory full run.
BENCH=(dreambooth bench --model "$MODEL" --steps 40 --warmup 8 --results "$OUT/results" --out runs/gpu-bench)
step bench-full 150 "${BENCH[@]}" --method full $(peer_flag full)
step bench-lora 150 "${BENCH[@]}" --method lora $(peer_flag lora)
step bench-full-eager 90 "${BENCH[@]}" --method full --ours-arg=--cuda_graph=off --tag graph-off
step bench-lora-eager 90 "${BENCH[@]}" --method lora --ours-arg=--cuda_graph=off --tag graph-off
step bench-full-channels-last 90 "${BENCH[@]}" --method full --ours-arg=--channels_last --tag channels-last
# LoRA with the frozen text encoder and VAE kept on the GPU (offload_frozen off): the memory offloading saves
step bench-lora-resident 90 "${BENCH[@]}" --method lora --ours-arg=--offload_frozen=off --tag resident
python -c "import bitsandbytes" 2>/dev/null && step bench-full-lean 150 "${BENCH[@]}" --method full --lean-memory

# 4. Class images: 200 at 512 px, 30 steps, timed inside the run (fresh class folder).
step class-images 120 "${BENCH[@]}" --method full --steps 12 --warmup 2 --num-class-images 200 \
    --fresh-class-images --tag class-200

# 5. Where a graph step's time goes now, and the GPU tests (the capture's equality, resume, fall-back paths).
step profile 120 python bench/profile_step.py --model "$MODEL" --method full --work runs/gpu-bench \
    --out "$OUT/profile-sd15-full"
if python -c "import pytest" 2>/dev/null; then
    step gpu-tests 240 python -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
else
    echo "gpu-tests skipped: pytest is not installed (carry its wheel in .whl/)" | tee -a "$LOG"
fi

# 5b. SDXL LoRA at 1024 px against diffusers' SDXL LoRA script, when asked (SDXL=1): ~4 more minutes, past the
#     budget above with everything else, so a session runs it alone or in place of steps 3-4.
if [ "${SDXL:-0}" = 1 ]; then
    XL=runs/gpu-model/sdxl
    [ -f "$XL/model_index.json" ] || step model-sdxl 240 dreambooth tiny-model "$XL" --size sdxl
    XL_PEER=$PEER/train_dreambooth_lora_sdxl.py
    step bench-sdxl-lora 300 dreambooth bench --model "$XL" --method lora --resolution 1024 --steps 30 --warmup 8 \
        --results "$OUT/results" --out runs/gpu-bench $( [ -f "$XL_PEER" ] && echo "--peer=$XL_PEER" )
fi

# 6. The table from this run's results, beside them (docs/bench.md is updated from it on the way back).
printf '%s\n%s\n' '<!-- bench-table:start -->' '<!-- bench-table:end -->' > "$OUT/bench-table.md"
step table 60 dreambooth bench --table --results "$OUT/results" --doc "$OUT/bench-table.md"
echo "done in $(( $(date +%s) - started ))s; see $LOG" | tee -a "$LOG"
