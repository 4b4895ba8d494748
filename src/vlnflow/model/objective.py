"""The training objective: weighted label-token loss plus, optionally, the seed pipeline's parallel action head.

The seed's `compute_loss` (train/train_vln.py) for one micro-batch is

    text   = sum_t(w_t * l_t) / max(sum_t(w_t), 1)       over the label tokens t
    loss   = text + w(step) * CE(action_head(h), action)  (mean over the micro-batch's samples)

with l_t the token's cross-entropy, w_t its segment's weight (vlnflow.model.segments; 1.0 after
the answer text), h the last hidden state just before a sample's first label token, and w(step)
`distill_loss_weight`, ramped linearly to `distill_loss_weight_end` over
`distill_loss_weight_warmup_steps` by the number of finished optimizer steps. vlnflow's packed
micro-batch is the seed's micro-batch: the same formula over all its samples' tokens (at the seed
preset's per-device batch 1 it is the seed's per-sample loss exactly). With every weight 1 and no
head the text loss is the plain mean, computed by the same kernels vlnflow always ran (F.cross_entropy is
log_softmax + nll_loss), so existing configs train bit-identically.

Per-segment losses (the seed's `loss_subinstruction`, `loss_2d`, `loss_3d`, `loss_action`) are the
same weighted mean over one segment's tokens; they and `loss_text_total`, `loss_action_head` are
returned detached as one small tensor per micro-batch (TERMS), reduced over the optimizer step by
vlnflow.train.loss_terms.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlnflow.config import ConfigError
from vlnflow.model.segments import ACTION_SEGMENT, CLOSING, SEGMENTS

HEAD_WIDTH = 512  # the seed's nn.Sequential(Linear(hidden, 512), LayerNorm(512), GELU(), Linear(512, 4))
N_ACTIONS = 4
SEGMENT_WEIGHT_KEYS = ("subinstruction", "description_2d", "description_3d", "action")  # model.segment_weights

# Layout of the detached per-micro-batch terms tensor.
TERMS = ("loss", "loss_text_total", "loss_action_head", "action_head_weight",
         *(f"loss_{s}" for s in SEGMENTS), *(f"has_{s}" for s in SEGMENTS))


class ActionHead(nn.Sequential):
    """The seed's parallel action head: hidden -> 512 -> LayerNorm -> GELU -> 4 action logits.

    Submodules 0, 1, 3 hold the weights, so the state dict is `action_head.0.*`, `.1.*`, `.3.*`
    as in the seed's checkpoints. Initialised as transformers initialises the seed's missing
    head: Linear weights N(0, initializer_range), biases 0, LayerNorm 1 / 0.
    """

    def __init__(self, hidden: int, std: float = 0.02):
        super().__init__(nn.Linear(hidden, HEAD_WIDTH), nn.LayerNorm(HEAD_WIDTH), nn.GELU(), nn.Linear(HEAD_WIDTH, N_ACTIONS))
        for linear in (self[0], self[3]):
            nn.init.normal_(linear.weight, mean=0.0, std=std)
            nn.init.zeros_(linear.bias)


@dataclass(frozen=True)
class Objective:
    """Segment weights and the head's loss weight schedule (`model.segment_weights`, `model.action_head`)."""

    segment_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    head_weight: float = 1.0
    head_weight_end: float | None = None
    head_warmup_steps: int = 0

    @classmethod
    def from_model_config(cls, model_cfg: Mapping[str, Any]) -> Objective:
        weights = {**dict.fromkeys(SEGMENT_WEIGHT_KEYS, 1.0), **(model_cfg.get("segment_weights") or {})}
        head = model_cfg.get("action_head") or {}
        end, steps = head.get("loss_weight_end"), int(head.get("loss_weight_warmup_steps", 0) or 0)
        if head.get("enabled") and end is not None and steps == 0:
            raise ConfigError(
                "config setting 'model.action_head.loss_weight_end' is set but 'loss_weight_warmup_steps' is 0: "
                "the ramp would never run (the seed ignores the end then); set the steps or drop the end"
            )
        return cls(tuple(float(weights[k]) for k in SEGMENT_WEIGHT_KEYS), float(head.get("loss_weight", 1.0)),
                   None if end is None else float(end), steps)

    @property
    def uniform(self) -> bool:
        """Every token weighs 1: the text loss is the plain mean."""
        return all(w == 1.0 for w in self.segment_weights)

    def head_weight_at(self, step: int) -> float:
        """The head loss weight while optimizer step `step` + 1 trains (`step` finished steps, the seed's global_step)."""
        if self.head_weight_end is None or self.head_warmup_steps <= 0:
            return self.head_weight
        t = min(max(step, 0), self.head_warmup_steps) / float(self.head_warmup_steps)
        return self.head_weight + (self.head_weight_end - self.head_weight) * t

    def token_weights(self, segments: torch.Tensor) -> torch.Tensor:
        """[L] float weights of label tokens with these segment ids (CLOSING: 1.0)."""
        weights = torch.ones(segments.shape, device=segments.device)
        for segment, weight in enumerate(self.segment_weights, start=1):  # scalar fills: no host->device copy
            weights = torch.where(segments == segment, weight, weights)
        return weights


def objective_loss(objective: Objective, logits: torch.Tensor, targets: torch.Tensor, segments: torch.Tensor | None,
                   head_logits: torch.Tensor | None = None, actions: torch.Tensor | None = None, step: int = 0,
                   want_terms: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss, detached TERMS tensor or None) of one packed micro-batch.

    logits [L, V] float at the label positions, targets [L], segments [L] (segment ids; None: one segment),
    head_logits [B, 4] and actions [B] when the model has the head.
    """
    if segments is None:
        segments = torch.full_like(targets, ACTION_SEGMENT)
    # F.cross_entropy is exactly log_softmax + nll_loss (ATen composes it so); split, the per-token losses of
    # the metrics are read off the same log-probabilities, without a second [L, vocab] buffer.
    log_probs = F.log_softmax(logits, dim=-1)
    weights = None
    if objective.uniform:
        text = F.nll_loss(log_probs, targets)  # the plain mean: the same kernels as F.cross_entropy(logits, targets)
        token_loss = -log_probs.detach().gather(1, targets[:, None])[:, 0] if want_terms else None
    else:
        weights = objective.token_weights(segments)
        per_token = F.nll_loss(log_probs, targets, reduction="none")
        text = (per_token * weights).sum() / weights.sum().clamp_min(1.0)
        token_loss = per_token.detach()
    loss, head, head_weight = text, None, 0.0
    if head_logits is not None:
        head = F.cross_entropy(head_logits.float(), actions)
        head_weight = objective.head_weight_at(step)
        loss = text + head_weight * head
    if not want_terms:
        return loss, None
    return loss, _terms(loss, text, head, head_weight, token_loss, weights, segments)


@torch.no_grad()
def _terms(loss, text, head, head_weight, token_loss, weights, segments) -> torch.Tensor:
    """TERMS of one micro-batch: per segment the seed's weighted mean, and whether the segment has tokens."""
    device = token_loss.device
    if weights is None:
        weights = torch.ones_like(token_loss)
    logged = torch.where(segments == CLOSING, torch.full_like(segments, ACTION_SEGMENT), segments)  # as the seed logs them
    n = len(SEGMENTS) + 1
    weighted = torch.zeros(n, device=device).index_add_(0, logged, token_loss.float() * weights)
    total = torch.zeros(n, device=device).index_add_(0, logged, weights.float())
    count = torch.zeros(n, device=device).index_add_(0, logged, torch.ones_like(weights, dtype=torch.float))
    per_segment = (weighted / total.clamp_min(1.0))[1:]
    scalars = torch.stack([loss.detach().float(), text.detach().float(),
                           head.detach().float() if head is not None else torch.zeros((), device=device),
                           torch.full((), float(head_weight), device=device)])
    return torch.cat([scalars, per_segment, (count[1:] > 0).float()])
