"""A torch.compile cache that the GPU jobs of one host share, so a node pays the cold compile once.

`activate(setting)` points Inductor's on-disk caches (FX graphs + AOTAutograd results under
TORCHINDUCTOR_CACHE_DIR, Triton kernels under TRITON_CACHE_DIR) at `<setting>/<host>/` before anything
compiles (config `cache.compile_cache`, default results/compile_cache). Torch writes its cache entries
atomically (temporary file + rename), so jobs can read and write one directory at once.

Sharing alone would still let 8 jobs that start together all compile cold, each on its own cores.
`first_compile(directory, key)` orders them: the first job to reach a compile key holds an flock while it
compiles and then leaves a marker; the others wait on the lock, see the marker and compile warm from the
cache in parallel. A job that dies while compiling releases the lock (the OS drops it) without a
marker, so the next one compiles instead. Keys name what decides the compiled code (torch version,
device, model shape, geometry, dtype, attention kernel, shape policy and shape class), nothing else:
torch's own cache keys still decide what is reused.

`CompileCounters` reads torch's counters (graphs compiled, FX graph and AOTAutograd cache hits and
misses), from which a job records whether its compiles found the cache warm: a flag, not a timing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ENV_INDUCTOR = "TORCHINDUCTOR_CACHE_DIR"
ENV_TRITON = "TRITON_CACHE_DIR"
LOCKS = "vlnflow-locks"
WAIT_LOG_EVERY_S = 60.0


def host_dir(setting: str | os.PathLike | None, host: str | None = None) -> Path | None:
    """The directory this host's jobs share for `cache.compile_cache` (None: torch's default)."""
    if setting is None:
        return None
    return (Path(setting) / (host or socket.gethostname())).absolute()


def activate(setting: str | os.PathLike | None, host: str | None = None) -> Path | None:
    """Point torch's compile caches at this host's directory (call before the first compile); returns it."""
    directory = host_dir(setting, host)
    if directory is None:
        return None
    (directory / "inductor").mkdir(parents=True, exist_ok=True)
    os.environ[ENV_INDUCTOR] = str(directory / "inductor")
    os.environ[ENV_TRITON] = str(directory / "triton")
    return directory


def compile_key(**fields) -> str:
    """A short stable name for what one compile depends on (torch version and device added)."""
    import torch

    device = None
    if torch.cuda.is_available():
        device = [torch.cuda.get_device_name(), list(torch.cuda.get_device_capability())]
    blob = json.dumps({"torch": torch.__version__, "cuda_device": device, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@dataclass
class CompileTurn:
    """How a job got to its compile: `first` True if it compiled first for its host (None: no coordination)."""

    waited_s: float = 0.0
    first: bool | None = None


@contextlib.contextmanager
def first_compile(directory: Path | None, key: str, job: str = ""):
    """Run the body (a compiling first batch) first for `key` on this host, or after the job that is.

    Yields a CompileTurn. The body of the first job runs under an exclusive flock; its success leaves
    `<key>.done`, after which nobody waits for this key again.
    """
    if directory is None:
        yield CompileTurn()
        return
    locks = directory / LOCKS
    locks.mkdir(parents=True, exist_ok=True)
    done = locks / f"{key}.done"
    if done.exists():
        yield CompileTurn(first=False)
        return
    fd = os.open(locks / f"{key}.lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        t0 = last_log = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - last_log >= WAIT_LOG_EVERY_S:
                    last_log = time.monotonic()
                    log.info("%s waiting %.0f s for another job's first compile (%s)", job, last_log - t0, locks / f"{key}.lock")
                time.sleep(0.2)
        waited = time.monotonic() - t0
        if done.exists():
            fcntl.flock(fd, fcntl.LOCK_UN)
            if waited > 1:
                log.info("%s: waited %.1f s for the first compile on this host; compiling from its cache", job, waited)
            yield CompileTurn(waited_s=waited, first=False)
            return
        yield CompileTurn(waited_s=waited, first=True)
        tmp = done.with_name(f"{done.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"job": job, "pid": os.getpid(), "host": socket.gethostname(), "at": time.time()}) + "\n")
        os.replace(tmp, done)
    finally:
        os.close(fd)  # releases the lock


class CompileCounters:
    """Snapshots of torch's compile counters; `since(before)` gives what happened in between."""

    FIELDS = {
        "graphs": ("stats", "unique_graphs"),
        "fxgraph_cache_hit": ("inductor", "fxgraph_cache_hit"),
        "fxgraph_cache_miss": ("inductor", "fxgraph_cache_miss"),
        "autograd_cache_hit": ("aot_autograd", "autograd_cache_hit"),
        "autograd_cache_miss": ("aot_autograd", "autograd_cache_miss"),
    }

    @classmethod
    def snapshot(cls) -> dict[str, int]:
        try:
            from torch._dynamo.utils import counters
        except ImportError:  # pragma: no cover - torch without dynamo
            return dict.fromkeys(cls.FIELDS, 0)
        return {name: int(counters[group][key]) for name, (group, key) in cls.FIELDS.items()}

    @staticmethod
    def since(before: dict[str, int], after: dict[str, int] | None = None) -> dict[str, int]:
        after = CompileCounters.snapshot() if after is None else after
        return {k: after[k] - before.get(k, 0) for k in after}


def cache_was_warm(delta: dict[str, int]) -> bool | None:
    """True when this job's compiles were all served by the on-disk cache, False when any compiled cold,
    None when nothing was compiled at all (compile off)."""
    hits = delta.get("fxgraph_cache_hit", 0) + delta.get("autograd_cache_hit", 0)
    misses = delta.get("fxgraph_cache_miss", 0)
    if hits == 0 and misses == 0:
        return None
    return misses == 0
