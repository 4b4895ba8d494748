"""Tests against a real local Slurm cluster (see cluster.py); reported as not run where Slurm is missing."""
