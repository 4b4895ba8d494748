"""Building an aggregator without paying for an init that is overwritten anyway.

`build_aggregator` constructs on the meta device and materialises uninitialised
CPU storage; the caller then either loads weights or calls `init_random_`, a
seeded init drawn on the CPU so the same (preset, seed) gives bit-identical
weights in every process and on every machine (the demo, tests and benchmarks
run on it; its values are not meaningful features).
"""

from __future__ import annotations

import math

import torch

from vlnflow.spatial.aggregator import IMAGENET_MEAN, IMAGENET_STD, Aggregator, AggregatorConfig


def build_aggregator(config: AggregatorConfig) -> Aggregator:
    """An Aggregator with uninitialised float32 CPU parameters and filled buffers."""
    with torch.device("meta"):
        model = Aggregator(config)
    model = model.to_empty(device="cpu")
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
        p.copy_(cpu)
    return model
