"""What every results JSON records (vlnflow.provenance) and how its repetitions are summarised
(vlnflow.timing): commit from git or, without .git, from the environment; spreads and ratios."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vlnflow import provenance, timing


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def test_commit_and_dirty_flag_from_git(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    _git(repo, "add", "a.py")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = _git(repo, "rev-parse", "HEAD")
    env = {}
    assert provenance.commit_info(repo, env) == {"commit": head, "dirty": False, "commit_source": "git"}
    (repo / "results.json").write_text("{}")  # untracked output: still clean
    assert provenance.commit_info(repo, env)["dirty"] is False
    (repo / "a.py").write_text("x = 2\n")
    assert provenance.commit_info(repo, env) == {"commit": head, "dirty": True, "commit_source": "git"}
    # whoever copied the tree knows better than a copied (possibly stale) .git
    told = {"VLNFLOW_COMMIT": "f269342", "VLNFLOW_DIRTY": "0"}
    assert provenance.commit_info(repo, told) == {"commit": "f269342", "dirty": False, "commit_source": "env"}


def test_commit_from_the_environment_without_git(tmp_path):
    tree = tmp_path / "copy"  # a working tree copied without .git, as on the lent GPU machine
    tree.mkdir()
    assert provenance.commit_info(tree, {"VLNFLOW_COMMIT": "abc123", "VLNFLOW_DIRTY": "0"}) == {
        "commit": "abc123", "dirty": False, "commit_source": "env"}  # fmt: skip
    assert provenance.commit_info(tree, {"VLNFLOW_COMMIT": "abc123", "VLNFLOW_DIRTY": "true"})["dirty"] is True
    assert provenance.commit_info(tree, {"VLNFLOW_COMMIT": "abc123"})["dirty"] is None  # not told
    assert provenance.commit_info(tree, {}) == {"commit": None, "dirty": None, "commit_source": "unknown"}
    with pytest.raises(ValueError, match="VLNFLOW_DIRTY='maybe'"):
        provenance.commit_info(tree, {"VLNFLOW_COMMIT": "abc123", "VLNFLOW_DIRTY": "maybe"})


def test_provenance_block(monkeypatch):
    monkeypatch.delenv("VLNFLOW_COMMIT", raising=False)
    block = provenance.provenance({"stream": 10, "indexed": 12}, argv=["bench/bench_spatial.py", "--tiny", "--out-json", "a b.json"])
    assert block["command"] == f"{Path(sys.executable).name} bench/bench_spatial.py --tiny --out-json 'a b.json'"
    assert block["repetitions"] == {"stream": 10, "indexed": 12}
    assert block["card"] == "cpu" and block["gpus"] == 0  # no GPU on this machine
    v = block["versions"]
    assert v["python"].count(".") == 2 and v["torch"].startswith("2.") and v["transformers"] and v["deepspeed"]
    assert "flash_attn_4" in v and "cuda" in v and block["date"].endswith("+00:00")
    assert block["commit_source"] == "git" and len(block["commit"]) == 40  # this checkout has git
    out = subprocess.run([sys.executable, "-m", "vlnflow.provenance"], capture_output=True, text=True, check=True).stdout
    assert out.startswith(f"VLNFLOW_COMMIT={block['commit']} VLNFLOW_DIRTY=")


def test_spread_and_ratio_by_hand():
    a = timing.spread([3.0, 1.0, 2.0])
    assert a == {"n": 3, "median": 2.0, "min": 1.0, "max": 3.0, "samples": [3.0, 1.0, 2.0]}
    b = timing.spread([0.5, 1.0, 2.0, 4.0])
    r = timing.ratio(a, b, what="a over b", batch=(4, 4), card=("H200", "H200"))
    assert r["median"] == 2.0 / 1.5 and r["min"] == 1.0 / 4.0 and r["max"] == 3.0 / 0.5
    assert r["n"] == [3, 4] and r["few_repetitions"] is True and r["what"] == "a over b"
    ten = timing.spread([1.0] * 10)
    assert timing.ratio(ten, ten)["few_repetitions"] is False and timing.ratio(ten, ten)["min"] == 1.0
    with pytest.raises(ValueError, match="batch differs"):
        timing.ratio(a, b, what="stock / new", batch=(2, 4))
    with pytest.raises(ValueError, match="card differs"):
        timing.ratio(a, b, card=("NVIDIA H100 80GB HBM3", "NVIDIA H200"))
    with pytest.raises(ValueError):
        timing.spread([])
    assert timing.scaled(a, 0.5)["median"] == 1.0


def test_rest_is_a_per_step_difference():
    # wall, forward, backward of the SAME three steps: rest per step 0.5, 0.25, 1.0
    rest = timing.difference_per_step([3.0, 2.5, 4.0], [2.5, 2.25, 3.0])
    assert rest["samples"] == [0.5, 0.25, 1.0] and rest["median"] == 0.5 and rest["min"] == 0.25
    with pytest.raises(ValueError):
        timing.difference_per_step([1.0], [1.0, 2.0])


def test_timed_calls_on_cpu():
    calls = []
    times = timing.timed_calls(lambda: calls.append(1), "cpu", warmup=2, iters=5)
    assert len(times) == 5 and len(calls) == 7 and all(t >= 0 for t in times)
    assert timing.matmul_tflops("cpu") is None
