#!/usr/bin/env bash
# Issue 21's GPU numbers in ONE call of the device tool on one lent H100 or H200 (16 cores), ~8 minutes:
#   1. bench/bench_decode.py on this host's CPU (~20 s): frames/s per loader worker, 640x480 PNG and JPEG;
#   2. bench/bench_precompute.py (budget 420 s): crop with a real-length shard (2,000 samples) and pad sized to
#      the time left, each through `snakemake precompute_all` with a cold and a warm compile cache, the encoder
#      alone on the same batches, and the one spot-check job's GPU time; JSON rewritten after every case.
#
#   bash bench/run_precompute_gpu.sh            # from the repository root on the GPU machine
#
# Needs python3 with torch + CUDA (the image's), and snakemake 9.27.1 + jsonschema importable: wheels carried in
# $WHEELS (default .gpu1: the same set bench/run_h200.sh phase a installs; flash-attn-4 is optional) are
# installed into $SITE first. Results land in $OUT (decode_<card>.json, precompute_<card>.json, *.log).
# Trying the script on a CPU machine: EXTRA_ARGS=--quick DECODE_ARGS=--quick bash bench/run_precompute_gpu.sh
set -uo pipefail
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out} SITE=${SITE:-/tmp/site} WHEELS=${WHEELS:-.gpu1}
export PYTHONPATH=$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT" "$SITE"
log() { echo "== $(date -u +%H:%M:%S) $*"; }

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  log "installing $(ls "$WHEELS"/*.whl | wc -l) carried wheels into $SITE"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, snakemake, jsonschema, h5py, safetensors; print('torch', torch.__version__, 'snakemake', snakemake.__version__)" || exit 1
card=$(python3 -c "import sys; sys.path.insert(0, 'bench'); import torch; from bench_precompute import card_slug
print(card_slug(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'))")

log "decode rate per worker (CPU)"
timeout 60 python3 bench/bench_decode.py --frames 16 --repeats 2 --textures 4 --workers 1,2,4 ${DECODE_ARGS:-} \
  --out "$OUT/decode_$card.json" >"$OUT/decode.log" 2>&1
echo "rc=$?" >>"$OUT/decode.log"; tail -n 8 "$OUT/decode.log"

log "precompute at real scale"
timeout 510 python3 bench/bench_precompute.py --budget-s 420 ${EXTRA_ARGS:-} --out "$OUT/precompute_$card.json" >"$OUT/precompute.log" 2>&1
echo "rc=$?" >>"$OUT/precompute.log"; tail -n 40 "$OUT/precompute.log"
ls -la "$OUT"
