#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in three calls of the workplace's device tool on one lent H100 or H200,
# back to back while the machine stays warm (files under /tmp survive between calls):
#
#   bash bench/run_gpu_session.sh stage        # carry .gpuA .gpuF: cu13 libs (tar.xz, 52 MB) + flash-attn-4's small
#                                              # wheels; VGGT's default kernels vs fp32, the encoder crop vs pad
#   bash bench/run_gpu_session.sh train        # carry .gpuB .gpuC: every other wheel; the LLM layer's and the vision
#                                              # tower's default kernels, the training step (fwd+bwd) crop and pad
#   bash bench/run_gpu_session.sh rerun        # carry .gpuB .gpuC after stage: the training step alone (seed samples)
#   bash bench/run_gpu_session.sh precompute   # nothing carried: the pad vision tower check, precompute at real
#                                              # scale (pad, then crop), the weight readers
#
# Each call must carry the commit it was copied from: VLNFLOW_COMMIT=<40 hex> VLNFLOW_DIRTY=0 (python -m
# vlnflow.provenance prints them). Wheels: .gpuA holds the cu13 libs tree (`tar cf - . | xz -T2 --x86 ...` of the
# unzipped wheel: 92 MB as a wheel, over one call's 64 MiB), .gpuF flash-attn-4 4.0.0b36 and its small wheels,
# .gpuB the same plus transformers 5.24.0, .gpuC deepspeed 0.19.8, snakemake 9.27.1 and their dependencies,
# jsonschema, liger-kernel 0.8.5 (pip download --python-version 3.12 --platform manylinux... --no-deps; deepspeed
# and connection_pool via pip wheel). The cu13 tree is copied over the pip installs, which would otherwise replace
# nvidia_cutlass_dsl/. Every bench keeps within its own timeout so each call ends inside the tool's 600 s.
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
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpuF/*.whl || exit 1
  cp -a /tmp/cu13/. "$SITE"/ || exit 1
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  mkdir -p "$OUT/kernels_vggt_crop" "$OUT/kernels_vggt_pad"
  run kernels_vggt_crop 110 python3 bench/check_default_kernels.py --preprocess crop --only vggt_encoder --out "$OUT/kernels_vggt_crop"
  run kernels_vggt_pad 80 python3 bench/check_default_kernels.py --preprocess pad --only vggt_encoder --out "$OUT/kernels_vggt_pad"
  run spatial 300 python3 bench/bench_spatial.py --preprocess crop,pad --batch-sizes 16 --combos compiled:prefix:default \
    --variant-batch-sizes 16 --indexed-batch-sizes 16 --stream-samples 2 --out-json "$OUT/spatial.json"
  ;;
train)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpuB/*.whl .gpuC/*.whl || exit 1
  cp -a /tmp/cu13/. "$SITE"/ || exit 1
  python3 -c "import torch, transformers, deepspeed, liger_kernel; from flash_attn.cute import flash_attn_varlen_func; print(torch.__version__, transformers.__version__, deepspeed.__version__, torch.cuda.get_device_name())" || exit 1
  mkdir -p "$OUT/kernels_crop"
  run kernels_crop 100 python3 bench/check_default_kernels.py --preprocess crop --only llm_layer,vision_tower --out "$OUT/kernels_crop"
  run train 420 python3 bench/bench_train.py --mode fwdbwd --steps 6 --warmup 2 --budget-s 380 --out "$OUT" \
    --cases check_new_vs_prev,old,prev,new,vision_compiled,llm_only,new_vision_cache \
    --cases-other new,vision_compiled,llm_only,new_vision_cache
  ;;
precompute)
  mkdir -p "$OUT/kernels_pad"
  run kernels_pad 50 python3 bench/check_default_kernels.py --preprocess pad --only vision_tower --out "$OUT/kernels_pad"
  run precompute 520 python3 bench/bench_precompute.py --cases pad,crop --samples 1200 --min-samples 600 --budget-s 470 \
    --out "$OUT/precompute.json"
  ;;
rerun)  # after `stage` on a fresh machine, carry .gpuB .gpuC: the training step with the seed's samples pinned
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpuB/*.whl .gpuC/*.whl || exit 1
  cp -a /tmp/cu13/. "$SITE"/ || exit 1
  run train 250 python3 bench/bench_train.py --mode fwdbwd --steps 6 --warmup 2 --budget-s 220 --out "$OUT" \
    --cases check_new_vs_prev,prev,new,llm_only,new_vision_cache --cases-other new,llm_only,new_vision_cache
  ;;
esac
ls -la "$OUT"
