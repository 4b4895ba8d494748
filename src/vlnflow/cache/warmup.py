"""Warm-up and recompiles of a precompute job's batch loop.

Warm-up is defined per shape class (vlnflow.spatial.shapes.ShapePolicy.shape_key): the first batch of each
class. A warm-up batch is bracketed by device synchronisations so its time (compile included) is known
exactly and kept out of the steady-state rate; on a host's shared compile cache the first job to reach a
class compiles it while the others wait, then load it warm (vlnflow.spatial.compile_cache.first_compile).
Any graph compiled during a later batch is a recompile after warm-up: counted, kept (batch, shape) in the
stats and logged as a warning naming the shape, because a shard that keeps recompiling runs far below the
encoder's rate (and past Dynamo's recompile limit it would silently run eagerly).
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch

from vlnflow.spatial.compile_cache import CompileCounters, CompileTurn, compile_key, first_compile

log = logging.getLogger(__name__)
KEPT_RECOMPILES = 20  # recompile records kept in the stats (all are counted)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class WarmupTracker:
    """Classify each batch as warm-up or steady state and count the graphs compiled in each."""

    def __init__(self, encoder, compile_dir=None, job: str = ""):
        self.encoder, self.compile_dir, self.job = encoder, compile_dir, job
        self.device = encoder.device
        self.compiling = bool(getattr(encoder, "compile_blocks", False))
        self.seen: set = set()
        self.warmup_s = self.lock_wait_s = 0.0
        self.warmup_batches = self.warmup_samples = 0
        self.first_batch_s: float | None = None
        self.first_turn = CompileTurn()
        self.recompiles: list[dict] = []
        self.n_recompiles = 0
        self.graphs_after_warmup = 0

    def _compile_key(self, shape_key) -> str:
        enc = self.encoder
        return compile_key(
            architecture=enc.model.config.as_dict(), input_hw=list(enc.geometry.vggt_hw), dtype=str(enc.compute_dtype),
            attention=enc.attention_kernel, global_backend=enc.model.global_backend, policy=vars(enc.shapes),
            shape=list(shape_key),
        )  # fmt: skip

    @contextlib.contextmanager
    def batch(self, number: int, shape_key, rows: int, shape_text: str):
        """Wrap one batch's encoder call; yields True for a warm-up batch."""
        before = CompileCounters.snapshot()["graphs"]
        warm_up = shape_key not in self.seen
        if warm_up:
            synchronize(self.device)  # earlier batches' GPU work is not this batch's time
            t0 = time.perf_counter()
            coordinated = self.compiling and self.compile_dir is not None
            turn_ctx = first_compile(self.compile_dir, self._compile_key(shape_key), self.job) if coordinated else contextlib.nullcontext(CompileTurn())
            with turn_ctx as turn:
                yield True
                synchronize(self.device)  # compiled and ran: the next job may load the cache now
            elapsed = time.perf_counter() - t0
            self.seen.add(shape_key)
            self.warmup_s += elapsed
            self.warmup_batches += 1
            self.warmup_samples += rows
            self.lock_wait_s += turn.waited_s
            if self.first_batch_s is None:
                self.first_batch_s, self.first_turn = elapsed, turn
        else:
            yield False
        new = CompileCounters.snapshot()["graphs"] - before
        if new and not warm_up:
            self.n_recompiles += 1
            self.graphs_after_warmup += new
            if len(self.recompiles) < KEPT_RECOMPILES:
                self.recompiles.append({"batch": number, "shape": shape_text, "new_graphs": new})
            log.warning("%s: recompiled after warm-up at batch %d (%s): %d new graph(s)", self.job, number, shape_text, new)

    def stats(self) -> dict:
        return {
            "warmup_batches": self.warmup_batches,
            "warmup_samples": self.warmup_samples,
            "warmup_s": self.warmup_s,
            "shape_classes": len(self.seen),
            "recompiles_after_warmup": self.n_recompiles,
            "graphs_after_warmup": self.graphs_after_warmup,
            "recompiles": self.recompiles,
        }
