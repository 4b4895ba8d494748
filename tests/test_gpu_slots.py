"""GPU slots (issue 11): on a node without a scheduler each GPU job claims one visible GPU of its own.

Claimants are real processes (the lock is an OS flock), the GPUs are faked with VLNFLOW_FAKE_GPUS.
Also: the Slurm profile's sbatch line asks for each job's GPUs once (gres), never gres and --gpus.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from vlnflow.errors import UserError
from vlnflow.workflow import gpu_slots
from vlnflow.workflow.gpu_slots import claim_for_device, claim_gpu, max_concurrent, read_claims, visible_gpus

REPO = Path(__file__).resolve().parents[1]

# A claimant: claims a slot, prints it, then holds it until stdin closes (or it is killed).
CLAIMANT = """
import logging, os, sys
from vlnflow.workflow.gpu_slots import claim_gpu
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
claim = claim_gpu(sys.argv[1], job=sys.argv[2], poll_s=0.05, log_every_s=0.5)
print(claim.slot, os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
sys.stdin.read()
"""


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", gpu_slots.MODE_ENV)}
    return {**env, "PYTHONPATH": str(REPO / "src"), **extra}


def _start(slot_dir: Path, job: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CLAIMANT, str(slot_dir), job], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_until(predicate, what: str, limit_s: float = 60.0):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _claims(slot_dir: Path, event: str = "claim") -> list[dict]:
    return [r for r in read_claims(slot_dir) if r["event"] == event]


def test_visible_gpus_without_cuda():
    assert visible_gpus({"VLNFLOW_FAKE_GPUS": "3"}) == ["0", "1", "2"]
    # the caller's list wins, entries as written (indices, UUIDs); an empty value hides every GPU
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "3, GPU-ab12", "VLNFLOW_FAKE_GPUS": "8"}) == ["3", "GPU-ab12"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({}, counters=(lambda: None, lambda: 2)) == ["0", "1"]  # NVML absent, nvidia-smi -L: 2
    assert visible_gpus({}, counters=(lambda: None,)) == []
    with pytest.raises(UserError, match="VLNFLOW_FAKE_GPUS"):
        visible_gpus({"VLNFLOW_FAKE_GPUS": "two"})


def test_2n_claimants_get_n_distinct_slots_and_the_rest_wait(tmp_path):
    n = 2
    slots = tmp_path / "slots"
    procs = [_start(slots, f"job{i}", _env(VLNFLOW_FAKE_GPUS=str(n))) for i in range(2 * n)]
    try:
        first = _wait_until(lambda: (c := _claims(slots)) and len(c) >= n and c, f"{n} claims")
        waiting = [p for p in procs if p.pid not in {c["pid"] for c in first}]
        assert len(waiting) == n
        # each waiter says why it waits (its log), and none of them got a slot meanwhile
        for p in waiting:
            line = p.stderr.readline()
            assert "waiting for a free GPU: all 2 slots" in line, line
        assert len(_claims(slots)) == n
        holders = {c["pid"]: c for c in first}
        assert sorted(c["slot"] for c in first) == [0, 1] and sorted(c["device"] for c in first) == ["0", "1"]
        # a holder exits: exactly one waiter takes its slot, pinned to that GPU
        leaver = next(p for p in procs if p.pid in holders)
        leaver.communicate("")
        after = _wait_until(lambda: (c := _claims(slots)) and len(c) > n and c, "a waiter's claim")
        assert after[n]["slot"] == holders[leaver.pid]["slot"] and after[n]["pid"] in {p.pid for p in waiting}
        for p in procs:  # release the rest one by one; every claimant gets a slot in the end
            if p.returncode is None and p.pid in {c["pid"] for c in _claims(slots)}:
                p.communicate("")
        _wait_until(lambda: len(_claims(slots)) == 2 * n, "every claimant served")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    records = read_claims(slots)
    assert max_concurrent(records) == n, "never more claimants at once than GPUs"
    assert len({r["pid"] for r in records if r["event"] == "claim"}) == 2 * n


def test_sigkilled_holder_frees_its_slot(tmp_path):
    slots = tmp_path / "slots"
    env = _env(VLNFLOW_FAKE_GPUS="1")
    holder = _start(slots, "holder", env)
    waiter = None
    try:
        assert holder.stdout.readline().split() == ["0", "0"]
        waiter = _start(slots, "waiter", env)
        line = waiter.stderr.readline()
        assert "waiting for a free GPU" in line and "GPU 0: holder (pid" in line, line
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert waiter.stdout.readline().split() == ["0", "0"], "the killed job's slot must be free"
    finally:
        for p in (holder, waiter):
            if p is not None:
                if p.poll() is None:
                    p.kill()
                p.wait()
    assert [c["job"] for c in _claims(slots)] == ["holder", "waiter"]
    assert _claims(slots, "release") == [], "both ended by SIGKILL: only the OS released their locks"


def test_callers_cuda_visible_devices_is_used_as_is(tmp_path):
    # a user restricting the GPUs: slots are their entries, and the job pins one of them
    env = {"CUDA_VISIBLE_DEVICES": "GPU-5f3a,7", "VLNFLOW_FAKE_GPUS": "8"}
    claim = claim_gpu(tmp_path, job="user", env=env, poll_s=0.01)
    second = claim_gpu(tmp_path, job="user2", env={**env, "CUDA_VISIBLE_DEVICES": "GPU-5f3a,7"}, poll_s=0.01)
    try:
        assert (claim.device, claim.slot, claim.slots) == ("GPU-5f3a", 0, 2) and env["CUDA_VISIBLE_DEVICES"] == "GPU-5f3a"
        assert second.device == "7"
        assert "CUDA_VISIBLE_DEVICES=GPU-5f3a" in claim.describe()
    finally:
        claim.release()
        second.release()
    # a Slurm job: the scheduler pinned it; nothing is claimed, nothing is changed
    slurm = {"SLURM_JOB_ID": "42", "CUDA_VISIBLE_DEVICES": "3"}
    got = claim_gpu(tmp_path / "slurm", job="s", env=slurm)
    assert (got.how, got.device, slurm["CUDA_VISIBLE_DEVICES"]) == ("scheduler", "3", "3")
    assert not (tmp_path / "slurm").exists()
    # VLNFLOW_GPU_SLOTS=claim claims inside Slurm too (snakemake -j 8 in an salloc shell)
    forced = claim_gpu(tmp_path / "forced", job="f", env={**slurm, "VLNFLOW_GPU_SLOTS": "claim"})
    assert (forced.how, forced.device) == ("claimed", "3")
    forced.release()
    with pytest.raises(UserError, match="VLNFLOW_GPU_SLOTS"):
        claim_gpu(tmp_path, env={"VLNFLOW_GPU_SLOTS": "sometimes"})


def test_cpu_jobs_and_gpu_less_machines_claim_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("VLNFLOW_FAKE_GPUS", "2")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert claim_for_device("cpu", tmp_path / "a", job="x").how == "cpu"
    assert not (tmp_path / "a").exists() and "CUDA_VISIBLE_DEVICES" not in os.environ
    assert claim_gpu(tmp_path / "b", env={"CUDA_VISIBLE_DEVICES": ""}).how == "none-visible"
    assert claim_gpu(tmp_path / "c", env={"VLNFLOW_GPU_SLOTS": "off", "VLNFLOW_FAKE_GPUS": "2"}).how == "off"
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------- Slurm profile
def _profile_resources(rule: str, rule_resources: dict) -> dict:
    """The job's resources under slurm_h800: the profile's set-resources replace the rule's own."""
    profile = yaml.safe_load((REPO / "slurm_h800/config.yaml").read_text())
    return {**profile["default-resources"], **rule_resources, **profile["set-resources"][rule]}


class _Resources(dict):
    __getattr__ = dict.__getitem__


@pytest.mark.parametrize("rule, rule_resources, gres", [
    ("precompute_shard", {"gpu": 1}, "--gres=gpu:1"),
    ("spot_check_cache", {"gpu": 1}, "--gres=gpu:1"),
    ("train", {"gpu": 16, "nodes": 2, "tasks": 2, "mpi": "srun"}, "--gres=gpu:8"),
])
def test_slurm_profile_asks_for_each_jobs_gpus_once(rule, rule_resources, gres):
    from types import SimpleNamespace

    from snakemake_executor_plugin_slurm.partitions import parse_gpu_requirements
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    job = SimpleNamespace(resources=_Resources(_profile_resources(rule, rule_resources)), name=rule)
    assert set_gres_string(job).split() == [gres], "gres per node, and no --gpus=<job total> beside it"
    parse_gpu_requirements(job)  # raises when 'gpu' and 'gres' both ask (the plugin's partition selection)


def test_a_multi_gpu_job_claims_all_it_needs_or_waits(tmp_path):
    env = {"VLNFLOW_FAKE_GPUS": "3"}
    single = claim_gpu(tmp_path, job="one", env=dict(env))
    try:
        whole = claim_gpu(tmp_path, job="train", count=2, env=dict(env))
        assert (whole.device, whole.slot) == ("1,2", 1) and "GPU slots 1,2 of 3 claimed: CUDA_VISIBLE_DEVICES=1,2" in whole.describe()
        whole.release()
        with pytest.raises(UserError, match="train needs 4 GPUs but 3 are visible"):
            claim_gpu(tmp_path, job="train", count=4, env=dict(env))
    finally:
        single.release()
    records = read_claims(tmp_path)
    assert [(r["event"], r["slot"]) for r in records] == [("claim", 0), ("claim", 1), ("claim", 2), ("release", 1),
                                                          ("release", 2), ("release", 0)]  # fmt: skip
    assert max_concurrent(records) == 3


def test_a_multi_gpu_job_waits_while_too_few_are_free(tmp_path):
    slots = tmp_path / "slots"
    holder = _start(slots, "holder", _env(VLNFLOW_FAKE_GPUS="2"))
    script = ("import logging, sys\nfrom vlnflow.workflow.gpu_slots import claim_gpu\n"
              "logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
              f"c = claim_gpu({str(slots)!r}, job='train', count=2, poll_s=0.05)\nprint(c.device, flush=True)\n")  # fmt: skip
    train = None
    try:
        assert holder.stdout.readline().split() == ["0", "0"]
        train = subprocess.Popen([sys.executable, "-c", script], env=_env(VLNFLOW_FAKE_GPUS="2"), text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        line = train.stderr.readline()
        assert "train waiting for 2 free GPUs: 1 of 2 slots" in line and "GPU 0: holder" in line, line
        holder.communicate("")
        assert train.stdout.readline().strip() == "0,1"
    finally:
        for p in (holder, train):
            if p is not None:
                if p.poll() is None:
                    p.kill()
                p.wait()
