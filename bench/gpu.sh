#!/usr/bin/env bash
# The GPU measurements of the fast path, in one go on a fresh GPU machine (written for one H100/H200 with the
# device tool: 15 minutes a session, start-up included). Every step has its own time limit, writes its output as it
# goes, and a failed step does not stop the next; everything lands in one folder, which regenerates the GPU rows of
# docs/bench.md (`dreambooth bench --table --results OUT/results`).
#
#   bash bench/gpu.sh [OUT]                 # OUT defaults to $OUT (the device tool's folder), else runs/gpu
#   bash bench/gpu.sh [OUT] --flow flux     # instead of steps 2-5b: Flux.1-dev LoRA at 1024 px ("The flow stage")
#   bash bench/gpu.sh [OUT] --flow sd3      # instead of steps 2-5b: SD3.5-large LoRA at 1024 px
#
# What the machine needs beside the repository (carried in, the machine has no network):
#   .whl/      wheels the machine lacks, filled by `python bench/carry_wheels.py [--bitsandbytes]` (Python 3.12,
#              manylinux; prints the list and the size): diffusers + importlib_metadata, pydantic + pydantic_core +
#              annotated_types + typing_inspection + typing_extensions, PyYAML, pytest, their own small dependencies,
#              bitsandbytes (for the lean-memory run; 43 MB, optional), and setuptools + wheel + packaging: with no
#              network, pip cannot fetch a build environment, so this package installs with --no-build-isolation
#              from what is there (bench/install_offline.sh, which tests/test_offline_install.py runs offline)
#   runs/peer/examples/dreambooth/   diffusers' train_dreambooth.py and train_dreambooth_lora.py, and for --flow
#              train_dreambooth_lora_flux.py and train_dreambooth_lora_sd3.py (bench/README.md)
#   runs/peer/tv_shim/   only where the machine has no torchvision: a copy of ../shared/peer-tools/tv_shim (bench
#              completes it with the two names the Flux and SD3 scripts call)
# Budget, about 9 minutes: install 0.5, model 0.5, 4 bench pairs x ~1.3, graph on/off pairs 2, class images 0.5,
# profile 0.5, GPU tests 1.
# Budget of --flow, one family per device session (one command of at most 10 minutes; 15 minutes of device time with
# the start), as step limits: install 2 (expected ~0.5), facts 0.3, the model built on the GPU 2 (expected under 1:
# seconds to initialise, then writing 34 GB for Flux, 27 GB for SD3.5), the LoRA pair 5.3 (expected ~4.5: FLOPs and
# class images ~0.7, this tool ~1.3, diffusers' script ~2.5, whose start loads the transformer and T5 in float32 and
# whose end reloads the whole pipeline), table 0.3: 10 minutes at most, ~7 expected. Estimates, not measurements: no
# GPU has run it yet. Both families in one session do not fit; with a second session, `--flow sd3` after `--flow flux`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
FLOW=""
while [ $# -gt 0 ]; do
    case $1 in
        --flow) FLOW=${2:?"--flow needs flux or sd3"}; shift 2 ;;
        *) OUT=$1; shift ;;
    esac
done
case $FLOW in ""|flux|sd3) ;; *) echo "--flow $FLOW: give flux or sd3" >&2; exit 2 ;; esac
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

tv_shim_flag() {  # the carried torchvision stand-in, where the machine has no torchvision
    python -c "import torchvision" 2>/dev/null && return
    [ -d runs/peer/tv_shim ] && echo "--tv-shim=runs/peer/tv_shim"
}

peer_flag() {  # the peer script for a method, when it was carried in
    local script=$PEER/train_dreambooth.py
    [ "$1" = lora ] && script=$PEER/train_dreambooth_lora.py
    [ -f "$script" ] && echo "--peer=$script $(tv_shim_flag)"
}

# 1. Install what the machine lacks, then this package without touching its torch.
step install 120 bash bench/install_offline.sh
FACTS_S=$([ -n "$FLOW" ] && echo 20 || echo 30)
step facts "$FACTS_S" bash -c 'nvidia-smi; python -c "import torch, diffusers, transformers, accelerate, peft;
print(torch.__version__, torch.version.cuda, diffusers.__version__, transformers.__version__, accelerate.__version__,
peft.__version__, torch.cuda.get_device_name())"'

# The flow stage (--flow flux|sd3, in place of steps 2-5b): Flux.1-dev or SD3.5-large LoRA at 1024 px beside diffusers'
# script, on a random-weight model of the full architecture. It is built by models.tiny_flow's own builder (configs,
# tokenizers, files, bfloat16 as published) with the weights made on the GPU: `dreambooth tiny-model DIR --size flux`
# makes them on the CPU, where random initialisation alone took 58 s per billion parameters of Flux's blocks and 146 s
# per billion of T5's (2026-12-07, one block of each, the shared 2-core CPU machine): ~20 minutes for Flux's 17 B, and
# ~60 GB of RAM. Both programs: bf16, gradient checkpointing, LoRA rank 4, T5 at the family's length, latents cached
# (--cache_latents; this tool caches latents and prompt embeddings anyway and moves the frozen encoders and VAE off the
# GPU, training.offload_frozen); 1 + 1 images a step (prior preservation, 2 class images made beforehand).
BUILD_ON_GPU='import sys, time, torch
from dreambooth.models.tiny_families import build_model
t0 = time.perf_counter()
torch.set_default_dtype(torch.bfloat16)  # as published; the builder casts to it anyway
with torch.device("cuda"):
    build_model(sys.argv[1], size=sys.argv[2], seed=0)
print(f"{sys.argv[2]}: built on {torch.cuda.get_device_name()} in {time.perf_counter() - t0:.0f} s, peak GPU memory "
      f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB: {sys.argv[1]}")'
PEAK='import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob(f"*-{sys.argv[2]}-lora-1024-*.json")):
    r = json.loads(f.read_text())
    line = "%s: this tool %.3f s/step, peak GPU memory %.1f GiB" % (f.stem, r["s_per_step_median"],
                                                                   r["peak_mem_mb"] / 1024)
    p = r.get("peer")
    if p:
        line += "; diffusers %.3f s/step, %.1f GiB" % (p["s_per_step_median"], p["peak_mem_mb"] / 1024)
    print(line)'

flow_bench() {  # flow_bench flux|sd3: build, bench LoRA beside diffusers' script, print step times and peak memory
    local size=$1 dir=runs/gpu-model/$1 script=$PEER/train_dreambooth_lora_$1.py
    [ -f "$dir/model_index.json" ] || step model-$size 120 python -c "$BUILD_ON_GPU" "$dir" "$size"
    df -h . | tail -1 | tee -a "$LOG"
    step bench-$size-lora 320 dreambooth bench --model "$dir" --method lora --resolution 1024 --steps 8 --warmup 3 \
        --num-class-images 2 --both-arg=--gradient_checkpointing --tag ckpt --results "$OUT/results" \
        --out runs/gpu-bench $( [ -f "$script" ] && echo "--peer=$script" ) $(tv_shim_flag)
    python -c "$PEAK" "$OUT/results" "$size" | tee -a "$LOG"
    rm -rf "$dir"  # 34 GB (Flux) or 27 GB (SD3.5) of the 64 GB disk: one full model at a time
}

if [ -n "$FLOW" ]; then
    flow_bench "$FLOW"
    printf '%s\n%s\n' '<!-- bench-table:start -->' '<!-- bench-table:end -->' > "$OUT/bench-table.md"
    step table 20 dreambooth bench --table --results "$OUT/results" --doc "$OUT/bench-table.md"
    echo "done in $(( $(date +%s) - started ))s; see $LOG" | tee -a "$LOG"
    exit 0
fi

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
    # FSDP2 through accelerate on every GPU here (one, on the lent machine: a world of one still shards, gathers and
    # saves through the same code), against one process accumulating the same batch (issue 27)
    step fsdp-tests 240 python -m pytest -q -m gpu tests/test_fsdp.py -p no:cacheprovider
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
