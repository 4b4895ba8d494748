"""Snakemake on the demo: index + shard checkpoint rerun only what changed; --lint is clean."""

import json
import shutil

import pytest

from vlnflow.data.demo import write_episode
from vlnflow.data.shards import shard_of

TARGET = "results/shards/shards.json"


@pytest.fixture
def demo_workflow(workflow_copy, demo_data):
    """A workflow copy whose dataset.root is a private copy of the demo episodes."""
    root = workflow_copy.path / "data" / "episodes"
    shutil.copytree(demo_data / "episodes", root)
    workflow_copy.configure({"dataset": {"root": "data/episodes"}, "shards": {"count": 4}})
    workflow_copy.root = root
    return workflow_copy


def shard_mtimes(wf):
    return {p.name: p.stat().st_mtime_ns for p in (wf.path / "results" / "shards").glob("shard_*.parquet")}


def nothing_to_do(wf) -> bool:
    proc = wf.snakemake("-n", TARGET)
    return "Nothing to be done" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_rerun_runs_nothing_and_one_change_rewrites_one_shard(demo_workflow):
    wf = demo_workflow
    wf.snakemake(TARGET, cores=2)
    manifest = json.loads((wf.path / TARGET).read_text())
    assert manifest["n_episodes"] == 14 and len(manifest["shards"]) == 4
    assert (wf.path / "results/logs/index/index.log").read_text().count('"n_skipped": 0') == 1
    assert (wf.path / "results/benchmark/index/index.tsv").exists()
    before = shard_mtimes(wf)
    assert len(before) == 4

    second = wf.snakemake(TARGET)
    assert "Nothing to be done" in second.stdout + second.stderr
    assert nothing_to_do(wf)
    assert shard_mtimes(wf) == before

    # edit one episode's step JSON: the index reruns (data fingerprint), exactly one shard file changes
    step_json = sorted((wf.root / "ep0004").glob("step_*.json"))[0]
    step_json.write_text(step_json.read_text().replace("visible", "in view"))
    assert not nothing_to_do(wf)
    wf.snakemake(TARGET)
    after_edit = shard_mtimes(wf)
    assert [n for n in before if after_edit[n] != before[n]] == [f"{shard_of('ep0004', 4)}.parquet"]
    assert nothing_to_do(wf)

    # add one episode: exactly one shard file changes
    write_episode(str(wf.root / "ep0777"), "ep0777", 5, seed=777, size=(32, 24))
    wf.snakemake(TARGET)
    after_add = shard_mtimes(wf)
    assert [n for n in after_add if after_add[n] != after_edit.get(n)] == [f"{shard_of('ep0777', 4)}.parquet"]
    assert json.loads((wf.path / TARGET).read_text())["n_episodes"] == 15
    assert nothing_to_do(wf)


@pytest.mark.slow
def test_history_setting_change_reruns_index(demo_workflow):
    wf = demo_workflow
    wf.snakemake(TARGET)
    wf.configure({"history": {"pad": "repeat_first"}})
    proc = wf.snakemake("-n", TARGET)
    assert "index" in proc.stdout and "Params have changed" in proc.stdout


@pytest.mark.slow
def test_broken_data_set_fails_the_job_with_a_named_error(demo_workflow):
    wf = demo_workflow
    (wf.root / "ep0003" / "milestones_result.json").write_text("{broken")
    proc = wf.snakemake(TARGET, check=False)
    assert proc.returncode != 0
    log = (wf.path / "results/logs/index/index.log").read_text()
    assert "unparseable JSON in" in log and "ep0003/milestones_result.json" in log

    wf.configure({"dataset": {"on_error": "skip"}})
    wf.snakemake(TARGET)
    skipped = (wf.path / "results/index/skipped.csv").read_text().splitlines()
    assert len(skipped) == 2 and skipped[1].startswith("ep0003,")
    assert "1 episode(s) skipped" in (wf.path / "results/logs/index/index.log").read_text()


@pytest.mark.slow
def test_bad_setting_fails_at_parse_time(demo_workflow):
    demo_workflow.configure({"dataset": {"format": "hdf5"}})
    proc = demo_workflow.snakemake("-n", TARGET, check=False)
    assert proc.returncode != 0 and "dataset.format" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_lint_is_clean(workflow_copy):
    proc = workflow_copy.snakemake("--lint", check=False)
    found = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith(("Lints for", "    * "))]
    assert proc.returncode == 0 and not found, "snakemake --lint:\n" + "\n".join(found)
    assert "Congratulations, your workflow is in a good condition" in proc.stdout + proc.stderr


# --- parse-time helpers (no Snakemake run) ---


class FakeCheckpoint:
    def __init__(self, manifest):
        self.manifest = manifest

    def get(self, **wildcards):
        from types import SimpleNamespace

        return SimpleNamespace(output=[str(self.manifest)])


def test_per_shard_lists_the_checkpoint_shards(tmp_path):
    from types import SimpleNamespace

    from vlnflow.workflow import helpers

    manifest = tmp_path / "shards.json"
    manifest.write_text(json.dumps({"shards": [{"name": "shard_00001"}, {"name": "shard_00003"}]}))
    checkpoints = SimpleNamespace(shard=FakeCheckpoint(manifest))
    assert helpers.shard_names(checkpoints) == ["shard_00001", "shard_00003"]
    assert helpers.per_shard(checkpoints, "results/cache/{shard}.h5")(None) == [
        "results/cache/shard_00001.h5",
        "results/cache/shard_00003.h5",
    ]


def test_fingerprint_param_is_lazy_cached_and_main_process_only(demo_data, tmp_path):
    from types import SimpleNamespace

    from vlnflow.workflow import helpers

    root = tmp_path / "episodes"
    shutil.copytree(demo_data / "episodes", root)
    config = {"dataset": {"root": str(root)}}
    param = helpers.dataset_fingerprint_param(config, SimpleNamespace(is_main_process=True))
    value = param(None)
    (root / "ep0000" / "extra.json").write_text("{}")
    assert param(None) == value  # computed once per Snakemake process
    fresh = helpers.dataset_fingerprint_param(config, SimpleNamespace(is_main_process=True))(None)
    assert fresh != value
    job_process = helpers.dataset_fingerprint_param(config, SimpleNamespace(is_main_process=False))
    assert job_process(None) == helpers.NOT_MAIN_PROCESS
