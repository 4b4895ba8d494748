"""The kernels vlnflow runs BY DEFAULT on this GPU, checked against float32 references at the real shapes.

bench/check_kernels.py compares flash-attn-4 with the current kernels one against the other. This script
answers the question a user has: with the shipped settings (`model.attention: auto`, `spatial.attention: auto`,
`model.vision_fast: true`), is what runs on this card right? Every case resolves the setting the way the model
does (vlnflow.fa4.resolve) and goes through the same call the model makes, in bf16, with autograd where
training uses it; the reference is the same function in float32 (math SDPA on upcast inputs / an fp32 copy of
the module). Each case also measures the PLAIN torch kernel in bf16 against the same reference, so the
default's error is read against bf16's own rounding:

  llm_varlen    packed LLM attention 4 x ~5,310 tokens, 28 q / 4 kv heads, hd 128, causal: out, dq, dk, dv
  llm_layer     one 7B decoder layer, 4,096 tokens, fwd + bwd, `model.fused_kernels: auto` (Liger where it runs)
  vision_tower  Qwen2.5-VL-7B vision tower (random init, bf16), 9 frames of the configured geometry:
                vision_fast (varlen attention routed per block + padded MLP + compiled blocks on CUDA) vs the stock tower
                in float32 on the same weights; stock bf16 gives the rounding floor
  vggt_encoder  SpatialEncoder.encode_indexed, VGGT-1B shape (random init), B=4 x 9 frames: the default
                (compiled blocks, `auto` attention, bf16) vs the same encoder in float32 with SDPA
  janus_tiny    JanusModel, tiny preset in bf16, model.attention auto vs float32: loss and merger gradient

A case passes when its rms relative error is at most max(--factor x the plain bf16 error, --floor).
Exit status 1 if any case fails or errors.

    PYTHONPATH=src python3 bench/check_default_kernels.py --out $OUT
    PYTHONPATH=src python3 bench/check_default_kernels.py --cpu-smoke --out /tmp/cdk   # shapes / 16, CPU, float32
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from vlnflow import fa4
from vlnflow.model.varlen import _padded_sdpa, varlen_attention

SCALE = 1
DEVICE = "cuda"
HALF = torch.bfloat16


def rel(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return {"max_rel": float("inf"), "rms_rel": float("inf"), "nonfinite": True}
    return {"max_rel": ((a - b).abs().max() / b.abs().max()).item(), "rms_rel": ((a - b).norm() / b.norm()).item()}


def verdict(row: dict, errors: dict[str, tuple[dict, dict]], factor: float, floor: float) -> dict:
    """errors: name -> (default vs ref, plain bf16 vs ref). Adds per-name limits and `ok`."""
    checks = {}
    for name, (default, plain) in errors.items():
        limit = max(factor * plain["rms_rel"], floor)
        checks[name] = {"default_rms_rel": default["rms_rel"], "plain_bf16_rms_rel": plain["rms_rel"],
                        "limit": limit, "ok": default["rms_rel"] <= limit}
    row["checks"] = checks
    row["ok"] = all(c["ok"] for c in checks.values())
    return row


def case_llm(dev, args) -> dict:
    from vlnflow.model.loading import attention_kernel

    lengths = [max(8, n // SCALE) for n in (5310, 5290, 5335, 5301)]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    mx, total, scale = max(lengths), sum(lengths), 128**-0.5
    dtype = HALF if DEVICE == "cuda" else torch.float32
    kernel = attention_kernel({"attention": "auto"}, dev, dtype)
    gen = torch.Generator(device=dev).manual_seed(1)
    q = torch.randn(total, 28, 128, device=dev, generator=gen)
    k = torch.randn(total, 4, 128, device=dev, generator=gen)
    v = torch.randn(total, 4, 128, device=dev, generator=gen)
    grad = torch.randn(total, 28, 128, device=dev, generator=gen)

    def run(backend, dt, fn=varlen_attention):
        leaves = [x.to(dt).requires_grad_() for x in (q, k, v)]
        kwargs = {} if fn is _padded_sdpa else {"backend": backend}
        out = fn(*leaves, cu, mx, causal=True, scale=scale, **kwargs)
        grads = torch.autograd.grad(out, leaves, grad.to(dt))
        return [out.detach(), *grads]

    ref = run(None, torch.float32, _padded_sdpa)
    default = run(kernel, dtype)
    plain = run("torch", dtype)
    row = {"case": "llm_varlen", "kernel": kernel, "shape": f"{len(lengths)} x ~{lengths[0]} tok, 28/4 heads, hd128, causal"}
    errors = {n: (rel(d, r), rel(p, r)) for n, d, p, r in zip(("out", "dq", "dk", "dv"), default, plain, ref)}
    return verdict(row, errors, args.factor, args.floor)


def case_vision(dev, args) -> dict:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from vlnflow.model.host_prep import vision_kwargs
    from vlnflow.model.loading import attention_kernel, vision_compile
    from vlnflow.model.tiny import qwen7b_config
    from vlnflow.model.vision_fast import apply_vision_fast

    vcfg = qwen7b_config().vision_config
    grid_h, grid_w = args.grid
    if SCALE > 1:  # smoke: a small tower of the same structure
        vcfg.depth, vcfg.hidden_size, vcfg.num_heads, vcfg.intermediate_size, vcfg.out_hidden_size = 4, 80, 2, 100, 64
        vcfg.fullatt_block_indexes = [1, 3]
        grid_h, grid_w = 8, 12
    vcfg._attn_implementation = "sdpa"
    dtype = HALF if DEVICE == "cuda" else torch.float32
    kernel = attention_kernel({"attention": "auto"}, dev, dtype)
    torch.manual_seed(0)
    with torch.device(dev):
        tower32 = Qwen2_5_VisionTransformerPretrainedModel._from_config(vcfg, dtype=torch.float32).eval()
    stock = copy.deepcopy(tower32).to(dtype)
    compiled = vision_compile({"compile_vision": "auto"}, dev)  # the default: V3 on CUDA
    fast = apply_vision_fast(copy.deepcopy(tower32).to(dtype), attention=kernel, compile=compiled)
    frames = 9
    grid = torch.tensor([[1, grid_h, grid_w]] * frames)
    patch = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size**2
    pixels = torch.randn(frames * grid_h * grid_w, patch, device=dev, generator=torch.Generator(device=dev).manual_seed(2))
    meta = vision_kwargs(grid, vcfg, dev)

    def run(model, dt, **kw):
        with torch.no_grad():
            out = model(pixels.to(dt), grid_thw=grid.to(dev), **kw)
        return (out.pooler_output if hasattr(out, "pooler_output") else out).float()

    ref = run(tower32, torch.float32)
    plain = run(stock, dtype)
    default = run(fast, dtype, **meta)
    row = {"case": "vision_tower", "kernel": kernel, "compiled_blocks": compiled,
           "shape": f"{frames} frames x {grid_h}x{grid_w} patches, depth {vcfg.depth}"}
    return verdict(row, {"out": (rel(default, ref), rel(plain, ref))}, args.factor, args.floor)


def case_llm_layer(dev, args) -> dict:
    """One real-size Qwen2.5-VL-7B decoder layer, forward + backward, with `model.fused_kernels: auto` (Liger's
    RMSNorm, SwiGLU and RoPE where they run) in bf16 against the same layer in float32 (transformers' own ops)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VLDecoderLayer,
        Qwen2_5_VLRMSNorm,
        Qwen2_5_VLRotaryEmbedding,
    )

    from vlnflow.model import fused_kernels
    from vlnflow.model.tiny import qwen7b_config

    tcfg = qwen7b_config().text_config
    if SCALE > 1:
        tcfg.hidden_size, tcfg.intermediate_size, tcfg.num_attention_heads, tcfg.num_key_value_heads = 64, 128, 4, 2
        tcfg.head_dim = 16
        tcfg.rope_parameters = {**tcfg.rope_parameters, "mrope_section": [2, 3, 3]}
    tcfg._attn_implementation = "sdpa"
    dtype = HALF if DEVICE == "cuda" else torch.float32
    kernel = fused_kernels.resolve("auto", dev)
    torch.manual_seed(0)
    with torch.device(dev):
        layer32 = Qwen2_5_VLDecoderLayer(tcfg, layer_idx=0).float()
        rotary = Qwen2_5_VLRotaryEmbedding(tcfg)
    for p in layer32.parameters():  # random weights of a trained layer's scale (the init leaves norms at 1)
        torch.nn.init.normal_(p, 0.0 if p.dim() > 1 else 1.0, 0.02 if p.dim() > 1 else 0.1)
    plain = copy.deepcopy(layer32).to(dtype)
    fused = copy.deepcopy(layer32).to(dtype)
    if kernel == fused_kernels.LIGER:
        text = torch.nn.Module()  # apply_fused_kernels patches qwen.model.language_model: layers and final norm
        text.layers = torch.nn.ModuleList([fused])
        text.norm = Qwen2_5_VLRMSNorm(tcfg.hidden_size).to(dev, dtype)
        fused_kernels.apply_fused_kernels(_Wrap(text))
    tokens = max(16, 4096 // SCALE)
    gen = torch.Generator(device=dev).manual_seed(5)
    x = torch.randn(1, tokens, tcfg.hidden_size, device=dev, generator=gen)
    grad = torch.randn(1, tokens, tcfg.hidden_size, device=dev, generator=gen)
    positions = torch.arange(tokens, device=dev)[None, None].expand(3, 1, tokens)

    def run(layer, dt):
        inp = x.to(dt).requires_grad_()
        cos, sin = rotary(inp, positions)
        out = layer(inp, position_embeddings=(cos.to(dt), sin.to(dt)), attention_mask=None, position_ids=None)
        out = out[0] if isinstance(out, tuple) else out
        (g_in,) = torch.autograd.grad(out, inp, grad.to(dt))
        return out.detach().float(), g_in.float()

    ref, default, base = run(layer32, torch.float32), run(fused, dtype), run(plain, dtype)
    row = {"case": "llm_layer", "kernel": kernel, "shape": f"1 x {tokens} tokens, hidden {tcfg.hidden_size}"}
    errors = {n: (rel(d, r), rel(b, r)) for n, d, b, r in zip(("out", "d_input"), default, base, ref)}
    return verdict(row, errors, args.factor, args.floor)


class _Wrap:
    """A minimal `qwen` whose `.model.language_model` is the given module (apply_fused_kernels' entry point)."""

    def __init__(self, language_model):
        self.model = type("M", (), {"language_model": language_model})()


def case_vggt(dev, args) -> dict:
    from vlnflow.spatial import SpatialEncoder

    preset = "vggt-1b" if SCALE == 1 else "tiny"
    h, w = (args.grid[0] * 14, args.grid[1] * 14) if SCALE == 1 else (42, 56)
    spatial = {"preset": preset, "device": DEVICE, "image_size": max(h, w), "dtype": "bfloat16"}
    default = SpatialEncoder.from_config({**spatial, "attention": "auto"})
    ref_enc = SpatialEncoder.from_config({**spatial, "dtype": "float32", "attention": "sdpa"}, compile_blocks=False)
    plain = SpatialEncoder.from_config({**spatial, "attention": "sdpa"}, compile_blocks=False)
    gen = torch.Generator().manual_seed(3)
    images = torch.rand(12, 3, h, w, generator=gen)
    index = torch.arange(36).remainder(12).view(4, 9)
    out = {name: enc.encode_indexed(images, index).float() for name, enc in
           (("ref", ref_enc), ("default", default), ("plain", plain))}
    row = {"case": "vggt_encoder", "kernel": default.attention_kernel, "compiled": default.compile_blocks,
           "shape": f"{preset}, {h}x{w}, B=4 x 9 frames (12 unique)"}
    return verdict(row, {"features": (rel(out["default"], out["ref"]), rel(out["plain"], out["ref"]))}, args.factor, args.floor)


def case_janus(dev, args) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fwdbwd import tiny_janus_batch  # noqa: PLC0415 - same folder

    from vlnflow.model.loading import build_model

    cfg, batch = tiny_janus_batch(dev)
    results = {}
    for name, dtype, attention in (("ref", torch.float32, "torch"), ("default", HALF, "auto"), ("plain", HALF, "torch")):
        if DEVICE == "cpu" and dtype == HALF:
            dtype = torch.float32
        torch.manual_seed(0)
        model = build_model({**cfg, "attention": attention}, 12, (4, 4), device=dev, dtype=dtype).train()
        loss = model(batch)
        loss.backward()
        results[name] = (loss.detach().float()[None], model.merger.mlp[0].weight.grad.float(),
                         model.qwen.model.language_model.layers[0].self_attn.q_proj.weight.grad.float())
    errors = {n: (rel(d, r), rel(p, r)) for n, d, p, r in
              zip(("loss", "merger_grad", "q_proj_grad"), results["default"], results["plain"], results["ref"])}
    return verdict({"case": "janus_tiny", "shape": "tiny preset, packed batch of 3"}, errors, args.factor, args.floor)


CASES = {"llm_varlen": case_llm, "llm_layer": case_llm_layer, "vision_tower": case_vision, "vggt_encoder": case_vggt,
         "janus_tiny": case_janus}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma list of cases (default all)")
    ap.add_argument("--grid", default="46x46", help="VGGT/vision patch grid HxW of one frame (46x46 = 644 pad; 34x46 = crop)")
    ap.add_argument("--factor", type=float, default=1.5, help="allowed multiple of the plain bf16 kernel's error")
    ap.add_argument("--floor", type=float, default=1e-2, help="always-acceptable rms relative error")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/check_default_kernels"))
    ap.add_argument("--cpu-smoke", action="store_true", help="smoke-test this script on CPU at shapes / 16")
    args = ap.parse_args()
    args.grid = tuple(int(x) for x in args.grid.lower().split("x"))
    global SCALE, DEVICE
    if args.cpu_smoke:
        SCALE, DEVICE = 16, "cpu"
    dev = torch.device(DEVICE)
    from vlnflow.provenance import provenance

    block = provenance({"per_case": 1}, device=dev)
    report = {**block, "provenance": block, "flash_attn_4": fa4.unavailable_reason(dev) or "usable",
              "factor": args.factor, "floor": args.floor, "rows": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in [c for c in args.only.split(",") if c] or list(CASES):
        t0 = time.perf_counter()
        try:
            row = CASES[name](dev, args)
        except Exception as exc:  # keep checking the others; the error is in the report
            row = {"case": name, "error": repr(exc), "trace": traceback.format_exc(limit=8), "ok": False}
        row["wall_s"] = round(time.perf_counter() - t0, 2)
        if not row["ok"]:
            failed.append(name)
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
        (out / "check_default_kernels.json").write_text(json.dumps(report, indent=1))
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    print(f"\n## default kernels on {report['card']} (commit {report['commit']}, torch {report['versions']['torch']})")
    for r in report["rows"]:
        if "error" in r:
            print(f"{r['case']:13} ERROR {r['error'][:150]}")
            continue
        for name, c in r["checks"].items():
            print(f"{r['case']:13} {name:12} kernel={str(r.get('kernel', '-')):13} default {c['default_rms_rel']:.2e}  "
                  f"plain bf16 {c['plain_bf16_rms_rel']:.2e}  limit {c['limit']:.2e}  {'ok' if c['ok'] else 'FAIL'}")
    print("FAILED: " + ", ".join(failed) if failed else "all default kernels within limits")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
