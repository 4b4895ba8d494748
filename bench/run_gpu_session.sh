#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md (2026-12-07 session) in three calls of the workplace's device tool on one
# lent H100 or H200, back to back while the machine stays warm (files under /tmp survive between calls):
#
#   bash bench/run_gpu_session.sh stage        # carry .gpuA: nvidia-cutlass-dsl-libs-cu13 unpacked, as tar.xz (52 MB)
#   bash bench/run_gpu_session.sh train        # carry .gpuB .gpuC: every other wheel; default kernels + training step
#   bash bench/run_gpu_session.sh precompute   # nothing carried: precompute at real scale, the vision cache's build
#
# Each call must carry the commit it was copied from: VLNFLOW_COMMIT=<40 hex> VLNFLOW_DIRTY=0 (python -m
# vlnflow.provenance prints them). Wheels: .gpuA holds the cu13 libs tree (`tar cf - . | xz -T2 --x86 ...` of the
# unzipped wheel: 92 MB as a wheel, over one call's 64 MiB), .gpuB flash-attn-4 4.0.0b36 and its small wheels plus
# transformers 5.24.0, .gpuC deepspeed 0.19.8, snakemake 9.27.1 and their dependencies, jsonschema, liger-kernel
# 0.8.5 (pip download --python-version 3.12 --platform manylinux... --no-deps; deepspeed and connection_pool via
# pip wheel). The cu13 tree is copied over the pip installs, which would otherwise replace nvidia_cutlass_dsl/.
# Every bench keeps within its own timeout so each call ends inside the tool's 600 s.
set -uo pipefail
phase=${1:?phase: stage, train or precompute}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
SITE=/tmp/site OUT=${OUT:-/tmp/out}
export PYTHONPATH=$PWD/src:$PWD/bench:$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages
mkdir -p "$SITE" "$OUT"
log() { echo "== $(date -u +%H:%M:%S) $*"; }
run() {  # run NAME TIMEOUT CMD...: one bench, output kept in $OUT/NAME.log, never stopping the others
  local name=$1 limit=$2; shift 2
  log "$name: $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "rc=$?" >>"$OUT/$name.log"
  grep -v -i "warn" "$OUT/$name.log" | tail -n 30
}

case $phase in
stage)
  mkdir -p /tmp/cu13 && xz -dc .gpuA/cu13.tar.xz | tar x -C /tmp/cu13 || exit 1
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  ;;
train)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpuB/*.whl .gpuC/*.whl || exit 1
  cp -a /tmp/cu13/. "$SITE"/ || exit 1
  python3 -c "import torch, transformers, deepspeed, liger_kernel; from flash_attn.cute import flash_attn_varlen_func; print(torch.__version__, transformers.__version__, deepspeed.__version__, torch.cuda.get_device_name())" || exit 1
  mkdir -p "$OUT/kernels_crop" "$OUT/kernels_pad"
  # the LLM attention and the tiny composed model were checked at f269342 (docs/results/check_default_kernels_h200_*.json)
  # and have not changed since; the fused LLM layer and the compiled vision tower are new defaults
  run kernels_crop 120 python3 bench/check_default_kernels.py --preprocess crop --only llm_layer,vision_tower,vggt_encoder \
    --out "$OUT/kernels_crop"
  run kernels_pad 70 python3 bench/check_default_kernels.py --preprocess pad --only vision_tower,vggt_encoder --out "$OUT/kernels_pad"
  run train 370 python3 bench/bench_train.py --mode fwdbwd --steps 6 --warmup 2 --budget-s 330 --out "$OUT" \
    --cases old,prev,new,vision_eager,vision_compiled,llm_only,new_head,new_vision_cache,stock_hf,check_new_vs_prev,check_vision_cache \
    --cases-other new,vision_compiled,llm_only
  ;;
precompute)
  run decode 40 python3 bench/bench_decode.py --frames 16 --repeats 2 --textures 4 --workers 1,2,4 --out "$OUT/decode.json"
  run precompute 400 python3 bench/bench_precompute.py --budget-s 340 --out "$OUT/precompute.json"
  run vision_cache 120 python3 bench/bench_vision_cache.py --episodes 8 --shards 2 --out "$OUT/bench_vision_cache.json"
  ;;
esac
ls -la "$OUT"
