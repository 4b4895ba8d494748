"""Fixtures for tests that need a real Slurm: one local two-node cluster per test session.

Use from any test module in tests/slurm/:

    @pytest.mark.slurm
    @pytest.mark.slow
    def test_x(slurm_cluster, tmp_path):
        slurm_cluster.write_profile(tmp_path / "slurm_h800")      # test copy of the site profile
        slurm_cluster.snakemake(tmp_path, "--profile", "slurm_h800", "all")
        jobs = slurm_cluster.sacct()                                # one dict per Slurm job

Without the Slurm/munge/MariaDB binaries (or without root) the fixture skips the test
with a reason starting "NOT RUN": it is reported as not run, never as passed.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from .cluster import LocalSlurm, why_not_runnable


@pytest.fixture(scope="session")
def slurm_cluster():
    """A started LocalSlurm (nodes n1, n2; 4 CPUs, 4000 MB, 8 fake GPUs each; partition 'debug')."""
    reason = why_not_runnable()
    if reason:
        pytest.skip(f"NOT RUN: {reason}")
    # Not under pytest's tmp dir: that one is private to root, and munged runs as user munge.
    root = tempfile.mkdtemp(prefix="vlnflow-slurm-")
    cluster = LocalSlurm(root)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        if not os.environ.get("VLNFLOW_KEEP_SLURM"):  # set it to keep daemon logs for debugging
            shutil.rmtree(root, ignore_errors=True)
