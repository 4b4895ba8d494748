"""flash-attn-4 vs the current kernels at the real shapes, on one GPU: equality (bf16 tolerance) and speed.

For every kernel vlnflow can route to flash-attn-4 (vlnflow.fa4) it runs the same bf16 inputs through
the current kernel and through flash-attn-4, and prints the max and rms relative error of the output
and (for the trained LLM attention and the vision tower) of dq, dk, dv under the same upstream gradient,
plus each side's error against a float32 reference where one fits, and median milliseconds:

  llm_varlen      packed LLM attention: 4 samples x 5,310 tokens, 28 q / 4 kv heads, hd 128, causal (fwd + bwd)
  vision_window   Qwen vision tower, 9 images x 2,116 patches in 64-token windows, 16 heads, hd 80 (fwd + bwd)
  vision_full     the same over whole images (the tower's full-attention layers)
  vggt_frame      VGGT frame attention: 144 frames x 2,121 tokens, 16 heads, hd 64 (fwd)
  vggt_global     VGGT block-causal global attention over 9-frame samples, B=16 (fwd)
  vggt_last       the kept layer: last frame's queries over all 9 frames (fwd)
  encoder         SpatialEncoder.encode_indexed, VGGT-1B random init, 644 px, B=4: features sdpa vs fa4
  janus_tiny      JanusModel (tiny preset, bf16 on GPU) loss and gradients, model.attention torch vs fa4
  janus_sync      the same model's forward + backward under torch.cuda.set_sync_debug_mode("warn"): every
                  device->host sync and where it happens, for the trainer's old batch and a worker-packed one
                  (host_prep metadata); runs without flash-attn-4 too: --only janus_sync

    PYTHONPATH=src python3 bench/check_kernels.py --out $OUT        # needs CUDA sm90+ and the gpu extra
    PYTHONPATH=src python3 bench/check_kernels.py --only llm_varlen,vggt_frame --out $OUT
    PYTHONPATH=src python3 bench/check_kernels.py --cpu-smoke --out /tmp/ck   # this script's own smoke test:
        shapes / 16, on CPU, the CURRENT kernels standing in for flash-attn-4 (errors are then 0; no fa4 check)

Exit status 1 when flash-attn-4 cannot run here (the reason is printed), or when a kernel's error exceeds
--tol (rms relative, default 2e-2: bf16 attention outputs agree to ~4e-3).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from vlnflow import fa4
from vlnflow.model.varlen import _padded_sdpa, varlen_attention
from vlnflow.spatial.attention import attend, block_causal_attention, last_frame_attention


def rel(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.float(), b.float()
    return {"max_rel": ((a - b).abs().max() / b.abs().max()).item(), "rms_rel": ((a - b).norm() / b.norm()).item()}


SCALE = 1  # --cpu-smoke divides the token counts by 16
DEVICE = "cuda"


def n(tokens: int) -> int:
    return max(8, tokens // SCALE)


def ms(fn, iters: int = 5) -> float:
    fn()
    if DEVICE == "cpu":
        t0 = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - t0)
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        out.append(s.elapsed_time(e))
    return statistics.median(out)


def compare(name, shape, current, flash, inputs, *, backward: bool, reference=None) -> dict:
    """current/flash: f(*inputs) -> out. Output, grads (same upstream gradient), fp32 errors, timings."""
    row = {"kernel": name, "shape": shape}
    leaves = [x.detach().clone().requires_grad_(backward) for x in inputs]
    out_c = current(*leaves)
    grad = torch.randn_like(out_c)
    grads_c = torch.autograd.grad(out_c, leaves, grad) if backward else None
    leaves_f = [x.detach().clone().requires_grad_(backward) for x in inputs]
    out_f = flash(*leaves_f)
    grads_f = torch.autograd.grad(out_f, leaves_f, grad) if backward else None
    row["out"] = rel(out_f, out_c)
    if backward:
        row["grads"] = {n: rel(gf, gc) for n, gf, gc in zip(("dq", "dk", "dv"), grads_f, grads_c)}
    if reference is not None:
        try:
            with torch.no_grad():
                ref = reference(*[x.float() for x in inputs])
            row["current_vs_fp32"], row["fa4_vs_fp32"] = rel(out_c, ref), rel(out_f, ref)
            del ref
        except torch.OutOfMemoryError:
            row["fp32_reference"] = "out of memory"
    with torch.no_grad():
        row["ms_current_fwd"] = ms(lambda: current(*inputs))
        row["ms_fa4_fwd"] = ms(lambda: flash(*inputs))
    if backward:
        def fwd_bwd(f):
            ls = [x.detach().requires_grad_() for x in inputs]
            torch.autograd.grad(f(*ls), ls, grad)
        row["ms_current_fwd_bwd"] = ms(lambda: fwd_bwd(current))
        row["ms_fa4_fwd_bwd"] = ms(lambda: fwd_bwd(flash))
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return row


def segments(lengths, device):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return cu, max(lengths)


def qkv(total, hq, hkv, d, dev, *, batch=None):
    shape = (total, hq, d) if batch is None else (batch, total, hq, d)
    kv = (total, hkv, d) if batch is None else (batch, total, hkv, d)
    return torch.randn(shape, device=dev, dtype=torch.bfloat16), torch.randn(kv, device=dev, dtype=torch.bfloat16), \
        torch.randn(kv, device=dev, dtype=torch.bfloat16)


def case_llm(dev):
    cu, mx = segments([n(5310), n(5290), n(5335), n(5301)], dev)
    q, k, v = qkv(int(cu[-1]), 28, 4, 128, dev)
    scale = 128**-0.5
    return compare(
        "llm_varlen", "4x~5310 tok, 28/4 heads, hd128, causal",
        lambda q, k, v: varlen_attention(q, k, v, cu, mx, causal=True, scale=scale),
        lambda q, k, v: varlen_attention(q, k, v, cu, mx, causal=True, scale=scale, backend=fa4.FA4),
        (q, k, v), backward=True,
        reference=lambda q, k, v: _padded_sdpa(q, k, v, cu, mx, causal=True, scale=scale),
    )


def case_vision(dev, window: bool):
    patches = n(2116)
    lengths = [64] * (9 * patches // 64) + ([9 * patches % 64] if 9 * patches % 64 else []) if window else [patches] * 9
    cu, mx = segments(lengths, dev)
    q, k, v = qkv(int(cu[-1]), 16, 16, 80, dev)
    scale = 80**-0.5
    name = "vision_window" if window else "vision_full"
    return compare(
        name, f"9x2116 patches in {'64-token windows' if window else 'whole images'}, 16 heads, hd80",
        lambda q, k, v: varlen_attention(q, k, v, cu, mx, causal=False, scale=scale),
        lambda q, k, v: varlen_attention(q, k, v, cu, mx, causal=False, scale=scale, backend=fa4.FA4),
        (q, k, v), backward=True,
        reference=lambda q, k, v: _padded_sdpa(q, k, v, cu, mx, causal=False, scale=scale),
    )


def case_vggt(dev, which: str):
    t, frames, batch = n(2121), 9, 16 // SCALE or 1
    if which == "frame":
        q, k, v = qkv(t, 16, 16, 64, dev, batch=batch * frames)
        return compare("vggt_frame", "144 frames x 2121 tok, 16 heads, hd64", lambda *x: attend(*x, "sdpa"),
                       lambda *x: attend(*x, fa4.FA4), (q, k, v), backward=False, reference=lambda *x: attend(*x, "sdpa"))
    q, k, v = qkv(t, 16, 16, 64, dev, batch=batch * frames)
    if which == "global":
        return compare("vggt_global", "B=16 x 9 frames x 2121 tok, block-causal", lambda *x: block_causal_attention(*x, frames),
                       lambda *x: block_causal_attention(*x, frames, kernel=fa4.FA4), (q, k, v), backward=False,
                       reference=lambda *x: block_causal_attention(*x, frames))
    q_last = q.view(batch, frames, t, 16, 64)[:, -1].contiguous()
    return compare("vggt_last", "B=16: 2121 queries over 19089 keys", lambda q, k, v: last_frame_attention(q, k, v, frames),
                   lambda q, k, v: last_frame_attention(q, k, v, frames, fa4.FA4), (q_last, k, v), backward=False)


def case_encoder(dev):
    from vlnflow.spatial import SpatialEncoder

    preset, size = ("vggt-1b", 644) if SCALE == 1 else ("tiny", 56)
    enc = SpatialEncoder.from_config({"preset": preset, "image_size": size, "device": DEVICE, "attention": "sdpa"}, compile_blocks=False)
    images = torch.rand(12, 3, size, size, device=dev)
    index = torch.arange(36).remainder(12).view(4, 9)
    base = enc.encode_indexed(images, index)
    t_sdpa = ms(lambda: enc.encode_indexed(images, index), 3)
    if DEVICE == "cuda":
        enc.attention_kernel_for(fa4.FA4)  # a UserError saying why, if it cannot run
    enc.model.attention_kernel = fa4.FA4
    got = enc.encode_indexed(images, index)
    t_fa4 = ms(lambda: enc.encode_indexed(images, index), 3)
    row = {"kernel": "encoder", "shape": "VGGT-1B random, 644px, B=4 x 9 frames (eager)", "out": rel(got, base),
           "ms_current_fwd": t_sdpa, "ms_fa4_fwd": t_fa4}
    del enc
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return row


def case_janus(dev):
    from fwdbwd import tiny_janus_batch  # noqa: PLC0415 - same folder

    from vlnflow.model.loading import build_model
    from vlnflow.model.packed_attention import use_packed_attention
    from vlnflow.model.vision_fast import use_varlen_vision_attention

    cfg, batch = tiny_janus_batch(dev)
    results = {}
    for kernel in ("torch", fa4.FA4):
        torch.manual_seed(0)
        model = build_model({**cfg, "attention": "torch"}, 12, (4, 4), device=dev, dtype=torch.bfloat16).train()
        use_packed_attention(model.qwen, kernel)
        use_varlen_vision_attention(model.visual, kernel)
        loss = model(batch)
        loss.backward()
        results[kernel] = (loss.detach().float(), model.merger.mlp[0].weight.grad.float(),
                           model.qwen.model.language_model.layers[0].self_attn.q_proj.weight.grad.float())
    (lc, mc, qc), (lf, mf, qf) = results["torch"], results[fa4.FA4]
    return {"kernel": "janus_tiny", "shape": "tiny preset, bf16, packed batch of 3", "out": rel(lf[None], lc[None]),
            "grads": {"merger": rel(mf, mc), "q_proj_layer0": rel(qf, qc)}}


def case_sync(dev):
    """Device->host syncs in forward+backward: the trainer's old batch vs a worker-packed one (host_prep)."""
    import warnings

    from fwdbwd import tiny_janus_batch  # noqa: PLC0415 - same folder

    from vlnflow.model.host_prep import add_host_metadata, to_device
    from vlnflow.model.loading import build_model

    kernel = fa4.FA4 if fa4.unavailable_reason(dev) is None else "torch"
    cfg, batch = tiny_janus_batch("cpu")
    model = build_model({**cfg, "attention": kernel}, 12, (4, 4), device=dev, dtype=torch.bfloat16).train()
    row = {"kernel": "janus_sync", "shape": f"tiny, bf16, attention {kernel}"}
    for name, b in (
        ("old_batch", {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}),
        ("worker_batch", to_device(add_host_metadata(dict(batch), model.qwen.config), dev)),
    ):
        model(b).backward()  # warm-up (JIT, allocator)
        torch.cuda.synchronize()
        found = []
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda message, *a, **k: found.append(
                [f"{f.filename.rsplit('site-packages/', 1)[-1]}:{f.lineno} {f.name}" for f in traceback.extract_stack()[-9:-1]])
            torch.cuda.set_sync_debug_mode("warn")
            try:
                model(b).backward()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        row[name] = {"syncs": len(found), "sites": [" <- ".join(reversed(st[-4:])) for st in found[:12]]}
    return row


def _stand_in_current_kernels() -> None:
    """--cpu-smoke: route vlnflow.fa4's two calls to the current kernels (same layouts), for a CPU dry run."""

    def dense(q, k, v, *, causal=False, scale=None):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                              scale=scale, enable_gqa=q.shape[2] != k.shape[2]).transpose(1, 2)

    fa4.dense = dense
    fa4.varlen = lambda q, k, v, cu, mx, *, causal, scale=None: varlen_attention(q, k, v, cu, mx, causal=causal, scale=scale)


CASES = {
    "llm_varlen": case_llm,
    "vision_window": lambda d: case_vision(d, True),
    "vision_full": lambda d: case_vision(d, False),
    "vggt_frame": lambda d: case_vggt(d, "frame"),
    "vggt_global": lambda d: case_vggt(d, "global"),
    "vggt_last": lambda d: case_vggt(d, "last"),
    "encoder": case_encoder,
    "janus_tiny": case_janus,
    "janus_sync": case_sync,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma list of cases (default all)")
    ap.add_argument("--tol", type=float, default=2e-2, help="largest acceptable rms relative error")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/check_kernels"))
    ap.add_argument("--cpu-smoke", action="store_true", help="smoke-test this script on CPU (no flash-attn-4 involved)")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    global SCALE, DEVICE
    if args.cpu_smoke:
        SCALE, DEVICE = 16, "cpu"
        _stand_in_current_kernels()
    dev = torch.device(DEVICE)
    reason = None if args.cpu_smoke or args.only == "janus_sync" else fa4.unavailable_reason(dev)
    if reason:
        print(f"flash-attn-4 cannot run here: {reason}")
        return 1
    from vlnflow.provenance import provenance

    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "command": " ".join(sys.argv), "rows": [],
              "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu (smoke: current kernels stand in for fa4)",
              "provenance": provenance({"timed_calls_per_kernel": 5}, device=dev)}
    wanted = [c for c in args.only.split(",") if c] or [c for c in CASES if not (args.cpu_smoke and c == "janus_sync")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bad = []
    for name in wanted:
        t0 = time.perf_counter()
        try:
            row = CASES[name](dev)
        except Exception as exc:  # keep checking the others; the error is in the report
            row = {"kernel": name, "error": repr(exc), "trace": traceback.format_exc(limit=6)}
            bad.append(name)
        row["wall_s"] = time.perf_counter() - t0
        report["rows"].append(row)
        errs = [row["out"]["rms_rel"]] if "out" in row else []
        errs += [g["rms_rel"] for g in row.get("grads", {}).values()]
        if errs and max(errs) > args.tol:
            bad.append(name)
        print(json.dumps(row), flush=True)
        (out / "check_kernels.json").write_text(json.dumps(report, indent=1))
    print(f"\n## {report['device']} torch {report['torch']} {report['date']}")
    print(f"{'kernel':14} {'out max/rms rel':>20} {'grads rms rel (dq dk dv)':>30} {'cur/fa4 fp32 rms':>18} {'ms cur->fa4 fwd':>16} {'fwd+bwd':>16}")
    for r in report["rows"]:
        if "error" in r:
            print(f"{r['kernel']:14} ERROR {r['error'][:110]}")
            continue
        if "worker_batch" in r:
            for name in ("old_batch", "worker_batch"):
                print(f"{r['kernel']:14} {name}: {r[name]['syncs']} device->host syncs in forward+backward ({r['shape']})" +
                      "".join(f"\n    {site}" for site in r[name]["sites"]))
            continue
        o = r["out"]
        g = " ".join(f"{v['rms_rel']:.1e}" for v in r.get("grads", {}).values()) or "-"
        f32 = f"{r['current_vs_fp32']['rms_rel']:.1e}/{r['fa4_vs_fp32']['rms_rel']:.1e}" if "fa4_vs_fp32" in r else "-"
        fwd = f"{r['ms_current_fwd']:.2f}->{r['ms_fa4_fwd']:.2f}" if "ms_fa4_fwd" in r else "-"
        fb = f"{r['ms_current_fwd_bwd']:.2f}->{r['ms_fa4_fwd_bwd']:.2f}" if "ms_fa4_fwd_bwd" in r else "-"
        print(f"{r['kernel']:14} {o['max_rel']:9.1e}/{o['rms_rel']:9.1e} {g:>30} {f32:>18} {fwd:>16} {fb:>16}")
    print(f"\n{'FAILED: ' + ', '.join(sorted(set(bad))) if bad else 'all kernels agree within'} (rms tol {args.tol})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
