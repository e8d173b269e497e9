"""The serving config file: one YAML format read by `disagg-serve up --config FILE`, the Ray
cluster-launcher YAML and the KubeRay manifests alike, so no deployment repeats flags.

Keys are the long option names of `disagg-serve up` (dashes or underscores), optionally
grouped in sections for readability; command-line flags given explicitly win over the file:

    model: /models/my-model
    pools:   {prefill: 2, decode: 4}
    engine:  {max-model-len: 4096, dtype: bfloat16}
    kv:      {kv-transport: nccl, kv-failure-policy: recompute}
    router:  {port: 50051, metrics-port: 9400}
    migration: {migration: true, migration-timeout-s: 30}
"""

from __future__ import annotations

from pathlib import Path

import yaml

SECTIONS = {"pools", "engine", "kv", "router", "cluster", "spec", "speculative", "scheduler",
            "migration", "autoscaler", "deployment", "frontend", "prefix"}


class ConfigFileError(ValueError):
    pass


def load_config_file(path: str | Path, valid_keys: set[str]) -> dict:
    """Flat {argparse dest: value} from the file; unknown keys are an error, not a surprise."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigFileError(f"cannot read config file {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigFileError(f"config file {path} must be a mapping of option names to values")
    flat: dict = {}
    for key, value in raw.items():
        if key in SECTIONS and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                _put(flat, str(sub_key), sub_value, path, valid_keys)
        else:
            _put(flat, str(key), value, path, valid_keys)
    return flat


def _put(flat: dict, key: str, value, path, valid_keys: set[str]) -> None:
    dest = key.replace("-", "_")
    if dest not in valid_keys:
        raise ConfigFileError(f"{path}: unknown option {key!r}; valid options: "
                              + ", ".join(sorted(k.replace("_", "-") for k in valid_keys)))
    if dest in flat:
        raise ConfigFileError(f"{path}: option {key!r} is given twice")
    flat[dest] = value
