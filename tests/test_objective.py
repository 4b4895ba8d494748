"""Issue 26: the seed pipeline's objective (tiny Qwen2.5-VL, CPU, float32).

The seed's code is written out here from its source (shaoxiang/NewJanusVLN: data/vln_data.py
`_build_segment_ids` / `_build_loss_weights`, train/train_vln.py `compute_loss`, model/
modeling_qwen2_5_vl.py's head positions), independently of vlnflow's code, and vlnflow's packed
loss is checked against it: weighted text loss + w(step) x the head's cross-entropy, the ramp at
three steps; segment ids against hand-placed markers; head off and weights 1 against the plain
mean, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tiny_frames import write_random_frames
from vlnflow.data.prompts import build_prompt
from vlnflow.errors import DatasetError, UserError
from vlnflow.model.batching import Collator
from vlnflow.model.loading import build_model, load_processors, load_qwen
from vlnflow.model.objective import TERMS
from vlnflow.spatial.geometry import FrameGeometry

GRID, CHANNELS = (4, 4), 12
GEOMETRY = FrameGeometry("pad", 56, (64, 48))
BASE_CFG = {
    "qwen_path": None, "preset": "tiny", "seed": 0, "lam": 0.0, "vision_fast": True, "llm_attention": "varlen",
    "freeze_vision": True, "merger_hidden": 24, "merger_weights": None, "dtype": "bfloat16", "tiny": {},
}
SEED_ACTIONS = {"STOP": 0, "MOVE_FORWARD": 1, "TURN_LEFT": 2, "TURN_RIGHT": 3}  # vln_data.py ACTION_TO_ID
MARKERS = ["SUBINSTRUCTION:", "2D_DESCRIPTION:", "3D_DESCRIPTION:", "ACTION:"]

# (sub-instruction, 2D description, 3D description, action); the last two hold marker-like text
PLAIN = ("walk forward past the table", "a sofa and a lamp", "the table is two meters ahead", "MOVE_FORWARD")
SIGN = ("turn left at the door", "a sign that reads ACTION: STOP", "the door is on the left", "TURN_LEFT")
TRICKY = ("go to the 3D_DESCRIPTION: sign", "a poster saying 2D_DESCRIPTION: here",
          "a label ACTION: MOVE_FORWARD on the wall", "STOP")


def head_cfg(**overrides):
    return {**BASE_CFG, "action_head": {"enabled": True, "loss_weight": 1.0}, **overrides}


def four_lines(parts) -> list[str]:
    """The seed's segment_texts (vln_data.py _get_item): one line per marker."""
    sub, d2, d3, action = parts
    return [f"SUBINSTRUCTION: {sub}", f"2D_DESCRIPTION: {d2}", f"3D_DESCRIPTION: {d3}", f"ACTION: {action}"]


def row(sample_id, frames, parts=None, action=None, answer=None):
    """A samples.parquet row whose answer is the four hand-written lines of `parts` (or `answer` verbatim)."""
    action = action or parts[3]
    text = answer if answer is not None else "\n".join(four_lines(parts))
    return dict(sample_id=sample_id, episode_id=sample_id, frames=frames, instruction="go", action=action,
                prompt=build_prompt("walk to the kitchen", len(frames), "descriptions"), answer=text,
                sub_instruction=None, description_2d=None, description_3d=None, source_format="episodes")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("frames")
    write_random_frames(root, 6)
    rows = [
        row("plain", ["f0.png", "f1.png"], PLAIN),
        row("sign", ["f2.png", "f3.png", "f4.png"], SIGN),
        row("tricky", ["f5.png"], TRICKY),
        row("upstream", ["f1.png", "f2.png"], action="TURN_RIGHT", answer="TURN_RIGHT"),  # the action word: no segments
    ]
    tokenizer, processor = load_processors(BASE_CFG, GEOMETRY)
    collator = Collator(tokenizer, processor, GEOMETRY, dataset_root=root)
    torch.manual_seed(1)
    features = [torch.randn(GRID[0] * GRID[1], CHANNELS) for _ in rows]
    return collator, rows, features


def packed(data, indices, step=0):
    collator, rows, features = data
    batch = collator([rows[i] for i in indices], [features[i] for i in indices])
    batch["optimizer_step"] = step
    return batch


# ---- the seed's code, written out (data/vln_data.py) --------------------------------------------------------


def _find(sequence, pattern):
    for i in range(len(sequence) - len(pattern) + 1):
        if sequence[i : i + len(pattern)] == pattern:
            return i
    return -1


def seed_segment_ids(tokenizer, labels: list[int]) -> list[int]:
    """vln_data.py _build_segment_ids over one sample's labels: each marker searched (with prefixes "", "\\n", " ",
    "\\n\\n") in the label tokens after the previous one; a segment runs to the next marker, the last to the end."""
    label_positions = [p for p, t in enumerate(labels) if t != -100]
    label_tokens = [labels[p] for p in label_positions]
    seg = [0] * len(labels)
    found, search = [], 0
    for marker in MARKERS:
        marker_tokens = tokenizer.encode(marker, add_special_tokens=False)
        best = None
        for prefix in ("", "\n", " ", "\n\n"):
            variant = tokenizer.encode(prefix + marker, add_special_tokens=False)
            rel = _find(label_tokens[search:], variant)
            if rel == -1:
                continue
            start = search + rel + len(variant) - len(marker_tokens)
            if best is None or start < best:
                best = start
        if best is None:
            break
        found.append(best)
        search = best + len(marker_tokens)
    for k, start in enumerate(found):
        end = found[k + 1] if k + 1 < len(found) else len(label_tokens)
        for p in label_positions[start:end]:
            seg[p] = k + 1
    return seg


def seed_loss_weights(tokenizer, input_ids: list[int], labels: list[int], segment_texts, weights) -> list[float]:
    """vln_data.py _build_loss_weights: the target text found in the tokens, each segment's prefix length in tokens
    gives its range; label tokens left at 0 get 1.0."""
    out = [0.0] * len(input_ids)
    target = tokenizer.encode("\n".join(segment_texts), add_special_tokens=False)
    start = _find(input_ids, target)
    assert start >= 0
    prefix, prev = "", 0
    for k, text in enumerate(segment_texts):
        prefix += text + ("\n" if k < len(segment_texts) - 1 else "")
        end = len(tokenizer.encode(prefix, add_special_tokens=False))
        for p in range(start + prev, start + end):
            out[p] = weights[k]
        prev = end
    return [1.0 if (labels[p] != -100 and out[p] == 0) else out[p] for p in range(len(out))]


def seed_head_weight(step, start, end, warmup):
    """train_vln.py compute_loss: distill_start + (end - start) * min(max(step, 0), warmup) / warmup."""
    if end is None or warmup <= 0:
        return start
    return start + (end - start) * (min(max(step, 0), warmup) / float(warmup))


# ---- segments ------------------------------------------------------------------------------------------------


def sample_segments(collator, r):
    encoded = collator.encode(r)
    labels = [t for t in encoded.labels if t != -100]
    return encoded, labels, encoded.segments


@pytest.mark.parametrize("parts", [PLAIN, SIGN, TRICKY], ids=["plain", "sign", "tricky"])
def test_segment_ids_follow_hand_placed_markers(data, parts):
    """Each line of the answer is its own segment (its newline included), whatever marker-like text it holds; the
    closing <|im_end|>\\n is segment 0."""
    collator, _, _ = data
    _, labels, segments = sample_segments(collator, row("s", ["f0.png"], parts))
    assert len(segments) == len(labels)
    text = {k: collator.tokenizer.decode([t for t, s in zip(labels, segments) if s == k]) for k in range(5)}
    lines = four_lines(parts)
    assert [text[k] for k in (1, 2, 3, 4)] == [lines[0] + "\n", lines[1] + "\n", lines[2] + "\n", lines[3]]
    assert text[0] == "<|im_end|>\n"
    assert segments == sorted(segments[:-2]) + [0, 0]  # contiguous, in order, closing tokens last


def test_seed_marker_search_agrees_on_plain_answers_and_misplaces_marker_like_text(data):
    """The seed's own search gives the same ids (its closing tokens in ACTION, ours 0 = weighed 1, logged as ACTION)
    on plain answers; on an answer whose 3D description holds "ACTION:" it starts ACTION inside the description."""
    collator, _, _ = data
    for parts in (PLAIN, SIGN):
        encoded, _, segments = sample_segments(collator, row("s", ["f0.png"], parts))
        seed = [s for s, t in zip(seed_segment_ids(collator.tokenizer, encoded.labels), encoded.labels) if t != -100]
        assert seed == [4 if s == 0 else s for s in segments]
    encoded, labels, segments = sample_segments(collator, row("s", ["f0.png"], TRICKY))
    seed = [s for s, t in zip(seed_segment_ids(collator.tokenizer, encoded.labels), encoded.labels) if t != -100]
    seed_action = collator.tokenizer.decode([t for t, s in zip(labels, seed) if s == 4])
    assert seed_action.startswith(" ACTION: MOVE_FORWARD on the wall")  # the seed's segment 4 starts in the 3D line
    assert collator.tokenizer.decode([t for t, s in zip(labels, segments) if s == 4]) == "ACTION: STOP"


def test_token_weights_equal_the_seeds_loss_weights(data):
    collator, _, _ = data
    model = build_model(head_cfg(segment_weights={"subinstruction": 0.5, "description_2d": 2.0, "description_3d": 1.5,
                                                  "action": 3.0}), CHANNELS, GRID)
    for parts in (PLAIN, SIGN, TRICKY):
        encoded, _, segments = sample_segments(collator, row("s", ["f0.png"], parts))
        seed = seed_loss_weights(collator.tokenizer, encoded.input_ids, encoded.labels, four_lines(parts), [0.5, 2.0, 1.5, 3.0])
        want = [w for w, t in zip(seed, encoded.labels) if t != -100]
        assert model.objective.token_weights(torch.tensor(segments)).tolist() == want


def test_an_answer_without_the_four_parts_is_one_action_segment(data):
    collator, rows, _ = data
    _, labels, segments = sample_segments(collator, rows[3])
    assert collator.tokenizer.decode([t for t, s in zip(labels, segments) if s == 4]) == "TURN_RIGHT"
    assert set(segments) == {0, 4} and collator.tokenizer.decode([t for t, s in zip(labels, segments) if s == 0]) == "<|im_end|>\n"


# ---- head positions and labels under packing -----------------------------------------------------------------


def test_head_reads_the_token_before_each_samples_first_label_and_the_last_prompt_token(data):
    from vlnflow.infer.generate import prompt_only

    collator, rows, _ = data
    batch = packed(data, [1, 0, 3, 2])
    cu = batch["cu_seqlens"].tolist()
    labels = batch["labels"][0].tolist()
    newline = collator.tokenizer.encode("\n", add_special_tokens=False)
    assistant = collator.tokenizer.encode("assistant", add_special_tokens=False)
    for i, position in enumerate(batch["head_positions"].tolist()):
        sample_labels = labels[cu[i] : cu[i + 1]]
        first = next(p for p, t in enumerate(sample_labels) if t != -100)  # the seed's argmax over label != -100
        assert position == cu[i] + first - 1
        ids = batch["input_ids"][0].tolist()
        assert ids[position - len(assistant) : position + 1] == assistant + newline  # "<|im_start|>assistant\n"
    assert batch["action_labels"].tolist() == [SEED_ACTIONS[rows[i]["action"]] for i in (1, 0, 3, 2)]
    prompts = collator.pack_tokens([prompt_only(collator.encode(rows[i]))[0] for i in (1, 0)])
    ends = prompts["cu_seqlens"][1:] - 1
    assert prompts["head_positions"].tolist() == ends.tolist()  # at inference: the last prompt token
    # the same token as in training: the prompt is the sample up to its first label
    assert [int(prompts["input_ids"][0, p]) for p in ends.tolist()] == [batch["input_ids"][0, p].item() for p in batch["head_positions"][:2]]


def test_an_unreadable_action_is_an_error_naming_the_sample(data):
    collator, rows, _ = data
    bad = {**rows[3], "sample_id": "ep9/00003", "action": "JUMP", "answer": "JUMP"}
    with pytest.raises(DatasetError, match="ep9/00003.*JUMP"):
        collator.encode(bad)


# ---- the loss ------------------------------------------------------------------------------------------------


def seed_loss(stock, model, batch, data, indices, weights, start, end, warmup, step):
    """The seed's compute_loss over the samples of `batch` as one micro-batch, from each sample's stock forward."""
    collator, rows, _ = data
    cu = batch["cu_seqlens"].tolist()
    losses, token_w, hidden_before_answer, actions = [], [], [], []
    for i, index in enumerate(indices):
        start_i, end_i = cu[i], cu[i + 1]
        owner = batch["image_sample_index"] == i
        patches = batch["image_grid_thw"].prod(-1)
        first_patch = int(patches[batch["image_sample_index"] < i].sum())
        out = stock(input_ids=batch["input_ids"][:, start_i:end_i], mm_token_type_ids=batch["mm_token_type_ids"][:, start_i:end_i],
                    pixel_values=batch["pixel_values"][first_patch : first_patch + int(patches[owner].sum())],
                    image_grid_thw=batch["image_grid_thw"][owner], output_hidden_states=True)
        ids = batch["input_ids"][0, start_i:end_i].tolist()
        labels = batch["labels"][0, start_i:end_i]
        l = F.cross_entropy(out.logits[0, :-1].float(), labels[1:], reduction="none", ignore_index=-100)
        active = labels[1:] != -100
        r = rows[index]
        if r["answer"].startswith("SUBINSTRUCTION"):
            parts = (r["answer"].split("\n")[k].split(": ", 1)[1] for k in range(4))
            w = seed_loss_weights(collator.tokenizer, ids, labels.tolist(), four_lines(tuple(parts)), weights)
        else:  # one segment, the action: its text at the action weight, the closing tokens at 1.0
            n_closing = len(collator.tokenizer.encode("<|im_end|>\n", add_special_tokens=False))
            w = [0.0] * len(ids)
            label_pos = [p for p, t in enumerate(labels.tolist()) if t != -100]
            for p in label_pos:
                w[p] = weights[3]
            for p in label_pos[-n_closing:]:
                w[p] = 1.0
        losses.append(l[active])
        token_w.append(torch.tensor(w[1:])[active])
        first = int((labels != -100).to(torch.int64).argmax())
        hidden_before_answer.append(out.hidden_states[-1][0, max(first - 1, 0)])
        actions.append(SEED_ACTIONS[r["action"]])
    l, w = torch.cat(losses), torch.cat(token_w)
    text = (l * w).sum() / w.sum().clamp_min(1.0)
    head = F.cross_entropy(model.action_head(torch.stack(hidden_before_answer)).float(), torch.tensor(actions))
    return text + seed_head_weight(step, start, end, warmup) * head


@pytest.mark.parametrize("step", [0, 4, 30], ids=["before_ramp", "during_ramp", "after_ramp"])
def test_packed_loss_equals_the_seeds_formula(data, step):
    """Several samples packed in one micro-batch: sum(w*l)/max(sum(w),1) over all their label tokens + w(step) x mean
    head CE at the seed's positions, w ramping 2.0 -> 0.5 over 10 steps."""
    weights = [0.5, 2.0, 1.5, 3.0]
    cfg = head_cfg(action_head={"enabled": True, "loss_weight": 2.0, "loss_weight_end": 0.5, "loss_weight_warmup_steps": 10},
                   segment_weights=dict(zip(("subinstruction", "description_2d", "description_3d", "action"), weights)))
    model = build_model(cfg, CHANNELS, GRID).eval()
    stock = load_qwen(BASE_CFG).eval()  # the same seeded weights, transformers' own forward per sample
    indices = [0, 3, 1, 2]
    batch = packed(data, indices, step)
    assert model.objective.head_weight_at(step) == {0: 2.0, 4: 1.4, 30: 0.5}[step]
    with torch.no_grad():
        want = seed_loss(stock, model, batch, data, indices, weights, 2.0, 0.5, 10, step)
        got = model(batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_head_off_and_weights_one_give_todays_loss_and_gradients_exactly(data):
    """No behaviour change for existing configs: the plain mean CE over the label tokens, bit for bit."""
    batch = packed(data, [0, 1, 3])
    model = build_model(BASE_CFG, CHANNELS, GRID).train()
    assert model.action_head is None
    positions = batch["label_positions"]
    expected = F.cross_entropy(model.qwen.lm_head(model.hidden_states(batch)[0, positions - 1]).float(), batch["labels"][0, positions])
    expected.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    loss, terms = model(batch, terms=True)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert torch.equal(loss, expected)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    assert torch.equal(model(batch), expected)
    assert float(terms[TERMS.index("loss_text_total")]) == float(expected.detach())


def test_per_segment_terms_follow_the_seeds_logged_losses(data):
    """loss_<segment>: the seed's weighted mean over the micro-batch's tokens of that segment (its segment ids, the
    closing tokens in ACTION); loss = loss_text_total + w x loss_action_head."""
    weights = [0.5, 2.0, 1.5, 3.0]
    cfg = head_cfg(segment_weights=dict(zip(("subinstruction", "description_2d", "description_3d", "action"), weights)))
    model = build_model(cfg, CHANNELS, GRID).eval()
    collator, rows, _ = data
    indices = [0, 1]  # plain answers: the seed's search finds the hand-placed markers
    batch = packed(data, indices)
    with torch.no_grad():
        loss, terms = model(batch, terms=True)
        hidden = model.hidden_states(batch)
    positions = batch["label_positions"]
    with torch.no_grad():
        l = F.cross_entropy(model.qwen.lm_head(hidden[0, positions - 1]).float(), batch["labels"][0, positions], reduction="none")
    seg, w = [], []
    for index in indices:
        encoded = collator.encode(rows[index])
        parts = tuple(rows[index]["answer"].split("\n")[k].split(": ", 1)[1] for k in range(4))
        ids = seed_segment_ids(collator.tokenizer, encoded.labels)
        lw = seed_loss_weights(collator.tokenizer, encoded.input_ids, encoded.labels, four_lines(parts), weights)
        seg += [s for s, t in zip(ids, encoded.labels) if t != -100]
        w += [x for x, t in zip(lw, encoded.labels) if t != -100]
    seg, w = torch.tensor(seg), torch.tensor(w)
    got = dict(zip(TERMS, terms.tolist()))
    for k, name in enumerate(("subinstruction", "2d", "3d", "action"), start=1):
        mask = seg == k
        assert got[f"has_{name}"] == 1.0
        assert got[f"loss_{name}"] == pytest.approx(float((l[mask] * w[mask]).sum() / w[mask].sum().clamp_min(1.0)), rel=1e-5)
    assert got["loss_text_total"] == pytest.approx(float((l * w).sum() / w.sum()), rel=1e-5)
    assert got["loss"] == pytest.approx(got["loss_text_total"] + got["action_head_weight"] * got["loss_action_head"], rel=1e-6)
    assert got["loss"] == pytest.approx(float(loss), rel=1e-6) and got["action_head_weight"] == 1.0


# ---- the head as a trained part --------------------------------------------------------------------------------


def test_head_trains_at_the_llm_rate_with_hfs_weight_decay_groups(data):
    from vlnflow.train.memory_plan import ModelShape
    from vlnflow.train.setup import param_groups

    model = build_model(head_cfg(), CHANNELS, GRID).train()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: {names[id(p)] for p in g["params"]} for g in param_groups(model, {"llm": 1e-5, "merger": 1e-4, "vision": 0.0}, 0.01)}
    head = {n for n in names.values() if n.startswith("action_head.")}
    assert head == {f"action_head.{i}.{k}" for i in (0, 1, 3) for k in ("weight", "bias")}  # the seed's key names
    assert groups["llm"] & head == {"action_head.0.weight", "action_head.3.weight"}
    assert groups["llm_no_decay"] & head == {"action_head.0.bias", "action_head.1.weight", "action_head.1.bias", "action_head.3.bias"}
    model(packed(data, [0, 3])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.action_head.parameters())
    plain = build_model(BASE_CFG, CHANNELS, GRID)
    hidden = model.qwen.config.text_config.hidden_size
    assert ModelShape.of(model).trainable_params - ModelShape.of(plain).trainable_params == hidden * 512 + 512 + 2 * 512 + 512 * 4 + 4
    with pytest.raises(UserError, match="train.lr.llm is 0"):
        param_groups(model, {"llm": 0.0, "merger": 1e-4, "vision": 0.0}, 0.0)


def test_head_init_is_the_seeds_and_seeded(data):
    a, b = build_model(head_cfg(), CHANNELS, GRID).action_head, build_model(head_cfg(), CHANNELS, GRID).action_head
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    state = {k: v.detach() for k, v in a.state_dict().items()}
    assert float(state["0.weight"].std()) == pytest.approx(0.02, rel=0.1) and float(state["0.bias"].abs().max()) == 0.0
    assert torch.equal(state["1.weight"], torch.ones(512)) and float(state["3.bias"].abs().max()) == 0.0


# ---- the step's reduction ------------------------------------------------------------------------------------


class OneRank:
    """torch.distributed stand-in for one rank: all_reduce leaves the sums as they are."""

    @staticmethod
    def all_reduce(tensor):
        return tensor


def terms_row(loss_text, head, weight, segments: dict) -> torch.Tensor:
    values = {"loss": loss_text + weight * head, "loss_text_total": loss_text, "loss_action_head": head, "action_head_weight": weight}
    for name in ("subinstruction", "2d", "3d", "action"):
        values[f"loss_{name}"] = segments.get(name, 0.0)
        values[f"has_{name}"] = float(name in segments)
    return torch.tensor([values[k] for k in TERMS])


def test_step_terms_average_micro_batches_and_skip_absent_segments():
    from vlnflow.train.loss_terms import step_terms

    rows = [terms_row(2.0, 1.0, 0.5, {"subinstruction": 3.0, "action": 1.0}),
            terms_row(4.0, 3.0, 0.5, {"action": 2.0}),
            terms_row(3.0, 2.0, 0.5, {"subinstruction": 5.0, "action": 0.0})]
    out = step_terms(rows, OneRank, torch.device("cpu"), has_head=True)
    assert out == {"loss_text_total": 3.0, "loss_action_head": 2.0, "action_head_weight": 0.5,
                   "loss_subinstruction": 4.0, "loss_action": 1.0}  # 2d / 3d: no micro-batch had them
    mean_loss = float(torch.stack(rows)[:, TERMS.index("loss")].mean())
    assert mean_loss == out["loss_text_total"] + out["action_head_weight"] * out["loss_action_head"]
    assert step_terms(rows, OneRank, torch.device("cpu"), has_head=False).keys() == {"loss_text_total", "loss_subinstruction", "loss_action"}
