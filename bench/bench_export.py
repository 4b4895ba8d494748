"""Export / load / predict benchmark at the real shapes: Qwen2.5-VL-7B (random init) + VGGT-1B live.

One run on one GPU:
  1. a 7B-shaped JanusModel (model.preset qwen2.5-vl-7b, merger 8192 -> 4096 -> 3584, vision tower
     frozen as in training) under DeepSpeed ZeRO-2 bf16 on 1 GPU, saved by vlnflow's own
     checkpoints.save (tag step_0000001, frozen parameters excluded, `vlnflow_complete` marker);
     the optimizer is plain SGD so the checkpoint holds exactly what ZeRO-2 consolidation reads
     (fp32 master partitions) without Adam's moments, which it never reads;
  2. `export_run` in the hf layout (bf16): consolidation + frozen weights + shards, timed; sizes;
  3. load (`Predictor.from_export` on cuda: shard digests, from_pretrained, merger) timed;
  4. predict latency per sample on demo samples with 640x480 frames, 9 frames each: VGGT-1B live
     (644x644) + greedy generation of --max-new-tokens tokens (a random 7B never stops early);
  5. the janusvln layout export (adds VGGT-1B's aggregator), timed and sized.
The checkpoint goes to --ckpt-dir (default /dev/shm when it has room: it is ~43 GB and the disk
also holds the exports). Prints a table; writes JSON to --out.

    PYTHONPATH=src python3 bench/bench_export.py --out $OUT
    PYTHONPATH=src python3 bench/bench_export.py --tiny --out /tmp/be      # CPU smoke test (tiny models)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def base_config(work: Path, tiny: bool) -> dict:
    from vlnflow.config import load_config

    overrides = {
        "dataset": {"root": str(work / "data" / "episodes")},
        "history": {"max_frames": 8, "pad": "repeat_first"},
        "train": {"run": "bench", "samples": str(work / "index" / "samples.parquet"), "cache": None, "resume": False},
    }
    if not tiny:
        overrides["spatial"] = {"preset": "vggt-1b", "image_size": 644, "device": "cuda", "batch_size": 1}
        overrides["model"] = {"preset": "qwen2.5-vl-7b", "merger_hidden": 4096}
        overrides["train"]["bf16"] = True
    return load_config(ROOT / "config.yaml", overrides)


def prepare_data(work: Path, config: dict, tiny: bool) -> None:
    from vlnflow.data.index import IndexSettings, build_index

    size = ["--size", "112x84"] if tiny else []
    subprocess.run([sys.executable, "-m", "vlnflow.cli", "demo-data", str(work / "data"), *size], check=True)
    idx = work / "index"
    idx.mkdir(parents=True, exist_ok=True)
    build_index(IndexSettings.from_config(config), str(idx / "samples.parquet"), str(idx / "episodes.parquet"), str(idx / "skipped.csv"))


def save_checkpoint(config: dict, run_dir: Path, results: dict) -> None:
    """A ZeRO-2 checkpoint of the 7B-shaped model, written by vlnflow.train.checkpoints.save."""
    import deepspeed
    import torch

    from vlnflow.model.loading import build_model, resolve_model_config
    from vlnflow.spatial.fingerprint import spatial_output
    from vlnflow.train import checkpoints
    from vlnflow.train.deepspeed_config import build_ds_config

    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    grid, channels = spatial_output(config["spatial"])
    t0 = time.perf_counter()
    model = build_model(resolve_model_config(config), channels, grid, device="cuda" if cuda else "cpu")
    sync()
    results["build_model_s"] = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    results["trainable_params"] = sum(p.numel() for p in params)
    results["total_params"] = sum(p.numel() for p in model.parameters())
    ds_config = build_ds_config({**config["train"], "bf16": cuda}, 1, cpu=not cuda)
    ds_config["zero_allow_untested_optimizer"] = True  # plain SGD: no moments to store (consolidation never reads them)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config,
                                      optimizer=torch.optim.SGD(params, lr=0.0))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run_config.json").write_text(json.dumps(config, default=str))
    t0 = time.perf_counter()
    checkpoints.save(engine, run_dir / "checkpoints", 1, {"step": 1}, keep_last=1, is_rank0=True)
    results["checkpoint_save_s"] = time.perf_counter() - t0
    results["checkpoint_bytes"] = du(run_dir / "checkpoints" / "step_0000001")
    del engine, model, params
    torch.cuda.empty_cache() if cuda else None


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def export(run_dir: Path, out: Path, layout: str, results: dict) -> None:
    from vlnflow.export.export import export_run

    t0 = time.perf_counter()
    export_run(run_dir, out, layout=layout, dtype="bfloat16")
    results[f"export_{layout}_s"] = time.perf_counter() - t0
    results[f"export_{layout}_bytes"] = du(out)
    results[f"export_{layout}_shards"] = len(list(out.glob("model-*.safetensors")))


def load_and_predict(out: Path, config: dict, n: int, max_new: int, results: dict) -> None:
    import pandas as pd
    import torch

    from vlnflow.infer.generate import greedy_decode, prompt_only
    from vlnflow.infer.predict import Predictor
    from vlnflow.train.data import TrainSamples

    t0 = time.perf_counter()
    predictor = Predictor.from_export(out, max_new_tokens=max_new)
    sync()
    results["load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _ = predictor.source.encoder  # VGGT-1B built (seeded init) and placed
    sync()
    results["vggt_build_s"] = time.perf_counter() - t0
    rows = pd.read_parquet(config["train"]["samples"]).to_dict("records")
    rows = [r for r in rows if len(r["frames"]) == max(len(x["frames"]) for x in rows)][: n + 1]
    samples = TrainSamples(pd.DataFrame(rows), predictor.collator, predictor.source, predictor.root)
    per = []
    for i in range(len(samples)):
        t0 = time.perf_counter()
        item = samples[i]
        prompt, _ = prompt_only(item.encoded)
        t1 = time.perf_counter()
        features = predictor.source.encode_live(item.vggt_frames)
        sync()
        t2 = time.perf_counter()
        batch = predictor.collator.pack([prompt], [features.cpu()])
        tokens = greedy_decode(predictor.model, batch, predictor.stop_ids, max_new)
        sync()
        t3 = time.perf_counter()
        per.append({"frames": len(rows[i]["frames"]), "prompt_tokens": len(prompt.input_ids), "new_tokens": len(tokens),
                    "prepare_s": t1 - t0, "vggt_s": t2 - t1, "generate_s": t3 - t2, "total_s": t3 - t0})
    results["predict_warmup"] = per[0]
    timed = per[1:] or per
    results["predict_samples"] = timed
    from vlnflow.timing import spread

    for key in ("prepare_s", "vggt_s", "generate_s", "total_s"):
        results[f"predict_{key}_median"] = statistics.median(p[key] for p in timed)
        results[f"predict_{key}"] = spread([p[key] for p in timed])
    results["decode_tokens_per_s"] = statistics.median(p["new_tokens"] / p["generate_s"] for p in timed)
    if torch.cuda.is_available():
        results["predict_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del predictor


def table(r: dict) -> str:
    gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
    rows = [
        ("model params (trainable)", f"{r['total_params'] / 1e9:.2f} B ({r['trainable_params'] / 1e9:.2f} B)"),
        ("DeepSpeed checkpoint (ZeRO-2, frozen excluded)", f"{gb(r['checkpoint_bytes'])}, saved in {r['checkpoint_save_s']:.1f} s"),
        ("export hf (bf16)", f"{r['export_hf_s']:.1f} s, {gb(r['export_hf_bytes'])} in {r['export_hf_shards']} shards"),
        ("export janusvln (bf16, + VGGT aggregator)", f"{r['export_janusvln_s']:.1f} s, {gb(r['export_janusvln_bytes'])}" if "export_janusvln_s" in r else "not run"),
        ("load (Predictor.from_export)", f"{r['load_s']:.1f} s (+ VGGT build {r['vggt_build_s']:.1f} s)"),
        ("predict per sample (median)", f"{r['predict_total_s_median']:.3f} s = VGGT {r['predict_vggt_s_median']:.3f} + "
                                         f"generate {r['predict_generate_s_median']:.3f} + prep {r['predict_prepare_s_median']:.3f}"),
        ("decode", f"{r['decode_tokens_per_s']:.1f} tokens/s ({r['predict_samples'][0]['new_tokens']} tokens, "
                   f"{r['predict_samples'][0]['prompt_tokens']}-token prompt, {r['predict_samples'][0]['frames']} frames)"),
    ]
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/bench_export"))
    parser.add_argument("--work", default="/tmp/bench_export_work", help="data, run dir and exports")
    parser.add_argument("--ckpt-dir", help="where the DeepSpeed run dir goes (default: /dev/shm if it has 60 GB free, else --work)")
    parser.add_argument("--samples", type=int, default=5, help="timed predict samples (after one warm-up)")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="JanusVLN's evaluation uses 24")
    parser.add_argument("--no-janusvln", action="store_true", help="skip the janusvln layout export")
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU (smoke test)")
    args = parser.parse_args()
    out_dir, work = Path(args.out), Path(args.work)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ckpt_root = Path(args.ckpt_dir) if args.ckpt_dir else work
    if not args.ckpt_dir and not args.tiny and Path("/dev/shm").exists() and shutil.disk_usage("/dev/shm").free > 60e9:
        ckpt_root = Path("/dev/shm/bench_export_run")
    run_dir = ckpt_root / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    from vlnflow.provenance import provenance

    results: dict = {"provenance": provenance({"predict samples (after one warm-up)": args.samples, "export, load": 1}),
                     "run_dir": str(run_dir), "tiny": args.tiny}  # fmt: skip
    config = base_config(work, args.tiny)
    prepare_data(work, config, args.tiny)
    save_checkpoint(config, run_dir, results)
    export(run_dir, work / "export_hf", "hf", results)
    load_and_predict(work / "export_hf", config, args.samples, args.max_new_tokens, results)
    shutil.rmtree(work / "export_hf")
    if not args.no_janusvln:
        export(run_dir, work / "export_janusvln", "janusvln", results)
        shutil.rmtree(work / "export_janusvln")
    shutil.rmtree(run_dir, ignore_errors=True)
    (out_dir / "bench_export.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(table(results))
    print(f"json: {out_dir / 'bench_export.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
