"""Run settings as dataclasses, read from and written to YAML or JSON files, with overrides.

One loader for every configurable run (score-token fine-tuning, reward fine-tuning of diffusion
models, the recipes)::

    config = load_config(TrainingConfig, "recipe.yaml", parse_overrides(["max_steps=100", "loss.mse=0.5"]))
    save_config(config, "runs/x/training_config.yaml")

- A file holds a mapping of settings; nested dataclasses are nested mappings, lists of them lists
  of mappings. Unknown keys are refused, naming where they are (``train_datasets[0].wieght``), so
  a typo is an error rather than a silently ignored setting; so are missing required ones.
- Overrides are ``KEY=VALUE`` pairs, the value parsed as YAML (``max_steps=100``,
  ``eval_prompts=[a cat, a dog]``); a dotted key reaches into a nested setting (``loss.mse=0.5``).
  They replace the file's values before the settings are checked.
- Paths are used as written: a relative path in a config file, like one on the command line, is
  relative to the working directory (not to the file's folder).
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

Config = TypeVar("Config")


def load_config(cls: type[Config], path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> Config:
    """An instance of the dataclass ``cls`` from a ``.yaml`` / ``.yml`` or JSON file, with
    ``overrides`` (``{"key" or "nested.key": value}``) applied. Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # yaml.YAMLError or json.JSONDecodeError, with the position in the file
        raise ValueError(f"{path}: cannot parse ({err})") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    try:
        for key, value in (overrides or {}).items():
            _set_dotted(data, key, value)
        return config_from_dict(cls, data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["KEY=VALUE", ...]`` as ``{KEY: VALUE}``, each value parsed as YAML."""
    import yaml

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"an override is KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def save_config(config, path: str | os.PathLike) -> None:
    """Write the dataclass ``config`` as YAML (``.yaml`` / ``.yml``) or JSON (otherwise)."""
    path = Path(path)
    data = config_to_dict(config)
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    else:
        text = json.dumps(data, indent=2) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def config_to_dict(config) -> dict:
    """The dataclass ``config`` as plain dicts and lists (tuples as lists: YAML and JSON have lists)."""
    return _plain(dataclasses.asdict(config))


def config_from_dict(cls: type[Config], data: Mapping[str, Any], where: str = "") -> Config:
    """``cls(**data)`` with nested dataclasses built from mappings and unknown keys refused."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"unknown setting(s) {[f'{where}{k}' for k in unknown]}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _convert(hints[name], value, f"{where}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required setting is missing
        raise ValueError(f"{where or 'config'}: {err}") from err


def _set_dotted(data: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    for index, part in enumerate(parents):
        data = data.setdefault(part, {})
        if not isinstance(data, dict):
            raise ValueError(f"cannot override {key}: {'.'.join(parents[: index + 1])} is not a mapping")
    data[last] = value


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _convert(hint, value, where: str):
    if value is None:
        return None
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        if dataclasses.is_dataclass(option):
            return config_from_dict(option, value, f"{where}.")
        item = typing.get_args(option)[0] if typing.get_origin(option) is list and typing.get_args(option) else None
        if dataclasses.is_dataclass(item):
            if not isinstance(value, list):
                raise ValueError(f"{where}: expected a list, got {type(value).__name__}")
            return [config_from_dict(item, entry, f"{where}[{index}].") for index, entry in enumerate(value)]
    return value
