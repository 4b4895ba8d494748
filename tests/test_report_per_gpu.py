"""Report section "Precompute per GPU" (issue 11): which GPU ran which shard, samples/s each, node aggregate."""

from __future__ import annotations

import json

import pytest

from vlnflow.report.per_gpu import node_aggregate, per_gpu_markdown, per_gpu_table
from vlnflow.report.report import ReportInputs, write_report

HOST = {"host": "testhost", "cpus": 2, "gpu": "none"}
# shard, slot, start, end, computed: GPU 0 ran two shards back to back, GPU 1 one, all on host "n1"
JOBS = [("shard_00000", 0, 100.0, 110.0, 50), ("shard_00001", 1, 101.0, 121.0, 80), ("shard_00002", 0, 110.5, 120.0, 40)]


def _stats(tmp_path, jobs=JOBS, host="n1") -> list[str]:
    paths = []
    for shard, slot, start, end, computed in jobs:
        stats = {"shard": shard, "samples": computed, "computed": computed, "resumed": 0, "skipped": 0, "frames": 9 * computed, "wall_s": end - start,
                 "samples_per_s": computed / (end - start), "device": "cuda", "gpu_name": "NVIDIA H200",
                 "started_at": start, "finished_at": end, "loop_s": end - start - 0.5,
                 "time_split_s": {"data_wait": 0.5, "compute": end - start - 1, "write_wait": 0.25, "device_busy": end - start - 1, "writer_hdf5": 2.0},
                 "gpu": {"how": "claimed", "device": str(slot), "slot": slot, "slots": 2, "waited_s": 0.0, "host": host}}  # fmt: skip
        path = tmp_path / f"{host}_{shard}.stats.json"
        path.write_text(json.dumps(stats))
        paths.append(str(path))
    return paths


def test_rows_name_each_shards_gpu_and_rate(tmp_path):
    table = per_gpu_table(_stats(tmp_path)[::-1])  # rows come back in start order
    assert table["shard"].tolist() == ["shard_00000", "shard_00001", "shard_00002"]
    assert table["gpu"].tolist() == ["0 (slot 0 of 2)", "1 (slot 1 of 2)", "0 (slot 0 of 2)"]
    assert table["samples_per_s"].tolist() == pytest.approx([5.0, 4.0, 40 / 9.5])
    assert table["write_wait_s"].tolist() == [0.25] * 3
    assert table["device_busy_pct"].tolist() == pytest.approx([100 * 9 / 9.5, 100 * 19 / 19.5, 100 * 8.5 / 9])


def test_node_aggregate_is_samples_over_the_wall_span_per_host(tmp_path):
    paths = _stats(tmp_path) + _stats(tmp_path, [("shard_00003", 0, 200.0, 204.0, 20)], host="n2")
    agg = node_aggregate(per_gpu_table(paths)).set_index("host")
    assert agg.loc["n1", "samples"] == 170 and agg.loc["n1", "span_s"] == pytest.approx(21.0)
    assert agg.loc["n1", "samples_per_s"] == pytest.approx(170 / 21) and agg.loc["n1", "gpus"] == 2
    assert agg.loc["n2", "samples_per_s"] == pytest.approx(5.0) and agg.loc["n2", "jobs"] == 1


def test_section_in_the_report_and_old_stats_files(tmp_path):
    paths = _stats(tmp_path)
    old = tmp_path / "old.stats.json"  # written before GPU slots: no gpu record, no times
    old.write_text(json.dumps({"shard": "shard_00009", "samples": 3, "computed": 3, "wall_s": 1.0, "samples_per_s": 3.0}))
    md = per_gpu_markdown([*paths, str(old)])
    assert "| shard_00001 | n1 | 1 (slot 1 of 2) | NVIDIA H200 | 80 | 20 | 4 | 0.5 | 19 | 0.25 | 97 |" in md
    assert "| shard_00009 |  | unknown |  | 3 | 1 | 3 |  |  |  |  |" in md
    assert "| n1 | 3 | 2 | 170 | 21 | 8.1 |" in md
    assert per_gpu_markdown([]) == ""
    out = tmp_path / "out"
    tsvs = []
    for shard, _, start, end, _ in JOBS:  # the precompute jobs' Snakemake benchmark files
        tsv = tmp_path / f"{shard}.tsv"
        tsv.write_text("s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
                       f"{end - start}\t0:00:10\t100\t100\t100\t100\t0\t0\t90\t9\n")
        tsvs.append(str(tsv))
    write_report(ReportInputs(precompute=tsvs, precompute_stats=paths), out / "r.md", out / "r.csv", out / "t.png", command="x",
                 projected_samples=1000, host=HOST)  # fmt: skip
    assert "## Precompute per GPU" in (out / "r.md").read_text()


def test_setup_split_compile_cache_and_recompiles_are_shown_per_job(tmp_path):
    """Issue 21: each job's set-up split, whether the host's compile cache was warm, recompiles after warm-up."""
    from vlnflow.report.per_gpu import setup_table

    paths = _stats(tmp_path)
    extra = [  # the first job compiled cold for its host, the others loaded its cache; shard_00002 recompiled once
        ({"imports": 4.0, "weights": 2.5, "open": 0.5, "first_data": 1.0, "first_batch": 25.0, "later_warmup": 5.0}, False, True, 0),
        ({"imports": 4.0, "weights": 2.0, "open": 0.5, "first_data": 1.0, "first_batch": 4.0, "later_warmup": 0.5}, True, False, 0),
        ({"imports": 3.5, "weights": 2.0, "open": 0.5, "first_data": 1.0, "first_batch": 3.5, "later_warmup": 0.5}, True, False, 1),
    ]
    for path, (split, warm, first, recompiles) in zip(paths, extra):
        stats = json.loads(open(path).read())
        stats.update({"setup_split_s": split, "setup_s": sum(split.values()), "recompiles_after_warmup": recompiles,
                      "steady_samples_per_s": 11.5, "compile": {"enabled": True, "cache_warm": warm, "first_on_host": first, "lock_wait_s": 0.0 if first else 28.0}})  # fmt: skip
        open(path, "w").write(json.dumps(stats))
    table = setup_table(paths).set_index("shard")
    assert table.loc["shard_00000", "setup_s"] == pytest.approx(38.0) and table.loc["shard_00001", "first_batch_s"] == 4.0
    assert table["compile_cache"].tolist() == ["cold (first on host)", "warm", "warm"]
    md = per_gpu_markdown(paths)
    assert "| shard_00000 | 38 | 4 | 2.5 | 1 | 25 | 5 | cold (first on host) | 0 | 0 | 11.5 |" in md
    assert "| shard_00002 | 11 | 3.5 | 2 | 1 | 3.5 | 0.5 | warm | 28 | 1 | 11.5 |" in md
    old = tmp_path / "old.stats.json"
    old.write_text(json.dumps({"shard": "shard_00009", "samples": 3, "computed": 3, "wall_s": 1.0, "samples_per_s": 3.0}))
    assert "| shard_00009 |  |  |  |  |  |  |  |  |  |  |" in per_gpu_markdown([str(old)])
