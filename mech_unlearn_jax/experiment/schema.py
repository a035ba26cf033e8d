"""One config schema: frozen dataclasses <-> ml_collections ConfigDicts.

The library's own frozen dataclasses (the fact-lookup rule, AP/CT settings, the edit
config, ...) nest into `ExperimentSpec`; `configs/common.py` is *built from* the spec's
defaults with `to_config_dict`, so a default exists in exactly one place and every
field is reachable from the command line (`--config.localize.fact_lookup.rule.z=3`).
`from_mapping` goes back: unknown keys, wrong types and bad values raise errors that
name the `config.` key.

Optional fields (`int | None`) become typed ml_collections placeholders, so they can
be set from the command line and read back as None when unset. Tuple fields accept a
tuple, a list or a comma-separated string ("2,3,4").
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from ml_collections import config_dict


class ConfigError(ValueError):
  """A config value is missing, unknown or of the wrong type; names its key."""


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
  """(inner type, whether None is allowed)."""
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    optional = len(args) < len(typing.get_args(tp))
    if len(args) == 1:
      return args[0], optional
    return tp, optional
  return tp, False


def _scalar_type(tp: Any) -> type | None:
  """The Python type a ConfigDict field holds for a dataclass field type."""
  if tp in (int, float, bool, str):
    return tp
  origin = typing.get_origin(tp)
  if origin is typing.Literal:
    return type(typing.get_args(tp)[0])
  if origin is tuple or tp is tuple:
    return tuple
  return None


def to_config_dict(instance: Any, skip_nested: Sequence[str] = (), _top: bool = True) -> ml_collections.ConfigDict:
  """A ConfigDict with one entry per (nested) dataclass field of `instance`.

  Fields named in `skip_nested` are left out below the top level (values derived
  from a top-level field, such as the run's one seed).
  """
  out = ml_collections.ConfigDict()
  hints = _hints(type(instance))
  for field in dataclasses.fields(instance):
    if not field.init or (not _top and field.name in skip_nested):
      continue
    value = getattr(instance, field.name)
    if dataclasses.is_dataclass(value):
      out[field.name] = to_config_dict(value, skip_nested, _top=False)
      continue
    inner, optional = _strip_optional(hints[field.name])
    if value is None:
      kind = _scalar_type(inner)
      if kind is None:
        raise TypeError(f"field {field.name} of {type(instance).__name__}: unsupported optional type {inner}")
      out[field.name] = config_dict.placeholder(kind)
    else:
      out[field.name] = tuple(value) if isinstance(value, list) else value
  return out


def _convert(value: Any, tp: Any, key: str) -> Any:
  inner, optional = _strip_optional(tp)
  if value is None:
    if optional:
      return None
    raise ConfigError(f"{key} must be set (got None)")
  origin = typing.get_origin(inner)
  if origin is typing.Literal:
    allowed = typing.get_args(inner)
    if value not in allowed:
      raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")
    return value
  if inner is bool:
    if not isinstance(value, bool):
      raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value
  if inner is int:
    if isinstance(value, bool) or not isinstance(value, int):
      if isinstance(value, float) and value.is_integer():
        return int(value)
      raise ConfigError(f"{key} must be an integer, got {value!r}")
    return value
  if inner is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{key} must be a number, got {value!r}")
    return float(value)
  if inner is str:
    if not isinstance(value, str):
      raise ConfigError(f"{key} must be a string, got {value!r}")
    return value
  if origin is tuple or inner is tuple:
    args = typing.get_args(inner)
    item = args[0] if args else Any
    if isinstance(value, str):
      value = [v.strip() for v in value.strip("()[] ").split(",") if v.strip()]
      if item is int:
        try:
          value = [int(v) for v in value]
        except ValueError:
          raise ConfigError(f"{key} must be integers separated by commas, got {value!r}") from None
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{key} must be a list, got {value!r}")
    if item is str:
      # "--config.eval.formats=standard,qa" arrives as one comma-joined item.
      value = [v.strip() for part in value for v in str(part).split(",") if v.strip()]
    if item in (int, float, str, bool):
      return tuple(_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    return tuple(value)
  return value


def from_mapping(cls: type, values: Mapping[str, Any], prefix: str = "config.") -> Any:
  """Builds `cls` (a frozen dataclass) from nested mappings; errors name the key.

  Missing keys keep the dataclass default; unknown keys are errors. Validation in
  the dataclasses' `__post_init__` that raises ValueError is re-raised with the key
  prefix of the sub-config.
  """
  if isinstance(values, ml_collections.ConfigDict):
    values = values.to_dict()
  fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ConfigError(
        f"unknown config key(s) {[prefix + k for k in unknown]}; expected one of"
        f" {[prefix + k for k in fields]}"
    )
  hints = _hints(cls)
  kwargs = {}
  for name, value in values.items():
    tp = hints[name]
    sub_cls = _strip_optional(tp)[0]
    if dataclasses.is_dataclass(sub_cls):
      if not isinstance(value, Mapping):
        raise ConfigError(f"{prefix}{name} must be a group of settings, got {value!r}")
      kwargs[name] = from_mapping(sub_cls, value, f"{prefix}{name}.")
    else:
      kwargs[name] = _convert(value, tp, prefix + name)
  try:
    return cls(**kwargs)
  except ConfigError:
    raise
  except (ValueError, TypeError) as e:
    raise ConfigError(f"{prefix.rstrip('.')}: {e}") from None


def replace_nested(instance: Any, name: str, value: Any) -> Any:
  """`instance` with every field called `name` below the top level set to `value`."""
  changes = {}
  for field in dataclasses.fields(instance):
    sub = getattr(instance, field.name)
    if dataclasses.is_dataclass(sub) and not isinstance(sub, type):
      new = _replace_all(sub, name, value)
      if new is not sub:
        changes[field.name] = new
  return dataclasses.replace(instance, **changes) if changes else instance


def _replace_all(instance: Any, name: str, value: Any) -> Any:
  changes = {}
  for field in dataclasses.fields(instance):
    sub = getattr(instance, field.name)
    if field.name == name and field.init and sub != value:
      changes[name] = value
    elif dataclasses.is_dataclass(sub) and not isinstance(sub, type):
      new = _replace_all(sub, name, value)
      if new is not sub:
        changes[field.name] = new
  return dataclasses.replace(instance, **changes) if changes else instance


def nested_keys(values: Mapping[str, Any], name: str, prefix: str = "config.", _top: bool = True) -> list[str]:
  """Dotted keys of entries called `name` below the top level of nested mappings."""
  found = []
  for k, v in values.items():
    if isinstance(v, Mapping):
      found += nested_keys(v, name, f"{prefix}{k}.", _top=False)
    elif k == name and not _top:
      found.append(prefix + k)
  return found


def to_json(instance: Any) -> dict[str, Any]:
  """Nested plain-JSON dict of a (nested) dataclass; tuples become lists."""

  def plain(x):
    if isinstance(x, (list, tuple)):
      return [plain(v) for v in x]
    if isinstance(x, dict):
      return {k: plain(v) for k, v in x.items()}
    return x

  return plain(dataclasses.asdict(instance))


def diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "config.") -> list[str]:
  """Keys (dotted) whose values differ between two nested dicts."""
  keys = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
    if isinstance(va, Mapping) and isinstance(vb, Mapping):
      keys += diff(va, vb, f"{prefix}{k}.")
    elif va != vb:
      keys.append(f"{prefix}{k}: {va!r} -> {vb!r}")
  return keys
