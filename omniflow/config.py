"""Configs from YAML files and key=value overrides, validated by pydantic models, with one-line
errors that name the field and the bad value; and a config's hash.

    >>> load_config(TrainConfig, "configs/train_shapesworld_stage1.yaml", ["steps=100", "optim.lr=3e-4"])
"""

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class ConfigError(ValueError):
    """A bad command line or config; the message is one line naming each bad field and value."""

    def __init__(self, message: str):
        # A job prints it as one `error: ...` line, whatever a validator or parser put in it.
        super().__init__(" ".join(line.strip() for line in str(message).splitlines() if line.strip()))


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """["a.b=3", "c=[1, 2]"] -> {"a": {"b": 3}, "c": [1, 2]}; values are parsed as YAML.

    Two overrides of one field, or of a field and a field inside it (`a=1 a.b=2`), are refused
    rather than one silently winning.

        >>> parse_overrides(["a.b=3", "c=[1, 2]", "d="])
        {'a': {'b': 3}, 'c': [1, 2], 'd': None}
    """
    out: dict[str, Any] = {}
    given: dict[tuple[str, ...], str] = {}  # each key set so far -> the override that set it
    for item in overrides:
        path, value = _parse_override(item)
        for earlier, by in given.items():
            shorter = min(len(earlier), len(path))
            if earlier[:shorter] == path[:shorter]:
                raise ConfigError(f"override {item!r} conflicts with {by!r}: both set {'.'.join(path[:shorter])}")
        given[path] = item
        node = out
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return out


def _parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    """"a.b=[1, 2]" -> (("a", "b"), [1, 2])."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    dotted, raw = item.split("=", 1)
    path = tuple(name.strip() for name in dotted.split("."))
    if not all(path):
        raise ConfigError(f"override {item!r} has an empty key or key part")
    try:
        return path, yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {dotted}: value {raw!r} is not valid YAML ({_yaml_problem(err)})") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """The parser's complaint and where, in one line (its own message spans several)."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        return f"{err.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return str(err)


def deep_merge(base: dict, extra: dict, where: str = "") -> dict:
    """`extra`'s values over `base`'s, mappings merged key by key; a mapping over a list sets items by
    index (`datasets.0.weight=2`)."""
    merged = dict(base)
    for k, v in extra.items():
        at = f"{where}{k}"
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = deep_merge(merged[k], v, f"{at}.")
        elif isinstance(v, dict) and isinstance(merged.get(k), list):
            merged[k] = _merge_items(merged[k], v, at)
        else:
            merged[k] = v
    return merged


def _merge_items(items: list, extra: dict, where: str) -> list:
    out = list(items)
    for index, value in extra.items():
        if not str(index).isdigit() or int(index) >= len(out):
            raise ConfigError(f"override {where}.{index}: {where} is a list of {len(out)} items; "
                              f"give an index from 0 to {len(out) - 1}")
        item = out[int(index)]
        out[int(index)] = deep_merge(item, value, f"{where}.{index}.") \
            if isinstance(item, dict) and isinstance(value, dict) else value
    return out


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def config_error(err: ValidationError) -> ConfigError:
    """One line naming every field that failed and the value it got: `a.b: <why> (got 3); c: ...`."""
    problems = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = f" (got {_short(e['input'])})" if "input" in e and not isinstance(e["input"], dict) else ""
        problems.append(f"{where}: {e['msg']}{got}")
    return ConfigError(f"invalid config: {'; '.join(problems)}")


def _read_yaml_mapping(path: str) -> dict:
    try:
        with open(path, "rb") as f:  # bytes: the YAML reader reports bad UTF-8 as a YAML error
            raw = yaml.safe_load(f)
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path} is not valid YAML: {_yaml_problem(err)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path}: the top level must be a mapping of field: value, not a {type(raw).__name__}")
    return raw


def load_config(model: type[ConfigT], source: str | dict | None, overrides: Sequence[str] = ()) -> ConfigT:
    """Read YAML file `source` (or take the dict itself), apply key=value overrides, validate with `model`.

    Every problem (a file that is missing, not YAML or not a mapping; a malformed or conflicting
    override; a field that does not validate) raises `ConfigError`, one line naming the key.
    """
    raw = source if isinstance(source, dict) else _read_yaml_mapping(source) if source else {}
    try:
        return model.model_validate(deep_merge(raw, parse_overrides(overrides)))
    except ValidationError as err:
        raise config_error(err) from None


def config_hash(config: BaseModel | Mapping[str, Any], *, version: str | int = "") -> str:
    """The config's identity: 16 hex digits of the sha256 of its JSON (a model's own dump, a
    mapping's with sorted keys), after `"<version>:"` when a `version` is given (a build whose
    output changes for the same config bumps it)."""
    text = config.model_dump_json() if isinstance(config, BaseModel) else json.dumps(config, sort_keys=True)
    return hashlib.sha256(f"{f'{version}:' if version != '' else ''}{text}".encode()).hexdigest()[:16]
