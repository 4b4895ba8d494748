"""An optimizer step's loss terms for metrics.jsonl: the per-micro-batch TERMS of vlnflow.model.objective
reduced over the step's micro-batches and all ranks.

Every value is the mean over the step's micro-batches of that micro-batch's value, as the step's `loss`
is, so `loss = loss_text_total + action_head_weight x loss_action_head`. The seed logs its per-segment
losses for one micro-batch (one sample at its per-device batch 1); the step's value here is the mean of
what it would log for each of the step's micro-batches. A segment is averaged over the micro-batches that
have tokens of it (the seed logs 0.0 for the others) and left out of the record when none has.
"""

from __future__ import annotations

import torch

from vlnflow.model.objective import TERMS
from vlnflow.model.segments import SEGMENTS

_SCALARS = ("loss_text_total", "loss_action_head", "action_head_weight")


def step_terms(terms: list[torch.Tensor], dist, device: torch.device, has_head: bool) -> dict[str, float]:
    """{"loss_text_total", ["loss_action_head", "action_head_weight"], "loss_<segment>"...} of one optimizer step.

    `terms`: this rank's TERMS tensors, one per micro-batch; `dist`: torch.distributed (initialised).
    """
    stacked = torch.stack([t.detach().double() for t in terms])  # [micro-batches, len(TERMS)]
    col = {name: stacked[:, i] for i, name in enumerate(TERMS)}
    present = torch.stack([col[f"has_{s}"] for s in SEGMENTS], dim=1)
    losses = torch.stack([col[f"loss_{s}"] for s in SEGMENTS], dim=1)
    sums = torch.cat([
        torch.stack([col[name].sum() for name in _SCALARS]),
        torch.tensor([float(len(terms))], dtype=torch.float64, device=stacked.device),
        (losses * present).sum(0),
        present.sum(0),
    ])
    if device.type == "cuda":
        sums = sums.to(device)
    dist.all_reduce(sums)
    values = sums.tolist()
    micro = values[len(_SCALARS)]
    out = {name: values[i] / micro for i, name in enumerate(_SCALARS) if has_head or name == "loss_text_total"}
    first = len(_SCALARS) + 1
    for k, segment in enumerate(SEGMENTS):
        count = values[first + len(SEGMENTS) + k]
        if count:
            out[f"loss_{segment}"] = values[first + k] / count
    return out
