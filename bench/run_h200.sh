#!/usr/bin/env bash
# How the one-H200 figures of docs/benchmarks.md (2026-12-02) were taken: three calls of the workplace's
# device tool on one lent H200 (python3.12, torch 2.11+cu130, transformers 5.17 in its image), run back to
# back while the machine stays warm (files under /tmp survive between them).
#
#   bash bench/run_h200.sh a    # carry .gpu1: base wheels (deepspeed, transformers 5.24, snakemake, jsonschema)
#                               #   + part 1 of nvidia-cutlass-dsl-libs-cu13; precompute through Snakemake, fp8 error
#   bash bench/run_h200.sh b    # carry .gpu2: flash-attn-4 wheels + part 2; kernel checks, training step, encoder
#   bash bench/run_h200.sh c    # nothing carried: export/predict at the 7B shape, cache reads at node scale
#
# The device tool copies the working tree without .git: prefix each call with the commit and dirty flag of the
# checkout it was copied from (`python -m vlnflow.provenance` prints them), e.g.
#   VLNFLOW_COMMIT=<40 hex> VLNFLOW_DIRTY=0 bash bench/run_h200.sh b
# so every results JSON's provenance block names the commit (commit_source "env").
#
# .gpu1/.gpu2 are made on the CPU machine with `pip download --python-version 3.12 ...` (bench/README
# of the device tool); the 92 MB cu13 wheel travels unpacked as tar.xz in two parts (64 MiB per call).
set -uo pipefail
phase=${1:?phase a, b or c}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
SITE=/tmp/site STAGE=/tmp/stage OUT=${OUT:-/tmp/out}
export PYTHONPATH=$PWD/src:$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages
mkdir -p "$SITE" "$STAGE" "$OUT"
log() { echo "== $(date -u +%H:%M:%S) $*"; }
run() {  # run NAME TIMEOUT CMD...: one bench, its output kept in $OUT/NAME.log, never stopping the others
  local name=$1 limit=$2; shift 2
  log "$name: $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "rc=$?" >>"$OUT/$name.log"
  tail -n 40 "$OUT/$name.log"
}

case $phase in
a)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpu1/*.whl || exit 1
  cp .gpu1/cu13xz.aa "$STAGE/"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  python3 -c "import torch, transformers, deepspeed, snakemake; print(torch.__version__, transformers.__version__, deepspeed.__version__, snakemake.__version__, torch.cuda.get_device_name())"
  run precompute 390 python3 bench/bench_precompute.py --work /tmp/bp --keep --out "$OUT/bench_precompute.json"
  run fp8 170 python3 bench/bench_fp8.py --samples 8 --loss-steps 10 --out "$OUT"
  ;;
b)
  cat "$STAGE/cu13xz.aa" .gpu2/cu13xz.ab | xz -dc | tar x -C "$SITE" || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpu2/*.whl || exit 1
  python3 -c "from flash_attn.cute import flash_attn_func, flash_attn_varlen_func; print('flash-attn-4 imports')"
  run kernels 170 python3 bench/check_kernels.py --out "$OUT"
  run train 340 python3 bench/bench_train.py --mode fwdbwd --out "$OUT"
  run spatial 240 python3 bench/bench_spatial.py --batch-sizes 16 --combos compiled:prefix:default --indexed-batch-sizes 16 \
    --out-json "$OUT/spatial_bench.json"
  ;;
c)
  run export 300 python3 bench/bench_export.py --out "$OUT" --samples 5
  run cache_read 200 python3 bench/bench_cache_read.py --dir /tmp/cache_read --samples 512 --shards 8 --readers 1,8 --workers 4 \
    --dtypes bfloat16,float8_e4m3 --gpus-per-node 8 --samples-per-s-per-gpu 1.5 --out "$OUT"
  ;;
esac
ls -la "$OUT"
