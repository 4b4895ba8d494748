"""Timed repetitions and what may be said about them: every sample kept, median with min-max, ratios
only between cases of the same run, card and batch.

A benchmark figure is a set of repetitions, not one number: `spread(samples)` keeps them all with
their median, min and max, and `ratio(a, b)` divides two such sets with the range the samples allow
(numerator's min over denominator's max, and the reverse). `ratio` refuses cases of different batch
sizes or cards, so a published "x times faster" always compares like with like.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

MIN_REPETITIONS = 10  # below this a ratio is published with its min-max range only


def spread(samples: Sequence[float]) -> dict:
    """{"n", "median", "min", "max", "samples"} of repeated measurements (all kept, in order)."""
    values = [float(v) for v in samples]
    if not values:
        raise ValueError("spread of no samples")
    return {"n": len(values), "median": statistics.median(values), "min": min(values), "max": max(values), "samples": values}


def scaled(s: dict, factor: float) -> dict:
    """The same spread with every value multiplied by `factor` (e.g. seconds per call -> per sample)."""
    return spread([v * factor for v in s["samples"]])


def ratio(a: dict, b: dict, *, what: str = "", batch: tuple | None = None, card: tuple | None = None) -> dict:
    """a / b of two spreads: median over median, and the range min(a)/max(b) .. max(a)/min(b).

    `batch` and `card`: (a's, b's) values; different ones raise ValueError (a ratio compares like
    with like). `few_repetitions` is True when either side has fewer than MIN_REPETITIONS samples:
    publish the range with it, not the median alone.
    """
    for name, pair in (("batch", batch), ("card", card)):
        if pair is not None and pair[0] != pair[1]:
            raise ValueError(f"ratio {what or ''}: {name} differs ({pair[0]} vs {pair[1]}); compare like with like")
    if b["median"] <= 0 or b["min"] <= 0:
        raise ValueError(f"ratio {what}: the denominator has non-positive samples")
    return {
        "what": what,
        "median": a["median"] / b["median"],
        "min": a["min"] / b["max"],
        "max": a["max"] / b["min"],
        "n": [a["n"], b["n"]],
        "few_repetitions": min(a["n"], b["n"]) < MIN_REPETITIONS,
    }


def difference_per_step(a: Sequence[float], b: Sequence[float]) -> dict:
    """Spread of a[i] - b[i] over steps measured together (e.g. wall - forward - backward of the SAME step),
    never a median subtracted from a mean."""
    if len(a) != len(b):
        raise ValueError(f"per-step difference of {len(a)} and {len(b)} samples")
    return spread([x - y for x, y in zip(a, b)])


def timed_calls(fn: Callable[[], object], device=None, *, warmup: int, iters: int) -> list[float]:
    """Seconds per call of `fn`, `iters` times after `warmup` untimed calls.

    On CUDA each call is bracketed by CUDA events (GPU time of the call, then a sync); elsewhere by
    perf_counter (CPU work is synchronous).
    """
    import torch

    cuda = device is not None and torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def matmul_tflops(device, size: int = 8192, iters: int = 20) -> dict | None:
    """The bf16 matmul ceiling of this card in this run: spread of TFLOP/s over `iters` calls (None off CUDA)."""
    import torch

    if device is None or torch.device(device).type != "cuda":
        return None
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    times = timed_calls(lambda: a @ b, device, warmup=5, iters=iters)
    return {"size": size, **spread([2 * size**3 / t / 1e12 for t in times])}
