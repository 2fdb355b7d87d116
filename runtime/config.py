"""Run configs of both training systems: YAML files + dotted command-line overrides
(`section.key=value`, the value read as YAML) into nested dataclasses, type-checked at start. Every
key has a type and a default; an unknown key or a wrong type fails with a `ConfigError` naming the
dotted key. The config classes themselves live with their trainers (pretrain/config.py,
posttrain/config.py); the `launch:` section is shared.
"""

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A bad run config: the message names the key and the fix."""


@dataclass
class LaunchConfig:
    num_nodes: int = 1
    gpus_per_node: int | None = None  # None = all the node has
    hostfile: str | None = None
    master_port: int | None = None  # None: a free port on a single node, 29500 across nodes


def _check_type(key: str, value, annotation):
    """Coerce int -> float where a float is expected; raise ConfigError on a mismatch."""
    if annotation is typing.Any:
        return value
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    options = typing.get_args(annotation) if union else (annotation,)
    for opt in options:
        if opt is type(None) and value is None:
            return None
        if opt is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if opt is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if opt in (int, str, bool, list, dict) and isinstance(value, opt) and not (opt is int and isinstance(value, bool)):
            return value
    names = " or ".join("null" if o is type(None) else o.__name__ for o in options)
    raise ConfigError(f"config key {key}: expected {names}, got {value!r} ({type(value).__name__})")


def _build(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"config section {prefix.rstrip('.')} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}; known keys in "
                          f"{prefix.rstrip('.') or 'the top level'}: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(prefix + name, value, hint)
    return cls(**kwargs)


def apply_override(tree: dict, override: str) -> None:
    """Apply "a.b.c=value" (value parsed as YAML) to a nested dict."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    key, raw = override.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r} has an empty key; it must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({err})") from err
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[parts[-1]] = value


def config_from_dict(tree: dict, cls):
    """A config of dataclass `cls` from an already-parsed mapping (e.g. one a checkpoint stored), type-checked."""
    return _build(cls, tree, "")


def load_config(path: str | Path | None, overrides: list[str], cls):
    """Load a YAML config (or none: the defaults) into dataclass `cls`, apply the dotted overrides,
    then `cfg.validate()` when the class has it."""
    tree = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    tree = copy.deepcopy(tree)
    for override in overrides:
        apply_override(tree, override)
    cfg = _build(cls, tree, "")
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg
