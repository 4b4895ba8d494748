"""One GPU per job on a node without a scheduler: a lock-file slot per visible GPU.

Why: `snakemake precompute_all -j 8` on one 8-GPU node starts eight GPU jobs that would all
default to GPU 0. Each GPU job instead claims a slot (an flock-ed file under results/gpu_slots/
<host>/) for its whole life and pins itself to that GPU by setting CUDA_VISIBLE_DEVICES before
CUDA initialises. The OS drops the lock when the process dies, SIGKILL included, so a killed job
frees its GPU. A job finding every slot held waits (and says so periodically) instead of doubling up.

Which GPUs count (never initialising CUDA): CUDA_VISIBLE_DEVICES when the caller set it (a user
restricting the GPUs; its entries are kept as written, indices or UUIDs), else VLNFLOW_FAKE_GPUS=N
(tests, machines without NVML: N fake GPUs "0".."N-1"), else NVML's device count, else
`nvidia-smi -L`. Inside a Slurm job that already has CUDA_VISIBLE_DEVICES the scheduler pinned the
job: nothing is claimed. VLNFLOW_GPU_SLOTS=off never claims; =claim claims even inside Slurm
(e.g. `snakemake -j 8` run in an salloc shell).

Every claim and release is appended to results/gpu_slots/<host>/claims.jsonl (time, slot, pid,
job): the record of which jobs held which GPU when (`read_claims`, `max_concurrent`). flock works
on local disks and on Linux NFS (emulated there with POSIX locks).
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

FAKE_ENV = "VLNFLOW_FAKE_GPUS"
MODE_ENV = "VLNFLOW_GPU_SLOTS"  # auto (default) | claim | off
DEFAULT_SLOT_DIR = "results/gpu_slots"
HISTORY = "claims.jsonl"

_alive: list["GpuClaim"] = []  # claims live as long as the process (the open files keep the locks)


@dataclass
class GpuClaim:
    """What a job got: `device` is its CUDA_VISIBLE_DEVICES value (None: no GPU), `how` why."""

    how: str  # claimed | scheduler | cpu | off | none-visible
    device: str | None = None  # comma list when a job claims several GPUs
    slot: int | None = None  # the (first) slot claimed
    slots: int = 0  # slots on this host
    waited_s: float = 0.0
    job: str = ""
    lock_path: Path | None = None
    history: Path | None = None
    _held: list[tuple[int, str, int]] = field(default_factory=list, repr=False)  # (slot, device, fd)

    def describe(self) -> str:
        """The log line naming the job's GPU."""
        if self.how == "claimed":
            which = f"GPU slot {self.slot}" if len(self._held) <= 1 else "GPU slots " + ",".join(str(h[0]) for h in self._held)
            return (f"{which} of {self.slots} claimed: CUDA_VISIBLE_DEVICES={self.device} "
                    f"(waited {self.waited_s:.1f} s; lock {self.lock_path})")
        if self.how == "scheduler":
            return f"GPU pinned by the scheduler: CUDA_VISIBLE_DEVICES={self.device} (no slot claimed)"
        return {"cpu": "CPU job: no GPU slot claimed",
                "off": f"{MODE_ENV}=off: no GPU slot claimed",
                "none-visible": "no GPU visible (CUDA_VISIBLE_DEVICES, NVML, nvidia-smi): no GPU slot claimed"}[self.how]

    def record(self) -> dict:
        """JSON-able summary for a job's stats file."""
        return {"how": self.how, "device": self.device, "slot": self.slot, "slots": self.slots,
                "waited_s": round(self.waited_s, 3), "host": socket.gethostname()}

    def release(self) -> None:
        """Give the slots back (also done by the OS at exit, however the process ends)."""
        for slot, device, fd in self._held:
            _append(self.history, {"event": "release", "slot": slot, "device": device, "job": self.job})
            os.close(fd)
        self._held = []


# -- which GPUs ---------------------------------------------------------------------------------
def _nvml_count() -> int | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no GPU: NVMLError_LibraryNotFound, ...
        return None


def _nvidia_smi_count() -> int | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def visible_gpus(env: MutableMapping[str, str] | None = None, counters: tuple[Callable[[], int | None], ...] | None = None) -> list[str]:
    """CUDA_VISIBLE_DEVICES entries a job may pin, found without initialising CUDA (see module doc)."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        return [v.strip() for v in env["CUDA_VISIBLE_DEVICES"].split(",") if v.strip()]
    if env.get(FAKE_ENV, "").strip():
        try:
            n = int(env[FAKE_ENV])
        except ValueError:
            from vlnflow.errors import UserError

            raise UserError(f"{FAKE_ENV} must be a number of fake GPUs, got {env[FAKE_ENV]!r}") from None
        return [str(i) for i in range(n)]
    for count in counters or (_nvml_count, _nvidia_smi_count):
        n = count()
        if n is not None:
            return [str(i) for i in range(n)]
    return []


# -- claiming -----------------------------------------------------------------------------------
def _append(history: Path | None, entry: dict) -> None:
    if history is None:
        return
    line = json.dumps({"t": time.time(), "pid": os.getpid(), **entry}) + "\n"
    fd = os.open(history, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())  # one short O_APPEND write: lines of concurrent jobs never interleave
    finally:
        os.close(fd)


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "?"
    return f"{info.get('job') or '?'} (pid {info.get('pid', '?')})"


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


def _cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def claim_gpu(
    slot_dir: str | Path = DEFAULT_SLOT_DIR,
    *,
    job: str = "",
    count: int = 1,
    env: MutableMapping[str, str] | None = None,
    poll_s: float = 2.0,
    log_every_s: float = 60.0,
) -> GpuClaim:
    """Claim `count` visible GPUs (all or none) for this process's life and pin CUDA_VISIBLE_DEVICES to them."""
    env = os.environ if env is None else env
    mode = env.get(MODE_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "claim", "off"):
        from vlnflow.errors import UserError

        raise UserError(f"{MODE_ENV} must be auto, claim or off, got {env[MODE_ENV]!r}")
    if mode == "off":
        return GpuClaim("off", device=env.get("CUDA_VISIBLE_DEVICES"), job=job)
    if mode == "auto" and env.get("SLURM_JOB_ID") and "CUDA_VISIBLE_DEVICES" in env:
        return GpuClaim("scheduler", device=env["CUDA_VISIBLE_DEVICES"], job=job)
    gpus = visible_gpus(env)
    if not gpus:
        return GpuClaim("none-visible", job=job)
    if count > len(gpus):
        from vlnflow.errors import UserError

        raise UserError(f"{job or 'job'} needs {count} GPUs but {len(gpus)} are visible ({','.join(gpus)}); "
                        "check cluster.gpus_per_node and CUDA_VISIBLE_DEVICES")  # fmt: skip
    if _cuda_initialised():
        raise RuntimeError("claim_gpu must run before CUDA initialises: CUDA_VISIBLE_DEVICES set later has no effect")
    host_dir = Path(slot_dir) / _safe(socket.gethostname())
    host_dir.mkdir(parents=True, exist_ok=True)
    locks = [host_dir / f"gpu_{_safe(g)}.lock" for g in gpus]
    history = host_dir / HISTORY
    started = time.monotonic()
    last_log = None
    while True:
        got: list[tuple[int, str, int]] = []
        for slot, (gpu, path) in enumerate(zip(gpus, locks)):
            fd = _try_lock(path)
            if fd is not None:
                got.append((slot, gpu, fd))
                if len(got) == count:
                    break
        if len(got) == count:
            for slot, gpu, fd in got:
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps({"pid": os.getpid(), "job": job, "device": gpu, "since": time.time()}).encode())
                _append(history, {"event": "claim", "slot": slot, "device": gpu, "job": job})
            device = ",".join(g for _, g, _ in got)
            env["CUDA_VISIBLE_DEVICES"] = device
            claim = GpuClaim("claimed", device=device, slot=got[0][0], slots=len(gpus), waited_s=time.monotonic() - started,
                             job=job, lock_path=locks[got[0][0]], history=history, _held=got)  # fmt: skip
            _alive.append(claim)
            atexit.register(claim.release)
            return claim
        for _, _, fd in got:  # all or none: a job never starts on fewer GPUs than it asked for
            os.close(fd)
        now = time.monotonic()
        if last_log is None or now - last_log >= log_every_s:
            holders = ", ".join(f"GPU {g}: {_holder(p)}" for g, p in zip(gpus, locks))
            if count == 1:
                state = f"a free GPU: all {len(gpus)} slots under {host_dir} are held"
            else:
                state = f"{count} free GPUs: {len(got)} of {len(gpus)} slots under {host_dir} are free"
            log.warning("%s waiting for %s (%s); a job never shares a GPU, so it starts when one is released "
                        "(waited %.0f s)", job or "job", state, holders, now - started)
            last_log = now
        time.sleep(poll_s)


def claim_for_device(device: str, slot_dir: str | Path = DEFAULT_SLOT_DIR, *, job: str = "", **kwargs) -> GpuClaim:
    """Claim a GPU for a job whose config device is `device` (auto | cpu | cuda): cpu claims nothing.

    Logs the line naming the job's GPU.
    """
    claim = GpuClaim("cpu", job=job) if device == "cpu" else claim_gpu(slot_dir, job=job, **kwargs)
    log.info("%s: %s", job or "job", claim.describe())
    return claim


def read_claims(slot_dir: str | Path = DEFAULT_SLOT_DIR) -> list[dict]:
    """Every host's claim/release records, oldest first, each with its `host`."""
    rows = []
    for history in sorted(Path(slot_dir).glob(f"*/{HISTORY}")):
        for line in history.read_text().splitlines():
            if line.strip():
                rows.append({"host": history.parent.name, **json.loads(line)})
    return sorted(rows, key=lambda r: r["t"])


def max_concurrent(records: list[dict]) -> int:
    """Most claims held at once in `read_claims` records (a claim without release holds to the end)."""
    held, most = set(), 0
    for r in records:
        key = (r["host"], r["pid"], r["slot"])
        if r["event"] == "claim":
            held = {k for k in held if k[0] != r["host"] or k[2] != r["slot"]}  # that slot's lock was free: a killed holder
            held.add(key)
            most = max(most, len(held))
        else:
            held.discard(key)
    return most
