"""Input functions and parse-time values for rules/*.smk, kept here so they are testable."""

from __future__ import annotations
