"""One place that loads config.yaml, validates it against the schema and fills defaults.

The Snakefile and every CLI command go through here, so a bad setting fails the
same way (naming the key) before any job runs.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SCHEMA_PATH = Path(__file__).parent / "schemas" / "config.schema.yaml"


from vlnflow.errors import UserError


class ConfigError(UserError):
    """A setting in config.yaml is missing, mistyped or out of range."""


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Validate `config` in place (filling defaults) and return it; raise ConfigError naming the key."""
    import jsonschema

    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    fill_defaults(schema, config)
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(config))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path) or "<top level>"
        raise ConfigError(f"config setting '{where}': {error.message}")
    from vlnflow.data.sources import config_problem

    problem = config_problem(config)  # what a schema cannot say: unique source names, settings that exclude each other
    if problem is not None:
        raise ConfigError(f"config setting '{problem[0]}': {problem[1]}")
    return config


def fill_defaults(schema: dict[str, Any], instance: dict[str, Any]) -> None:
    """Insert each property's schema default where the key is absent, recursively (as Snakemake's
    validate(set_default=True) does; done here so the package needs no Snakemake at run time)."""
    for key, sub in schema.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if isinstance(instance.get(key), dict) and "properties" in sub:
            fill_defaults(sub, instance[key])


def load_config(path: str | Path = "config.yaml", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a YAML config, deep-merge `overrides`, validate and fill defaults."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    with path.open() as fh:
        config = yaml.safe_load(fh) or {}
    if overrides:
        config = deep_merge(config, overrides)
    return validate_config(config)


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Return base updated recursively by extra (neither is modified)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
