"""Building an aggregator without paying for an init that is overwritten anyway.

`build_aggregator` constructs on the meta device and materialises uninitialised
storage where the model will run (CPU by default; the encoder builds straight on
its GPU, with the matmul weights already in the compute dtype, so 1.2 B parameters
never pass through float32 CPU memory); the caller then either loads weights or
calls `init_random_`, a seeded init drawn on the CPU so the same (preset, seed)
gives bit-identical weights in every process and on every machine (the demo, tests
and benchmarks run on it; its values are not meaningful features).
"""

from __future__ import annotations

import math

import torch

from vlnflow.spatial.aggregator import IMAGENET_MEAN, IMAGENET_STD, Aggregator, AggregatorConfig


def matmul_modules(model: torch.nn.Module):
    """The modules whose weights run in the compute dtype (Linear, the patch conv); the rest stays float32."""
    return [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def build_aggregator(config: AggregatorConfig, device: str | torch.device = "cpu", matmul_dtype: torch.dtype = torch.float32) -> Aggregator:
    """An Aggregator with uninitialised parameters on `device` (Linear / conv weights in `matmul_dtype`, the rest
    float32) and filled buffers."""
    with torch.device("meta"):
        model = Aggregator(config)
    for module in matmul_modules(model):
        module.to(matmul_dtype)
    model = model.to_empty(device=device)
    model.image_mean.copy_(torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
    model.image_std.copy_(torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
    return model


@torch.no_grad()
def init_random_(model: Aggregator, seed: int) -> Aggregator:
    """Fill every parameter from a CPU generator seeded with `seed`, in sorted name order.

    Matrices: uniform with std 1/sqrt(fan_in); biases: std 0.02; LayerNorm weights
    1 + 0.1 U; LayerScale gammas in [0.1, 0.5]; tokens and position table std 0.5.
    Chosen so activations stay O(1) through the depth and attention is not uniform.
    """
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    for name in sorted(params):
        p = params[name]
        cpu = torch.empty(p.shape, dtype=torch.float32)
        leaf = name.rsplit(".", 1)[-1]
        if p.dim() >= 2 and leaf == "weight":
            bound = math.sqrt(3.0 / (p[0].numel()))
            cpu.uniform_(-bound, bound, generator=gen)
        elif leaf == "gamma":
            cpu.uniform_(0.1, 0.5, generator=gen)
        elif leaf == "weight":  # LayerNorm
            cpu.uniform_(0.9, 1.1, generator=gen)
        elif leaf == "bias":
            cpu.uniform_(-0.035, 0.035, generator=gen)
        else:  # camera/register/cls tokens, position table, mask token
            cpu.uniform_(-0.87, 0.87, generator=gen)
        p.copy_(cpu)  # cast (and moved) here: the same rounding as casting a float32 model afterwards
    return model
