"""Issue 21: the host-shared torch.compile cache (vlnflow.spatial.compile_cache). Fast tests of its coordination
here; tests/test_workflow_compile_cache.py runs two real compiling precompute jobs through Snakemake."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vlnflow.spatial import compile_cache as cc

TAKE_TURN = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from vlnflow.spatial.compile_cache import first_compile
    directory, key, hold, fail, out = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4] == "fail", sys.argv[5]
    try:
        with first_compile(directory, key, job=out) as turn:
            Path(out + ".entered").write_text(str(time.time()))
            time.sleep(hold if turn.first else 0)
            if fail and turn.first:
                raise RuntimeError("compile failed")
    except RuntimeError:
        pass
    Path(out).write_text(json.dumps({"first": turn.first, "waited_s": turn.waited_s}))
""")


def _take_turns(tmp_path: Path, key: str, holds: list[tuple[float, str]]) -> list[dict]:
    """Start one process per (hold seconds, 'ok' | 'fail') at once; each reports its CompileTurn."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(cc.__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    procs, outs = [], []
    for i, (hold, mode) in enumerate(holds):
        out = tmp_path / f"turn{i}.json"
        outs.append(out)
        procs.append(subprocess.Popen([sys.executable, "-c", TAKE_TURN, str(tmp_path / "cache"), key, str(hold), mode, str(out)], env=env))
    for p in procs:
        assert p.wait(timeout=60) == 0
    return [json.loads(o.read_text()) for o in outs]


def test_jobs_starting_together_compile_once_and_the_others_wait_then_load(tmp_path):
    turns = _take_turns(tmp_path, "k1", [(2.0, "ok"), (2.0, "ok"), (2.0, "ok")])
    first = [t for t in turns if t["first"]]
    assert len(first) == 1, turns
    assert all(t["waited_s"] > 1.0 for t in turns if not t["first"]), "the others waited for the first compile"
    assert (tmp_path / "cache" / cc.LOCKS / "k1.done").exists()
    # once done, a later job neither waits nor compiles first
    again = _take_turns(tmp_path, "k1", [(0.0, "ok")])
    assert again == [{"first": False, "waited_s": 0.0}]


def test_a_failed_first_compile_leaves_no_marker_and_the_next_job_compiles(tmp_path):
    turns = _take_turns(tmp_path, "k2", [(0.5, "fail")])
    assert turns[0]["first"] is True and not (tmp_path / "cache" / cc.LOCKS / "k2.done").exists()
    assert _take_turns(tmp_path, "k2", [(0.0, "ok")])[0]["first"] is True


def test_activate_points_torch_at_a_per_host_directory(tmp_path, monkeypatch):
    monkeypatch.delenv(cc.ENV_INDUCTOR, raising=False)
    monkeypatch.delenv(cc.ENV_TRITON, raising=False)
    assert cc.activate(None) is None and cc.ENV_INDUCTOR not in os.environ
    directory = cc.activate(tmp_path / "compile_cache", host="node7")
    assert directory == (tmp_path / "compile_cache" / "node7").absolute()
    assert os.environ[cc.ENV_INDUCTOR] == str(directory / "inductor") and os.environ[cc.ENV_TRITON] == str(directory / "triton")
    assert (directory / "inductor").is_dir()


@pytest.mark.parametrize("delta, warm", [
    ({"fxgraph_cache_hit": 5, "fxgraph_cache_miss": 0}, True),
    ({"fxgraph_cache_hit": 4, "fxgraph_cache_miss": 1}, False),
    ({"fxgraph_cache_hit": 0, "fxgraph_cache_miss": 5}, False),
    ({"autograd_cache_hit": 3}, True),
    ({}, None),
])
def test_warm_flag_comes_from_torchs_cache_counters(delta, warm):
    assert cc.cache_was_warm(delta) is warm
