"""bench/fwdbwd.py's float32 reference (check_new_vs_prev): it runs the bf16 model's exact float32 up-cast and puts
every weight, buffer and requires_grad flag back bit for bit, so the cases timed after it run the same model."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from fwdbwd import float32_reference, rms_rel, tiny_janus_batch  # noqa: E402

from vlnflow.model.loading import build_model  # noqa: E402


def test_float32_reference_restores_the_bf16_model_and_is_closer_to_exact_than_bf16():
    device = torch.device("cpu")
    cfg, batch = tiny_janus_batch(device)
    model = build_model({**cfg, "attention": "torch"}, 12, (4, 4), device=device, dtype=torch.float32).train()
    exact = {k: v.clone() for k, v in model.state_dict().items()}
    names = ["merger.mlp.0.weight", "qwen.model.language_model.norm.weight"]
    params = dict(model.named_parameters())
    model.zero_grad(set_to_none=True)
    model(batch).backward()
    want = {n: params[n].grad.clone() for n in names}  # the float32 model itself

    model.to(torch.bfloat16)
    frozen = next(n for n, p in params.items() if n not in names)
    params[frozen].requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in params.items()}
    loss, grads = float32_reference(model, batch, names, device)

    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert {n: p.requires_grad for n, p in params.items()} == flags and all(p.grad is None for p in params.values())
    assert set(grads) == set(names) and all(g.dtype == torch.float32 for g in grads.values())
    # the reference ran in float32 on the bf16 weights: nearer the float32 model's gradients than bf16 itself is
    model.zero_grad(set_to_none=True)
    model(batch).backward()
    for n in names:
        bf16 = params[n].grad.float()
        assert rms_rel(grads[n], want[n]) < rms_rel(bf16, want[n]), n
    assert torch.isfinite(torch.tensor(loss)) and any(not torch.equal(before[k], exact[k]) for k in exact)
