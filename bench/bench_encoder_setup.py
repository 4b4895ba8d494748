"""The precompute job's encoder set-up, piece by piece, in a fresh process per `spatial.attention` setting.

A job's set-up split (docs/benchmarks.md, issue 21) shows `weights` = SpatialEncoder.from_config; this bench
splits it as the job's stats do (device_init, build, read, kernels: the attention kernel chosen and
flash-attn-4 imported where `auto` picks it) and times `import flash_attn.cute` alone, each in its own
interpreter (imports are paid once per process), on VGGT-1B-shape random weights read from a float32
safetensors file as a real checkpoint would be.

    PYTHONPATH=src python3 bench/bench_encoder_setup.py --out $OUT/encoder_setup.json
    PYTHONPATH=src python3 bench/bench_encoder_setup.py --preset tiny --out /tmp/es.json     # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch
from vlnflow.spatial import SpatialEncoder
imports = time.perf_counter() - t0
cfg = json.loads(sys.argv[1])
t0 = time.perf_counter()
enc = SpatialEncoder.from_config(cfg)
print(json.dumps({"imports_s": imports, "from_config_s": time.perf_counter() - t0, "split_s": enc.load_split_s,
                  "kernel": enc.attention_kernel}))
"""
FA4_IMPORT = "import time; t0 = time.perf_counter(); import flash_attn.cute; print(time.perf_counter() - t0)"


def child(code: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=os.environ)
    if out.returncode:
        return json.dumps({"error": out.stderr.strip().splitlines()[-1:] or ["failed"]})
    return out.stdout.strip().splitlines()[-1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="vggt-1b")
    ap.add_argument("--attention", default="auto,sdpa", help="spatial.attention settings, one fresh process each")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_precompute import write_weights  # noqa: PLC0415 - same folder

    from vlnflow.provenance import provenance

    work = Path(tempfile.mkdtemp(prefix="bench_encoder_setup_"))
    os.environ.setdefault("VLNFLOW_CACHE_DIR", str(work / "vlnflow_cache"))
    weights, written_s = write_weights(argparse.Namespace(preset=args.preset), work)
    report = {"bench": "encoder_setup", "provenance": provenance(args.repeats, argv=sys.argv, device="cuda" if args.preset != "tiny" else "cpu"), "weights_bytes": weights.stat().st_size,
              "weights_file_s": written_s, "runs": {}}
    for attention in args.attention.split(","):
        cfg = {"preset": args.preset, "weights": str(weights), "attention": attention, "device": "auto"}
        report["runs"][attention] = [json.loads(child(CHILD, json.dumps(cfg))) for _ in range(args.repeats)]
        print(attention, report["runs"][attention], flush=True)
    report["fa4_import_s"] = [json.loads(child(FA4_IMPORT)) for _ in range(args.repeats)]
    print("import flash_attn.cute:", report["fa4_import_s"], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    started = time.perf_counter()
    rc = main()
    print(f"wall {time.perf_counter() - started:.0f} s")
    sys.exit(rc)
