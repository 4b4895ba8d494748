"""Held-out loss: mean label-token loss and teacher-forced action accuracy on the validation samples.

Every rank evaluates its share (samples rank, rank + world, ...) and the sums are reduced.
Shares are padded to the same number of micro-batches (padding samples weigh zero), so
every rank runs the same forwards: ZeRO-3 gathers weights collectively in each one.

Action accuracy: a sample counts as right when the argmax at every token of its answer's
ACTION (the bare answer, or the text after "ACTION: " in the seed's four-line answer; in
both the action ends the answer) equals the label, the model reading the true prefix. With the
seed's action head, also its accuracy (argmax of the head at the last prompt token).
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F

from vlnflow.data.prompts import parse_answer
from vlnflow.model.chat import IGNORE_INDEX
from vlnflow.train.data import TrainSamples, keep_items

log = logging.getLogger("vlnflow.train")


def action_positions(tokenizer, sample_id: str, labels: list[int]) -> list[int]:
    """Positions (in the sample's own sequence) of the label tokens that spell the answer's action.

    The shortest run of answer tokens just before `<|im_end|>` whose text contains the action;
    its first token may carry a leading space or colon, as the tokenizer merged them.
    """
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    supervised = [p for p, t in enumerate(labels) if t != IGNORE_INDEX]
    ends = [i for i, p in enumerate(supervised) if labels[p] == end_id]
    content = supervised[: ends[-1]] if ends else supervised
    action = parse_answer(tokenizer.decode([labels[p] for p in content]))[0]
    if action:
        for k in range(1, len(content) + 1):
            if action in tokenizer.decode([labels[p] for p in content[-k:]]):
                return content[-k:]
    raise ValueError(f"sample {sample_id!r}: cannot find the answer's action {action!r} among its label tokens")


def rank_share(n: int, world: int, rank: int, per_batch: int) -> list[list[tuple[int, float]]]:
    """This rank's micro-batches of (sample index, weight): indices rank::world, padded with
    weight-0 repeats so that every rank gets ceil(ceil(n / world) / per_batch) batches."""
    mine = list(range(rank, n, world))
    per_rank = math.ceil(n / world)
    filler = mine[0] if mine else 0
    weighted = [(i, 1.0) for i in mine] + [(filler, 0.0)] * (per_rank - len(mine))
    return [weighted[s : s + per_batch] for s in range(0, len(weighted), per_batch)]


def evaluate(run, val: TrainSamples, step: int) -> dict:
    """All ranks call this; returns the metrics record {"kind": "val", "step", "val_loss", ...}."""
    started = time.perf_counter()
    module = run.engine.module
    batches = rank_share(len(val), run.world, run.rank, run.tcfg["per_device_batch"])
    loader = torch.utils.data.DataLoader(
        val,
        batch_sampler=[[i for i, _ in b] for b in batches],
        collate_fn=keep_items,
        num_workers=run.tcfg["loader"]["workers"],
    )
    sums = torch.zeros(6, dtype=torch.float64)  # loss sum, label tokens, correct samples, samples, live, head correct
    module.eval()
    try:
        with torch.no_grad():
            for weights, items in zip(batches, loader):
                sums += _batch_sums(run, module, items, torch.tensor([w for _, w in weights]))
    finally:
        module.train()
    if run.device.type == "cuda":
        sums = sums.to(run.device)
    run.dist.all_reduce(sums)
    loss_sum, tokens, correct, samples, live, head_correct = sums.tolist()
    record = {
        "kind": "val",
        "step": step,
        "val_loss": loss_sum / tokens,
        "val_action_accuracy": correct / samples,
        "val_samples": int(samples),
        "val_tokens": int(tokens),
        "val_live_samples": int(live),
        "val_s": time.perf_counter() - started,
    }
    if getattr(module, "action_head", None) is not None:
        record["val_action_head_accuracy"] = head_correct / samples
    if run.is_rank0:
        log.info("validation at step %d: loss %.4f action accuracy %.4f over %d held-out samples (%.1f s)",
                 step, record["val_loss"], record["val_action_accuracy"], record["val_samples"], record["val_s"])
    return record


def _batch_sums(run, module, items, weights: torch.Tensor) -> torch.Tensor:
    """[weighted loss sum, weighted label tokens, weighted correct, weighted samples, live samples, weighted head
    correct] of one batch."""
    feats, live = [], 0.0
    for item, w in zip(items, weights.tolist()):
        if item.features is None:
            feats.append(run.source.encode_live(item.vggt_frames).cpu())
            live += w
        else:
            feats.append(item.features)
    batch = run.collator.pack([i.encoded for i in items], feats)
    starts = batch["cu_seqlens"].long()
    positions = batch["label_positions"]
    owner = torch.searchsorted(starts, positions, right=True) - 1  # sample of each label position
    batch = {k: v.to(run.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    hidden = module.hidden_states(batch)
    logits = module.qwen.lm_head(hidden[0, batch["label_positions"] - 1]).float().cpu()
    targets = batch["labels"][0, batch["label_positions"]].cpu()
    token_w = weights[owner].double()
    loss = (F.cross_entropy(logits, targets, reduction="none").double() * token_w).sum()
    hit = logits.argmax(-1) == targets
    head_correct = 0.0
    if getattr(module, "action_head", None) is not None:
        head_hit = (module.action_logits(batch, hidden).argmax(-1) == batch["action_labels"]).cpu().double()
        head_correct = float((head_hit * weights.double()).sum())
    index_of = {int(p): j for j, p in enumerate(positions.tolist())}
    correct = 0.0
    tokenizer = run.collator.tokenizer
    for i, (item, w) in enumerate(zip(items, weights.tolist())):
        local = action_positions(tokenizer, item.encoded.sample_id, item.encoded.labels)
        rows = [index_of[int(starts[i]) + p] for p in local]
        correct += w * float(bool(hit[rows].all()))
    return torch.tensor([float(loss), float(token_w.sum()), correct, float(weights.sum()), live, head_correct],
                        dtype=torch.float64)
