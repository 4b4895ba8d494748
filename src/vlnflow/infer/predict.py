"""`vlnflow predict --model OUT --samples samples.parquet`: the exported model's answers next to the labels.

The model is rebuilt by the training code from the export (`model.init_from`), the
spatial features come from a feature cache (`--cache manifest.json`, refused when its
encoder fingerprint differs from the export's) or are computed live by the export's
VGGT settings (weights: the export's `vggt.aggregator.*` when it has them, else
`spatial.weights` / the seeded init it records), and each sample's prompt is built by
the training Collator. The answer is decoded greedily; its ACTION (the bare action, or
the ACTION line of a structured answer) is compared with the label's.

`--head action` (the default for a model trained with the seed's action head) also reads the
action from the head, as the seed pipeline's evaluation does: one forward pass over the prompt,
argmax at its last token, no decoding. Both actions are printed, each with its accuracy and
latency (the model's seconds per sample; preparing the sample is timed apart).

`--held-out` answers only the episodes the run held out (its `dataset.val_fraction`, recorded in the
export; vlnflow.data.split), which training never saw. Next to the accuracy stands the majority
baseline on the same samples: always answering their most common action. A model that learnt nothing
from the frames scores about that; `make demo` prints both.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from vlnflow.data.prompts import parse_answer
from vlnflow.data.split import split_by_episode
from vlnflow.data.vocabulary import ACTIONS, canonical_action
from vlnflow.errors import UserError

HEADS = ("action", "text")


@dataclass
class Prediction:
    sample_id: str
    answer: str
    label: str
    action: str | None
    label_action: str | None
    correct: bool
    spatial: str  # cached | live
    seconds: float  # the whole sample: preparation, head (if read) and decoding
    text_seconds: float = 0.0  # greedy decoding (prompt forward included)
    prepare_seconds: float = 0.0  # frames, tokens, spatial features
    head_action: str | None = None  # --head action: the action head's argmax
    head_correct: bool | None = None  # head_action == the sample's action
    head_seconds: float | None = None  # the head's one forward pass


def answer_action(text: str) -> str | None:
    """The canonical action of an answer (bare or structured), None when it names none."""
    raw = parse_answer(text)[0]
    try:
        return canonical_action(raw)
    except ValueError:
        return None


class Predictor:
    """A model ready to answer samples: the model, its tokenizer, the training Collator and a spatial source.

    `Predictor.from_export(dir)` builds one from a `vlnflow export`; the constructor takes the
    parts, so a model still in memory (the training engine's module) answers the same way.
    """

    def __init__(self, model, tokenizer, collator, source, max_new_tokens: int = 128, head: str = "text",
                 settings: dict | None = None):
        if head not in HEADS:
            raise UserError(f"--head must be one of {HEADS}, got {head!r}")
        if head == "action" and getattr(model, "action_head", None) is None:
            raise UserError("--head action: this model has no action head (it was trained with model.action_head.enabled "
                            "false); use --head text")
        self.head = head
        self.settings = settings or {}  # the export's `vlnflow` section (from_export)
        self.model = model
        self.tokenizer = tokenizer
        self.collator = collator
        self.source = source
        self.root = collator.root
        self.max_new_tokens = max_new_tokens
        self.device = next(model.parameters()).device
        self.stop_ids = {tokenizer.convert_tokens_to_ids("<|im_end|>")}
        if tokenizer.eos_token_id is not None:
            self.stop_ids.add(tokenizer.eos_token_id)

    @classmethod
    def from_export(cls, model_dir: str | Path, *, device: str | None = None, cache: str | Path | None = None,
                    dataset_root: str | Path | None = None, max_new_tokens: int = 128, head: str | None = None) -> Predictor:
        from vlnflow.model.model_dir import open_model_dir, vggt_state
        from vlnflow.model.batching import Collator
        from vlnflow.model.loading import build_model, load_processors
        from vlnflow.spatial.geometry import geometry_of
        from vlnflow.train.spatial_source import SpatialSource

        exported = open_model_dir(model_dir)
        settings = exported.settings
        if not settings:
            raise UserError(f"{model_dir}: not a vlnflow export (config.json has no 'vlnflow' section); "
                            "export it with `vlnflow export`, or start training from it with model.init_from")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        spatial_cfg = dict(settings["spatial"])
        model_cfg = {**settings["model"], "init_from": str(exported.path), "qwen_path": None}
        geometry = geometry_of(spatial_cfg, model_cfg)
        tokenizer, image_processor = load_processors(model_cfg, geometry)
        model = build_model(model_cfg, int(settings["spatial_channels"]), tuple(settings["spatial_grid"]), device=device)
        model.eval()
        root = dataset_root or settings.get("dataset_root")
        if root is None:
            raise UserError("predict needs --dataset-root (the export does not record the data set root)")
        collator = Collator(tokenizer, image_processor, geometry, dataset_root=root)
        source = SpatialSource({"spatial": spatial_cfg}, cache, expected_fingerprint=settings["encoder_fingerprint"],
                               encoder=_encoder_from_export(spatial_cfg, vggt_state(exported)))
        head = head or ("action" if model.action_head is not None else "text")
        return cls(model, tokenizer, collator, source, max_new_tokens, head, settings)

    def predict_rows(self, rows: list[dict]):
        """Yield a Prediction per row; frames, tokens and cached features come from the trainer's TrainSamples."""
        from vlnflow.infer.generate import greedy_decode, prompt_only
        from vlnflow.train.data import TrainSamples

        samples = TrainSamples(pd.DataFrame(rows), self.collator, self.source, self.root)
        for i in range(len(samples)):
            started = time.perf_counter()
            item = samples[i]
            prompt, answer_ids = prompt_only(item.encoded)
            features = item.features if item.features is not None else self.source.encode_live(item.vggt_frames).cpu()
            batch = self.collator.pack([prompt], [features])
            prepared = time.perf_counter()
            head_action = head_correct = head_seconds = None
            if self.head == "action":
                head_action = read_head(self.model, batch)
                head_seconds = time.perf_counter() - prepared
                head_correct = head_action == ACTIONS[item.encoded.action]
            decoding = time.perf_counter()
            tokens = greedy_decode(self.model, batch, self.stop_ids, self.max_new_tokens)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            done = time.perf_counter()
            answer = self.tokenizer.decode(tokens, skip_special_tokens=True)
            label = self.tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
            action, label_action = answer_action(answer), answer_action(label)
            yield Prediction(item.encoded.sample_id, answer, label, action, label_action,
                             action is not None and action == label_action,
                             "live" if item.features is None else "cached", done - started,
                             done - decoding, prepared - started, head_action, head_correct, head_seconds)


@torch.no_grad()
def read_head(model, batch: dict) -> str:
    """The action head's action for the one prompt in `batch` (a Collator.pack of one sample without labels):
    one forward pass, the head at the last prompt token, argmax; as the seed's evaluation (use_action_head)."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return ACTIONS[int(model.action_logits(batch)[0].argmax())]


def _encoder_from_export(spatial_cfg: dict, state: dict | None):
    """The export's own aggregator weights (janusvln layout) as the live encoder; None: build from the settings."""
    if state is None:
        return None
    from vlnflow.spatial import SpatialEncoder
    from vlnflow.spatial.checkpoint import state_digest

    encoder = SpatialEncoder.from_config({**spatial_cfg, "weights": None})
    encoder.model.load_state_dict(state, strict=True)
    encoder.weights_id = "sha256:" + state_digest(state)
    return encoder


def read_samples(path: str | Path, n: int | None, held_out: float | None = None) -> list[dict]:
    """The first `n` (all: None or 0) rows of a samples table; with `held_out` (a dataset.val_fraction), only the
    rows of the episodes that fraction holds out."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--samples {path}: file not found")
    table = pd.read_parquet(path)
    if held_out is not None:
        table = split_by_episode(table, held_out)[1]
    rows = table.to_dict("records")
    if not rows:
        what = f"held-out samples (dataset.val_fraction {held_out})" if held_out is not None else "samples"
        raise UserError(f"--samples {path} holds no {what}")
    return rows[:n] if n else rows


def held_out_fraction(settings: dict, model_dir: str) -> float:
    """The dataset.val_fraction the exported run trained with; an error when it held nothing out."""
    fraction = float(settings.get("val_fraction") or 0.0)
    if fraction <= 0:
        raise UserError(f"--held-out: the run exported to {model_dir} held out no episodes (dataset.val_fraction 0 or "
                        "not recorded): train with dataset.val_fraction > 0, or leave --held-out off")
    return fraction


def summary(predictions: list[Prediction]) -> dict:
    """Accuracy and mean latency of the decoded text's action and, when read, of the head's; the majority baseline
    (always the most common label action of these samples) and each label action's share answered right."""
    n = len(predictions)
    correct = sum(p.correct for p in predictions)
    labels = Counter(p.label_action for p in predictions)
    majority, majority_count = labels.most_common(1)[0]
    per_action = {a: {"n": labels[a], "correct": sum(p.correct for p in predictions if p.label_action == a)}
                  for a in ACTIONS if labels[a]}
    out = {"n": n, "correct": correct, "action_accuracy": correct / n,
           "majority_action": majority, "majority_correct": majority_count, "majority_accuracy": majority_count / n,
           "per_action": per_action,
           "mean_seconds": sum(p.seconds for p in predictions) / n,
           "text_mean_seconds": sum(p.text_seconds for p in predictions) / n}
    if all(p.head_action is not None for p in predictions):
        head_correct = sum(bool(p.head_correct) for p in predictions)
        out.update({"head_correct": head_correct, "head_action_accuracy": head_correct / n,
                    "head_mean_seconds": sum(p.head_seconds for p in predictions) / n})
    return out


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("predict", help="answer samples with an exported model; print answers, labels, action accuracy",
                              description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a `vlnflow export` directory")
    p.add_argument("--samples", default="results/index/samples.parquet")
    p.add_argument("--n", type=int, default=20, help="first N samples (0 = all)")
    p.add_argument("--held-out", action="store_true", help="only the episodes the run held out for validation (its "
                   "dataset.val_fraction, recorded in the export): samples training never saw")
    p.add_argument("--show", type=int, help="print the first SHOW answers (default: all); the summary covers every sample")
    p.add_argument("--cache", help="feature cache manifest.json to read spatial features from (default: compute live)")
    p.add_argument("--dataset-root", help="root the samples' frame paths are relative to (default: the one the run trained on)")
    p.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--head", choices=HEADS, help="action: also read the action from the action head (one forward, no "
                   "decoding), as the seed's evaluation does; text: decode only (default: action when the model has a head)")
    p.add_argument("--json", action="store_true", help="one JSON object (samples + summary) instead of the table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    predictor = Predictor.from_export(args.model, device=args.device, cache=args.cache, dataset_root=args.dataset_root,
                                      max_new_tokens=args.max_new_tokens, head=args.head)
    held_out = held_out_fraction(predictor.settings, args.model) if args.held_out else None
    rows = read_samples(args.samples, args.n, held_out)
    if not args.json and held_out is not None:
        print(f"{len(rows)} samples of {len({r['episode_id'] for r in rows})} held-out episode(s) "
              f"(dataset.val_fraction {held_out:g}); training never saw them")
    predictions = []
    for pred in predictor.predict_rows(rows):
        predictions.append(pred)
        if not args.json and (args.show is None or len(predictions) <= args.show):
            mark = "ok " if pred.correct else "-- "
            head = "" if pred.head_action is None else f"  head: {pred.head_action} ({'ok' if pred.head_correct else '--'})"
            print(f"{mark}{pred.sample_id}  predicted: {_one_line(pred.answer)!r}  label: {_one_line(pred.label)!r}{head}")
    result = summary(predictions)
    if args.json:
        json.dump({"samples": [asdict(p) for p in predictions], **result}, sys.stdout, indent=2)
        print()
    else:
        if args.show is not None and len(predictions) > args.show:
            print(f"... {len(predictions) - args.show} more")
        print(f"action accuracy: {result['correct']}/{result['n']} = {100 * result['action_accuracy']:.1f}% "
              f"({result['mean_seconds']:.3f} s per sample)")
        print(f"majority baseline (always {result['majority_action']}): {result['majority_correct']}/{result['n']} = "
              f"{100 * result['majority_accuracy']:.1f}% on the same samples")
        print("by label: " + ", ".join(f"{a} {c['correct']}/{c['n']}" for a, c in result["per_action"].items()))
        print(f"text:  {result['correct']}/{result['n']} = {100 * result['action_accuracy']:.1f}%, "
              f"{result['text_mean_seconds']:.4f} s per sample (greedy decoding, up to {args.max_new_tokens} tokens)")
        if "head_action_accuracy" in result:
            print(f"head:  {result['head_correct']}/{result['n']} = {100 * result['head_action_accuracy']:.1f}%, "
                  f"{result['head_mean_seconds']:.4f} s per sample (one forward pass)")
    return 0


def _one_line(text: str, limit: int = 80) -> str:
    text = text.replace("\n", " | ")
    return text if len(text) <= limit else text[: limit - 3] + "..."
