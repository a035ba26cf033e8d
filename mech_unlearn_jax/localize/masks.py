"""Parameter masks: where a localization result becomes "which weights may change".

A `ParamMask` maps EVERY parameter label of a model to either
  * a Python bool (the whole tensor is trained or frozen), or
  * a bool `np.ndarray` of the parameter's shape (sub-tensor masks: heads, neurons).
Positional axes follow the parameter's named-shape order. That order depends on how
the model was made (a freshly built model and a checkpoint loader may order the axes
of a parameter differently), so every function that needs shapes takes a "layout":
the model itself (its own order: use this for masks you will train with) or its
`TransformerConfig` (the order of `transformer.parameter_shapes(config)`).
`relayout_mask` converts between layouts by axis name, `save_mask` stores the axis
names so `load_mask` can return a mask in any layout, and `mask_to_named` gives
`pz.nx` named bool arrays that broadcast against the parameter whatever its layout
(and render in treescope).

Units (METHOD §2): the attention unit of layer i is its query, key, value and output
weights; the MLP unit is gating_linear, value_linear and out_linear. Embeddings, norms
and the unembedding are never trainable here.

Scores -> mask (`scores_to_units`):
  * "reference": per-component scores are summed WITH SIGN into their unit (heads of
    a layer can cancel), then units are taken by |score|, largest first, until the
    parameter budget is met; the last unit may overshoot the budget (at most one unit).
  * "per_matrix": |score| is summed per weight matrix and whole matrices are taken by
    that value until the budget is met (same overshoot rule, one matrix).

Component kinds accepted in score dicts (key = `(layer, kind)` or any object with
`.layer` and `.kind`; value = a scalar or an array, e.g. one entry per head):
  query side "q"/"query"/"head_q", "k"/"key"/"head_k", "v"/"value"/"head_v", head
  output "o"/"z"/"output"/"head_out"/"head"/"result", whole sublayer "attn"/
  "attn_out"/"attention"; MLP "mlp_in" (gate + up), "gate"/"gating_linear",
  "up"/"value_linear", "mlp_out"/"mlp_hidden"/"down"/"out_linear", whole MLP "mlp".
In reference mode pass one kind per unit side (e.g. AP's "head_out" and "mlp_out",
as the reference summed head and MLP node scores); every given score is summed. In
per-matrix mode a score goes to the matrix that produces
  (or, for "mlp_in", reads) the scored activation; whole-sublayer scores are shared
  by all of the unit's matrices.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import pathlib
import zipfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from penzai import pz

from mech_unlearn_jax import io as mio
from mech_unlearn_jax.models.config import TransformerConfig
from mech_unlearn_jax.models.transformer import CausalLM, parameter_shapes, parameters_by_label
from mech_unlearn_jax.train import trainables as trainables_lib

ParamMask = trainables_lib.ParamMask
Layout = trainables_lib.Layout
UnitKind = Literal["attn", "mlp"]

ATTENTION_MATRICES = ("query", "key", "value", "output")
MLP_MATRICES = ("gating_linear", "value_linear", "out_linear")
UNIT_KINDS = ("attn", "mlp")
_PREFIX = "transformer"
_MASK_FORMAT = "mech_unlearn_jax.param_mask.v1"


@dataclasses.dataclass(frozen=True, order=True)
class Unit:
  """A trainable unit: all attention ("attn") or MLP ("mlp") matrices of a layer."""

  layer: int
  kind: UnitKind

  def __post_init__(self):
    if self.kind not in UNIT_KINDS:
      raise ValueError(f"Unit kind {self.kind!r} must be one of {UNIT_KINDS}")

  @property
  def matrices(self) -> tuple[str, ...]:
    return ATTENTION_MATRICES if self.kind == "attn" else MLP_MATRICES

  @property
  def labels(self) -> tuple[str, ...]:
    return tuple(matrix_label(self.layer, m) for m in self.matrices)

  def __str__(self) -> str:
    return f"{self.kind}{self.layer}"


def matrix_label(layer: int, matrix: str) -> str:
  """Parameter label of weight matrix `matrix` (e.g. "query", "out_linear") of a layer."""
  if matrix in ATTENTION_MATRICES:
    return f"{_PREFIX}/block_{layer}/attention/{matrix}.weights"
  if matrix in MLP_MATRICES:
    return f"{_PREFIX}/block_{layer}/mlp/{matrix}.weights"
  raise ValueError(
      f"unknown weight matrix {matrix!r}; expected one of"
      f" {ATTENTION_MATRICES + MLP_MATRICES}"
  )


def parse_matrix_label(label: str) -> tuple[int, str] | None:
  """(layer, matrix) of an attention/MLP weight label, None for any other label."""
  parts = label.split("/")
  if len(parts) != 4 or parts[0] != _PREFIX or not parts[1].startswith("block_"):
    return None
  name = parts[3].removesuffix(".weights")
  if parts[2] == "attention" and name in ATTENTION_MATRICES:
    return int(parts[1][len("block_"):]), name
  if parts[2] == "mlp" and name in MLP_MATRICES:
    return int(parts[1][len("block_"):]), name
  return None


def all_units(config: Layout, kinds: Sequence[str] = UNIT_KINDS) -> list[Unit]:
  """Every unit of the model, layer-major, attention before MLP."""
  config = layout_config(config)
  return [Unit(i, k) for i in range(config.num_layers) for k in UNIT_KINDS if k in kinds]


def editable_labels(config: Layout) -> list[str]:
  """Labels of every attention and MLP weight matrix."""
  return [label for u in all_units(config) for label in u.labels]


@functools.lru_cache(maxsize=16)
def _config_shapes(config: Layout) -> dict[str, tuple[tuple[str, int], ...]]:
  return {k: tuple(v.items()) for k, v in parameter_shapes(config).items()}


def _named_shapes(layout: Layout) -> dict[str, tuple[tuple[str, int], ...]]:
  if isinstance(layout, TransformerConfig):
    return _config_shapes(layout)
  if isinstance(layout, CausalLM):
    return {
        label: tuple(p.value.named_shape.items())
        for label, p in parameters_by_label(layout).items()
    }
  raise TypeError(f"expected a TransformerConfig or a CausalLM, got {type(layout).__name__}")


def layout_config(layout: Layout) -> TransformerConfig:
  """The config of a layout (a config, or a model's config)."""
  return layout if isinstance(layout, TransformerConfig) else layout.config


def named_shapes(config: Layout) -> dict[str, dict[str, int]]:
  """Label -> named shape (axis order = the positional order masks use)."""
  return {k: dict(v) for k, v in _named_shapes(config).items()}


def parameter_shape(config: Layout, label: str) -> tuple[int, ...]:
  """Positional shape of a parameter, in named-shape order."""
  shapes = _named_shapes(config)
  if label not in shapes:
    raise KeyError(f"{label!r} is not a parameter label of this model")
  return tuple(size for _, size in shapes[label])


def _positional_shapes(config: Layout) -> dict[str, tuple[int, ...]]:
  return {label: tuple(size for _, size in named) for label, named in _named_shapes(config).items()}


def unit_parameter_count(config: Layout, unit: Unit) -> int:
  """Number of weights in a unit (attention: q,k,v,o; MLP: gate, up, down)."""
  return sum(int(np.prod(parameter_shape(config, label))) for label in unit.labels)


# ----------------------------------------------------------------------------------
# Building masks.


def empty_mask(config: Layout) -> ParamMask:
  """Every parameter frozen."""
  return {label: False for label in _named_shapes(config)}


def mask_from_labels(config: Layout, labels: Iterable[str]) -> ParamMask:
  """Whole-tensor mask training exactly the given attention/MLP weight labels."""
  mask = empty_mask(config)
  for label in labels:
    if label not in mask:
      raise KeyError(f"{label!r} is not a parameter label of this model")
    if parse_matrix_label(label) is None:
      raise ValueError(
          f"{label!r} is not an attention or MLP weight matrix; embeddings, norms and"
          " the unembedding always stay frozen"
      )
    mask[label] = True
  return mask


def mask_from_units(config: Layout, units: Iterable[Unit]) -> ParamMask:
  """Whole-tensor mask training every matrix of the given units."""
  units = list(units)
  num_layers = layout_config(config).num_layers
  for u in units:
    if not 0 <= u.layer < num_layers:
      raise ValueError(f"unit {u} is outside the model's {num_layers} layers")
  return mask_from_labels(config, [label for u in units for label in u.labels])


def _axis_index(named: tuple[tuple[str, int], ...], axis: str) -> int:
  names = [n for n, _ in named]
  return names.index(axis)


def head_axes(config: Layout) -> tuple[list[str], list[str]]:
  """(KV-group axes, query-only axes) used by query/output and key/value weights."""
  shapes = _named_shapes(config)
  q = [n for n, _ in shapes[matrix_label(0, "query")]]
  k = [n for n, _ in shapes[matrix_label(0, "key")]]
  heads = [n for n in q if n not in ("embedding", "projection")]
  kv = [n for n in heads if n in k]
  return kv, [n for n in heads if n not in kv]


def head_coordinates(config: Layout, head: int) -> dict[str, int]:
  """Named index of flat query head `head` (KV group major, as checkpoints flatten)."""
  num_heads = layout_config(config).num_heads
  if not 0 <= head < num_heads:
    raise ValueError(f"head {head} outside 0..{num_heads - 1}")
  kv_axes, q_axes = head_axes(config)
  sizes = dict(_named_shapes(config)[matrix_label(0, "query")])
  coords, rest = {}, head
  for axis in reversed(kv_axes + q_axes):
    coords[axis] = rest % sizes[axis]
    rest //= sizes[axis]
  return coords


def mask_from_heads(
    config: Layout,
    heads: Iterable[tuple[int, int]],
    *,
    include_kv: bool = True,
) -> ParamMask:
  """Sub-tensor mask training the slices of given (layer, query head) pairs.

  A head owns its slice of the query and output weights along the head axes; with
  `include_kv` it also trains the key/value slice of its KV group (with a single KV
  head that is the whole key and value matrix, shared by all query heads).
  """
  mask = empty_mask(config)
  shapes = _named_shapes(config)
  for layer, head in heads:
    if not 0 <= layer < layout_config(config).num_layers:
      raise ValueError(f"head ({layer}, {head}): layer outside the model")
    coords = head_coordinates(config, head)
    matrices = ("query", "output") + (("key", "value") if include_kv else ())
    for matrix in matrices:
      label = matrix_label(layer, matrix)
      named = shapes[label]
      current = mask[label]
      if not isinstance(current, np.ndarray):
        current = np.full(tuple(s for _, s in named), bool(current))
      index = tuple(
          coords[n] if n in coords else slice(None) for n, _ in named
      )
      current[index] = True
      mask[label] = current
  return mask


def mask_from_neurons(
    config: Layout, neurons: Mapping[int, Iterable[int]]
) -> ParamMask:
  """Sub-tensor mask training given MLP neurons: {layer: neuron indices}.

  A neuron owns its column of the gate and up projections and its row of the down
  projection (the slices along the "neurons" axis).
  """
  mask = empty_mask(config)
  shapes = _named_shapes(config)
  cfg = layout_config(config)
  for layer, idx in neurons.items():
    if not 0 <= layer < cfg.num_layers:
      raise ValueError(f"neurons of layer {layer}: layer outside the model")
    idx = np.asarray(sorted(set(int(i) for i in idx)), dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= cfg.mlp_hidden_dim):
      raise ValueError(
          f"layer {layer}: neuron indices must lie in 0..{cfg.mlp_hidden_dim - 1}"
      )
    for matrix in MLP_MATRICES:
      label = matrix_label(layer, matrix)
      named = shapes[label]
      arr = np.zeros(tuple(s for _, s in named), dtype=bool)
      axis = _axis_index(named, "neurons")
      index = [slice(None)] * len(named)
      index[axis] = idx
      arr[tuple(index)] = True
      mask[label] = arr
  return mask


def union(config: Layout, *masks: ParamMask) -> ParamMask:
  """Elementwise OR of masks (a whole-tensor True wins over any sub-tensor mask)."""
  out = empty_mask(config)
  for m in masks:
    validate_mask(m, config)
    for label, value in m.items():
      cur = out[label]
      if isinstance(cur, bool) and isinstance(value, bool):
        out[label] = cur or value
      elif cur is True or value is True:
        out[label] = True
      else:
        a = np.asarray(cur) if isinstance(cur, np.ndarray) else cur
        out[label] = np.logical_or(a, value)
  return out


# ----------------------------------------------------------------------------------
# Checking and counting.


# The one mask validator and its error live with the trainer that consumes masks.
MaskError = trainables_lib.MaskError


def validate_mask(mask: Mapping[str, Any], config: Layout) -> None:
  """Raises MaskError unless `mask` covers exactly the model's labels with valid entries.

  Delegates to `train.trainables.validate_mask` (the trainer's own check), so a mask
  accepted here is one `mask_trainable` accepts: only attention and MLP weight
  matrices may be trained.
  """
  trainables_lib.validate_mask(mask, config)


def entry_count(value: bool | np.ndarray, shape: Sequence[int]) -> int:
  if isinstance(value, np.ndarray):
    return int(value.sum())
  return int(np.prod(shape)) if value else 0


def trained_parameter_count(mask: ParamMask, config: Layout) -> int:
  """Number of individual weights the mask lets change."""
  validate_mask(mask, config)
  shapes = _positional_shapes(config)
  return sum(entry_count(v, shapes[k]) for k, v in mask.items())


def shared_entry_count(a: bool | np.ndarray, b: bool | np.ndarray, shape: Sequence[int]) -> int:
  """Entries of one parameter that both mask values let change."""
  if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
    return int(np.sum(a & b))
  if isinstance(a, np.ndarray):
    return int(a.sum()) if b else 0
  if isinstance(b, np.ndarray):
    return int(b.sum()) if a else 0
  return int(np.prod(shape)) if a and b else 0


def mask_overlap(selected: ParamMask, truth: ParamMask, config: Layout) -> dict[str, Any]:
  """Precision and recall of `selected` against `truth`, by weight count.

  precision = |selected & truth| / |selected|, recall = |selected & truth| / |truth|
  (None when a denominator is 0), f1 their harmonic mean. Sub-tensor masks count
  their entries; both masks must be in the same layout.
  """
  validate_mask(selected, config)
  validate_mask(truth, config)
  shapes = _positional_shapes(config)
  n_sel = n_true = n_both = 0
  for label in selected:
    shape = shapes[label]
    n_sel += entry_count(selected[label], shape)
    n_true += entry_count(truth[label], shape)
    n_both += shared_entry_count(selected[label], truth[label], shape)
  precision = n_both / n_sel if n_sel else None
  recall = n_both / n_true if n_true else None
  f1 = (2 * precision * recall / (precision + recall)) if precision and recall else (0.0 if n_sel and n_true else None)
  return {"selected": n_sel, "planted": n_true, "overlap": n_both,
          "precision": precision, "recall": recall, "f1": f1}


def mask_coincidence(masks: Mapping[str, ParamMask], config: Layout) -> dict[str, Any]:
  """Which of several masks coincide: pairwise Jaccard index by weight count.

  Returns {"names", "jaccard": square list (1.0 on the diagonal of non-empty masks),
  "identical": groups of names whose masks are equal entry for entry}. Two
  localizations that pick the same weights give the same edit, so a comparison
  between them compares nothing; this says where that happens.
  """
  names = list(masks)
  for name in names:
    validate_mask(masks[name], config)
  shapes = _positional_shapes(config)  # once: a model's shapes come from walking its tree
  sizes = {n: sum(entry_count(v, shapes[k]) for k, v in masks[n].items()) for n in names}
  jaccard = []
  for a in names:
    row = []
    for b in names:
      both = sum(shared_entry_count(masks[a][k], masks[b][k], shapes[k]) for k in masks[a])
      either = sizes[a] + sizes[b] - both
      row.append(both / either if either else None)
    jaccard.append(row)
  groups: list[list[str]] = []
  for i, a in enumerate(names):
    for group in groups:
      j = names.index(group[0])
      if jaccard[i][j] == 1.0:
        group.append(a)
        break
    else:
      groups.append([a])
  return {"names": names, "trained_parameters": [sizes[n] for n in names], "jaccard": jaccard,
          "identical": [g for g in groups if len(g) > 1]}


def trained_labels(mask: ParamMask) -> list[str]:
  """Labels with at least one trainable entry."""
  return [
      k for k, v in mask.items()
      if (v.any() if isinstance(v, np.ndarray) else bool(v))
  ]


def mask_units(mask: ParamMask, config: Layout) -> list[Unit]:
  """Units all of whose matrices are fully trained."""
  out = []
  for u in all_units(config):
    if all(mask[label] is True or (isinstance(mask[label], np.ndarray) and mask[label].all())
           for label in u.labels):
      out.append(u)
  return out


def mask_summary(mask: ParamMask, config: Layout) -> dict[str, Any]:
  """JSON-friendly description: total count, full units, per-label counts."""
  validate_mask(mask, config)
  per_label = {
      k: entry_count(v, parameter_shape(config, k)) for k, v in mask.items()
      if entry_count(v, parameter_shape(config, k))
  }
  return {
      "trained_parameters": int(sum(per_label.values())),
      "units": [str(u) for u in mask_units(mask, config)],
      "per_label": per_label,
  }


# ----------------------------------------------------------------------------------
# Named views (treescope, optimizers) and files.


def mask_to_named(
    mask: ParamMask, config: Layout, *, expand: bool = False
) -> dict[str, pz.nx.NamedArray]:
  """Label -> `pz.nx` bool NamedArray, renderable in treescope.

  Sub-tensor entries carry the parameter's named axes, so they broadcast against
  the parameter whatever its positional layout. Whole-tensor entries are 0-d named
  arrays (they broadcast too) unless `expand` asks for full-shape arrays.
  """
  validate_mask(mask, config)
  shapes = _named_shapes(config)
  out = {}
  for label, value in mask.items():
    names = [n for n, _ in shapes[label]]
    if isinstance(value, np.ndarray):
      out[label] = pz.nx.wrap(value).tag(*names)
    elif expand:
      out[label] = pz.nx.wrap(np.full(parameter_shape(config, label), bool(value))).tag(*names)
    else:
      out[label] = pz.nx.wrap(np.asarray(bool(value)))
  return out




def relayout_mask(mask: ParamMask, source: Layout, target: Layout) -> ParamMask:
  """The same mask with sub-tensor arrays transposed from `source`'s axis order to `target`'s."""
  validate_mask(mask, source)
  src, dst = _named_shapes(source), _named_shapes(target)
  if set(src) != set(dst):
    raise MaskError("source and target layouts have different parameter labels")
  out: ParamMask = {}
  for label, value in mask.items():
    if isinstance(value, np.ndarray):
      names = [n for n, _ in src[label]]
      want = [n for n, _ in dst[label]]
      if sorted(names) != sorted(want):
        raise MaskError(f"{label}: axes {names} cannot be reordered into {want}")
      value = np.transpose(value, [names.index(n) for n in want])
    out[label] = value
  validate_mask(out, target)
  return out


def save_mask(
    path: str | os.PathLike,
    mask: ParamMask,
    config: Layout,
    metadata: Mapping[str, Any] | None = None,
) -> None:
  """Writes the mask as .npz atomically (temp file + rename), with JSON metadata.

  Each sub-tensor array is stored with its axis names, so `load_mask` can return it
  in any layout.
  """
  validate_mask(mask, config)
  shapes = _named_shapes(config)
  labels = sorted(mask)
  arrays = {"__format__": np.asarray(_MASK_FORMAT), "__labels__": np.asarray(labels)}
  axes = []
  for i, label in enumerate(labels):
    arrays[f"m{i}"] = np.asarray(mask[label], dtype=bool)
    axes.append(",".join(n for n, _ in shapes[label]))
  arrays["__axes__"] = np.asarray(axes)
  meta = dict(metadata or {})
  meta.setdefault("trained_parameters", trained_parameter_count(mask, config))
  arrays["__metadata__"] = np.asarray(json.dumps(meta, sort_keys=True))
  buf = io.BytesIO()
  np.savez_compressed(buf, **arrays)
  mio.write_bytes(path, buf.getvalue())


def load_mask(
    path: str | os.PathLike, config: Layout | None = None
) -> tuple[ParamMask, dict[str, Any]]:
  """Reads a mask written by `save_mask` -> (mask, metadata).

  With `config` (a model or config) the mask is validated and its sub-tensor arrays
  are put in that layout's axis order; without it they keep the stored order.
  """
  path = pathlib.Path(path)
  try:
    with np.load(path, allow_pickle=False) as data:
      if "__format__" not in data or str(data["__format__"]) != _MASK_FORMAT:
        raise MaskError(f"{path}: not a parameter mask file (format {_MASK_FORMAT!r})")
      labels = [str(s) for s in data["__labels__"]]
      axes = [str(a).split(",") for a in data["__axes__"]]
      mask: ParamMask = {}
      stored: dict[str, list[str]] = {}
      for i, label in enumerate(labels):
        arr = data[f"m{i}"]
        mask[label] = bool(arr) if arr.ndim == 0 else arr.astype(bool)
        stored[label] = axes[i]
      meta = json.loads(str(data["__metadata__"]))
  except FileNotFoundError:
    raise
  except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    if isinstance(e, MaskError):
      raise
    # A killed writer never leaves half a mask (writes are atomic), but a copy or a
    # full disk can: say which file and how to get a good one back.
    raise MaskError(
        f"{path}: cannot read parameter mask ({type(e).__name__}: {e}); it is damaged or"
        " truncated: remove it and rerun to recompute it"
    ) from None
  if config is not None:
    shapes = _named_shapes(config)
    for label, value in mask.items():
      if isinstance(value, np.ndarray) and label in shapes:
        want = [n for n, _ in shapes[label]]
        if sorted(want) != sorted(stored[label]):
          raise MaskError(
              f"{path}: {label} was saved with axes {stored[label]}, the model has {want}"
          )
        mask[label] = np.transpose(value, [stored[label].index(n) for n in want])
    try:
      validate_mask(mask, config)
    except MaskError as e:
      raise MaskError(f"{path}: {e}") from None
  return mask, meta


# ----------------------------------------------------------------------------------
# Scores -> units / matrices.

# kind -> (unit kind, matrices the score is attributed to in per-matrix mode)
_COMPONENT_KINDS: dict[str, tuple[UnitKind, tuple[str, ...]]] = {}
for _names, _unit, _mats in (
    (("q", "query", "head_q"), "attn", ("query",)),
    (("k", "key", "head_k"), "attn", ("key",)),
    (("v", "value", "head_v"), "attn", ("value",)),
    (("o", "z", "output", "head_out", "head", "result"), "attn", ("output",)),
    (("attn", "attn_out", "attention"), "attn", ATTENTION_MATRICES),
    (("mlp_in",), "mlp", ("gating_linear", "value_linear")),
    (("gate", "gating_linear"), "mlp", ("gating_linear",)),
    (("up", "value_linear"), "mlp", ("value_linear",)),
    # "mlp_hidden" is the input of out_linear (AP scores the down projection there).
    (("mlp_out", "mlp_hidden", "down", "out_linear"), "mlp", ("out_linear",)),
    (("mlp",), "mlp", MLP_MATRICES),
):
  for _n in _names:
    _COMPONENT_KINDS[_n] = (_unit, _mats)


def component_kinds() -> tuple[str, ...]:
  """Every component kind `scores_to_units` understands."""
  return tuple(_COMPONENT_KINDS)


def _parse_key(key: Any) -> tuple[int, str]:
  if isinstance(key, tuple) and len(key) == 2:
    layer, kind = key
  elif hasattr(key, "layer") and hasattr(key, "kind"):
    layer, kind = key.layer, key.kind
  else:
    raise ValueError(
        f"score key {key!r} must be (layer, kind) or have .layer and .kind attributes"
    )
  if kind not in _COMPONENT_KINDS:
    raise ValueError(f"score key {key!r}: unknown component kind {kind!r}; expected one of {component_kinds()}")
  return int(layer), str(kind)


@dataclasses.dataclass(frozen=True)
class Selection:
  """Result of turning scores into a mask.

  Attributes:
    mode: "reference" or "per_matrix".
    chosen: selected units (reference) or matrix labels (per_matrix), in pick order.
    scores: the aggregated score of every candidate (signed for units, |.| summed for
      matrices), keyed by `str(unit)` or label.
    mask: the whole-tensor `ParamMask`.
    trained_parameters: weights the mask trains.
    budget: the parameter budget asked for.
  """

  mode: str
  chosen: tuple[Any, ...]
  scores: dict[str, float]
  mask: ParamMask
  trained_parameters: int
  budget: int

  @property
  def units(self) -> tuple[Unit, ...]:
    return tuple(c for c in self.chosen if isinstance(c, Unit))

  def to_json(self) -> dict[str, Any]:
    return {
        "mode": self.mode,
        "chosen": [str(c) for c in self.chosen],
        "scores": self.scores,
        "trained_parameters": self.trained_parameters,
        "budget": self.budget,
    }


def aggregate_unit_scores(
    scores: Mapping[Any, Any], config: Layout
) -> dict[Unit, float]:
  """Signed sum of every component score into its unit (heads can cancel)."""
  out: dict[Unit, float] = {}
  for key, value in scores.items():
    layer, kind = _parse_key(key)
    if not 0 <= layer < layout_config(config).num_layers:
      raise ValueError(f"score key {key!r}: layer outside the model's {layout_config(config).num_layers}")
    arr = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
      raise ValueError(f"score for {key!r} is not finite: {arr}")
    unit = Unit(layer, _COMPONENT_KINDS[kind][0])
    out[unit] = out.get(unit, 0.0) + float(arr.sum())
  return out


def aggregate_matrix_scores(
    scores: Mapping[Any, Any], config: Layout
) -> dict[str, float]:
  """Sum of |component score| per weight matrix label (see the module docstring)."""
  out: dict[str, float] = {}
  for key, value in scores.items():
    layer, kind = _parse_key(key)
    if not 0 <= layer < layout_config(config).num_layers:
      raise ValueError(f"score key {key!r}: layer outside the model's {layout_config(config).num_layers}")
    arr = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
      raise ValueError(f"score for {key!r} is not finite: {arr}")
    for matrix in _COMPONENT_KINDS[kind][1]:
      label = matrix_label(layer, matrix)
      out[label] = out.get(label, 0.0) + float(np.abs(arr).sum())
  return out


def _take_until_budget(ranked, sizes, budget):
  chosen, total = [], 0
  for item in ranked:
    if total >= budget:
      break
    chosen.append(item)
    total += sizes[item]
  return chosen, total


def scores_to_units(
    scores: Mapping[Any, Any],
    config: Layout,
    budget: int,
    *,
    mode: Literal["reference", "per_matrix"] = "reference",
    kinds: Sequence[str] = UNIT_KINDS,
) -> Selection:
  """Picks units (or matrices) by |score| until `budget` weights are trained.

  Args:
    scores: per-component scores, `{(layer, kind): scalar or array}` (module doc).
    config: the model.
    budget: parameter budget (e.g. the FLU mask's trained-parameter count). Items are
      added while the running count is below it, so the result overshoots by less
      than one item, or falls short only if every candidate is taken.
    mode: "reference" (signed sum per unit, whole units) or "per_matrix" (|score|
      per matrix, whole matrices).
    kinds: unit kinds allowed ("attn", "mlp"); ("mlp",) gives the `*_mlps` baselines.
  """
  if budget <= 0:
    raise ValueError(f"budget must be positive, got {budget}")
  bad = set(kinds) - set(UNIT_KINDS)
  if bad:
    raise ValueError(f"kinds {sorted(bad)} not in {UNIT_KINDS}")
  # Ties break by layer then kind so the pick is deterministic.
  if mode == "reference":
    unit_scores = aggregate_unit_scores(scores, config)
    candidates = [u for u in unit_scores if u.kind in kinds]
    ranked = sorted(candidates, key=lambda u: (-abs(unit_scores[u]), u.layer, u.kind))
    sizes = {u: unit_parameter_count(config, u) for u in ranked}
    chosen, total = _take_until_budget(ranked, sizes, budget)
    mask = mask_from_units(config, chosen)
    named_scores = {str(u): unit_scores[u] for u in sorted(unit_scores)}
  elif mode == "per_matrix":
    matrix_scores = aggregate_matrix_scores(scores, config)
    kind_of = lambda label: "attn" if parse_matrix_label(label)[1] in ATTENTION_MATRICES else "mlp"
    candidates = [m for m in matrix_scores if kind_of(m) in kinds]
    ranked = sorted(candidates, key=lambda m: (-matrix_scores[m], parse_matrix_label(m)))
    sizes = {m: int(np.prod(parameter_shape(config, m))) for m in ranked}
    chosen, total = _take_until_budget(ranked, sizes, budget)
    mask = mask_from_labels(config, chosen)
    named_scores = dict(sorted(matrix_scores.items()))
  else:
    raise ValueError(f"mode must be 'reference' or 'per_matrix', got {mode!r}")
  return Selection(
      mode=mode,
      chosen=tuple(chosen),
      scores=named_scores,
      mask=mask,
      trained_parameters=int(total),
      budget=int(budget),
  )


@dataclasses.dataclass(frozen=True)
class MaskResult:
  """A named mask with its trained-parameter count and how it was made.

  Attributes:
    name: method name ("flu", "random", "ap", "ap_mlps", ...).
    mask: the `ParamMask`.
    trained_parameters: weights it trains.
    details: JSON-friendly provenance (chosen units, seed, budget, ...).
  """

  name: str
  mask: ParamMask
  trained_parameters: int
  details: dict[str, Any] = dataclasses.field(default_factory=dict)

  @classmethod
  def make(
      cls, name: str, mask: ParamMask, config: Layout, **details: Any
  ) -> "MaskResult":
    details.setdefault("units", [str(u) for u in mask_units(mask, config)])
    details.setdefault("labels", trained_labels(mask))
    return cls(name, mask, trained_parameter_count(mask, config), details)

  def to_json(self) -> dict[str, Any]:
    return {"name": self.name, "trained_parameters": self.trained_parameters, **self.details}

  def save(self, path: str | os.PathLike, config: Layout) -> None:
    save_mask(path, self.mask, config, metadata=self.to_json())
