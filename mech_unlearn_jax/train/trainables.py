"""Trainables: what a training run changes, and everything it keeps frozen.

Everything that is trained (a parameter-mask split of the model, LoRA adapters, a soft
prompt, ...) is a *trainable pytree* `params` plus a `Trainable`: a registered pytree
holding everything frozen (the unbound model and the frozen weights) that the jitted
step receives as an ordinary argument. It is never closed over, so frozen weights are
inputs of the step, not constants baked into the executable, and they are never
differentiated: a localized step pays neither for their gradients (no [vocabulary,
embedding] gradient of the tied table is ever formed) nor for their optimizer state.

Constructors return `(params, trainable, update_mask_or_None)`:
  * `mask_trainable(model, mask)`: the labels a `ParamMask` selects, trained in place.
    Sub-tensor masks (heads, neurons) train the whole tensor, and the step multiplies
    its gradients and updates by the elementwise `update_mask`.
  * `lora_trainable(model, rank=, alpha=, seed=, targets=)`: low-rank adapters
    W x + (alpha / r) B A x on the blocks' linear maps; only A and B are trained.

Parameter masks: a `ParamMask` maps EVERY parameter label of a model to a bool (the
whole tensor is trained or frozen) or a bool array of the parameter's shape in its
named-shape order. `validate_mask` is the one validator (`localize/masks.py`
delegates to it): only the linear maps of the transformer blocks (attention query,
key, value, output; MLP gate, up, down) may be trained. Embeddings, norms and the
unembedding always stay frozen (METHOD §2); with tied embeddings a trained table
would also move the unembedding, and its gradient is the one [vocabulary, embedding]
buffer a localized step must never build.

Axis vocabulary added here: "lowrank" (the inner axis of a LoRA adapter, as in
penzai's `toolshed/lora.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, Union

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from mech_unlearn_jax import sharding
from mech_unlearn_jax.models.config import TransformerConfig
from mech_unlearn_jax.models.transformer import (
    CausalLM,
    TokenEmbeddingLookup,
    build_transformer,
    parameters_by_label,
)

# label -> bool (whole tensor) or bool array of the parameter's named-shape order.
ParamMask = dict[str, Union[bool, np.ndarray]]
# A model (its own axis order) or a config (the order of a freshly built model).
Layout = Union[TransformerConfig, CausalLM]

LOWRANK_AXIS = "lowrank"
# The blocks' linear maps, by the last component of their parameter label.
LORA_TARGETS = (
    "query", "key", "value", "output", "gating_linear", "value_linear", "out_linear"
)
LORA_FORWARD_MODES = ("auto", "factored", "folded")
_TARGET_ALIASES = {
    "q": "query", "k": "key", "v": "value", "o": "output",
    "gate": "gating_linear", "up": "value_linear", "down": "out_linear",
}


class Trainable(Protocol):
  """What the step and the loop need from a trainable (see the module docstring).

  Implementations may also define `spec() -> dict` (JSON): it is recorded with
  checkpoints, so a resumed run must be built the same way.
  """

  def bind(self, params: Any, compute_dtype: str = "float32") -> CausalLM:
    """The model to run inside the loss (traced), callable like the base model."""

  def project(self, params: Any) -> Any:
    """Constraint applied to params after every optimizer update."""

  def merge(self, params: Any) -> CausalLM:
    """A concrete model with the trained params in it, for evaluation."""


# ----------------------------------------------------------------------------------
# Layouts and the one mask validator.


class MaskError(ValueError):
  """A mask does not fit the model it is applied to."""


@functools.lru_cache(maxsize=16)
def _config_layout(config: TransformerConfig) -> tuple[dict[str, dict[str, int]], tuple[str, ...]]:
  """(label -> named shape, block linear labels) of a config, without allocating."""
  unbound, values = jax.eval_shape(
      lambda: pz.unbind_params(build_transformer(config, jax.random.key(0)), freeze=True)
  )
  shapes = {v.label: dict(v.value.named_shape) for v in values}
  return shapes, _block_linear_labels(unbound)


def _is_linear_map(layer: Any) -> bool:
  # Norm scales are `pz.nn.Linear`s too, but with every axis parallel (elementwise):
  # a linear map contracts some input axes into some output axes.
  return (
      isinstance(layer, pz.nn.Linear) and bool(layer.in_axis_names) and bool(layer.out_axis_names)
  )


def _block_linear_labels(model: Any) -> tuple[str, ...]:
  # Structural rather than by label spelling: the same layers LoRA adapts.
  linears = pz.select(model.blocks).at_instances_of(pz.nn.Linear).where(_is_linear_map)
  return tuple(lin.weights.label for lin in linears.get_sequence())


def named_shapes(layout: Layout) -> dict[str, dict[str, int]]:
  """Label -> named shape (axis order = the positional order masks use)."""
  if isinstance(layout, TransformerConfig):
    return {k: dict(v) for k, v in _config_layout(layout)[0].items()}
  if isinstance(layout, CausalLM):
    return {k: dict(p.value.named_shape) for k, p in parameters_by_label(layout).items()}
  raise TypeError(f"expected a TransformerConfig or a CausalLM, got {type(layout).__name__}")


def block_matrix_labels(layout: Layout) -> tuple[str, ...]:
  """Labels of the weights of every linear map inside the transformer blocks."""
  if isinstance(layout, TransformerConfig):
    return _config_layout(layout)[1]
  if isinstance(layout, CausalLM):
    return _block_linear_labels(layout)
  raise TypeError(f"expected a TransformerConfig or a CausalLM, got {type(layout).__name__}")


def block_weights_mask(layout: Layout) -> ParamMask:
  """The mask training every block weight matrix whole (full-rank fine-tuning)."""
  trainable = set(block_matrix_labels(layout))
  return {label: label in trainable for label in named_shapes(layout)}


def validate_mask(mask: Mapping[str, Any], layout: Layout) -> dict[str, np.ndarray]:
  """Checks a `ParamMask` against a model (or config); returns label -> bool array.

  Entries are bools (whole tensors) or bool numpy arrays of the parameter's shape in
  the layout's axis order. Whole-tensor entries come back as 0-d arrays. Raises
  MaskError naming missing or unknown labels, entries of the wrong type, dtype or
  shape, and any trained label that is not a block weight matrix.
  """
  shapes = named_shapes(layout)
  editable = set(block_matrix_labels(layout))
  missing = sorted(set(shapes) - set(mask))
  if missing:
    raise MaskError(
        f"mask is missing {len(missing)} parameter label(s), e.g. {missing[:3]};"
        " a mask must cover every parameter label (False = frozen)"
    )
  unknown = sorted(set(mask) - set(shapes))
  if unknown:
    raise MaskError(f"mask has unknown labels (not parameters of the model): {unknown[:3]}")
  out = {}
  for label, named in shapes.items():
    value = mask[label]
    if isinstance(value, (bool, np.bool_)):
      value = np.asarray(value)
    elif not isinstance(value, np.ndarray):
      raise MaskError(
          f"{label}: mask entry must be a bool or a bool numpy array, got {type(value).__name__}"
      )
    elif value.dtype != np.bool_:
      raise MaskError(f"{label}: mask array has dtype {value.dtype}, expected bool")
    else:
      expected = tuple(named.values())
      if value.shape != expected:
        raise MaskError(
            f"{label}: mask array has shape {value.shape}, expected {expected}"
            f" (axes {list(named)}); use a bool for a whole tensor"
        )
    if value.any() and label not in editable:
      raise MaskError(
          f"{label}: only attention and MLP weight matrices may be trained"
          " (embeddings, norms and the unembedding stay frozen)"
      )
    out[label] = value
  return out


# ----------------------------------------------------------------------------------
# Shared machinery: an unbound model plus frozen values plus positional params.


def unbind_frozen(model: CausalLM) -> tuple[Any, dict[str, pz.nx.NamedArray]]:
  """(unbound model with parameter slots, label -> named value)."""
  unbound, values = sharding.unbind_for_jit(model)
  # The row-gather lookup (no per-call copy of the table); models built elsewhere
  # may carry penzai's own lookup.
  unbound = (
      pz.select(unbound)
      .at_instances_of(pz.nn.EmbeddingLookup)
      .apply(lambda layer: TokenEmbeddingLookup(table=layer.table))
  )
  return unbound, {v.label: v.value for v in values}


def cast_floating(tree: Any, dtype) -> Any:
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree
  )


def bind_values(
    unbound: Any,
    frozen_values: Mapping[str, pz.nx.NamedArray],
    param_axes: Sequence[tuple[str, tuple[str, ...]]],
    params: Mapping[str, jax.Array],
    compute_dtype: str,
) -> Any:
  """`unbound` with frozen values and the positional `params` (re-tagged) filled in."""
  values = [pz.ParameterValue(label=k, value=v) for k, v in frozen_values.items()]
  values += [
      pz.ParameterValue(label=k, value=pz.nx.wrap(params[k]).tag(*axes)) for k, axes in param_axes
  ]
  if compute_dtype != "float32":
    dtype = jnp.dtype(compute_dtype)
    values = cast_floating(values, dtype)
    # Model constants (embedding scale, mask values) are cast too, or float32
    # constants would promote every activation back to float32.
    unbound = cast_floating(unbound, dtype)
  return pz.bind_variables(unbound, values)


def concrete_model(unbound: Any, values: Mapping[str, pz.nx.NamedArray]) -> CausalLM:
  """A model with mutable `pz.Parameter`s, as loaders and `build_transformer` make."""
  return pz.bind_variables(unbound, [pz.Parameter(value=v, label=k) for k, v in values.items()])


# ----------------------------------------------------------------------------------
# Parameter-mask trainables.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MaskTrainable:
  """The frozen part of a model whose masked labels are trained.

  Attributes:
    unbound: the model with parameter slots (`pz.unbind_params(model, freeze=True)`).
    frozen_values: label -> named value of every frozen parameter.
    param_axes: static (label, axis names) of every trained label, used to re-tag
      the positional trained arrays.
  """

  unbound: Any
  frozen_values: dict[str, pz.nx.NamedArray]
  param_axes: tuple[tuple[str, tuple[str, ...]], ...] = dataclasses.field(
      metadata={"static": True}
  )

  def bind(self, params: Mapping[str, jax.Array], compute_dtype: str = "float32") -> CausalLM:
    """The model with `params` (label -> positional array) filled in."""
    return bind_values(self.unbound, self.frozen_values, self.param_axes, params, compute_dtype)

  def project(self, params: Any) -> Any:
    """No constraint: the identity."""
    return params

  def merge(self, params: Mapping[str, jax.Array]) -> CausalLM:
    """A concrete model holding `params` (not copied) and the frozen weights."""
    values = dict(self.frozen_values)
    for label, axes in self.param_axes:
      values[label] = pz.nx.wrap(jnp.asarray(params[label])).tag(*axes)
    return concrete_model(self.unbound, values)

  def spec(self) -> dict[str, Any]:
    """JSON description recorded with checkpoints (the labels are in the params)."""
    return {"kind": "mask"}


def mask_trainable(
    model: CausalLM, mask: Mapping[str, Any]
) -> tuple[dict[str, jax.Array], MaskTrainable, dict[str, jax.Array] | None]:
  """Splits a model into (trained arrays, `MaskTrainable`, update mask or None).

  Trained arrays are positional (axes in named-shape order) and are the model's own
  buffers: `train` copies them before donating its state, so the caller's model is
  never invalidated. The update mask is None when every trained label is trained
  whole; otherwise it maps every trained label to a bool array (0-d for whole
  tensors) that gradients and updates are multiplied by.
  """
  masks = validate_mask(mask, model)
  trained = [label for label, m in masks.items() if m.any()]
  if not trained:
    raise MaskError("parameter mask selects no parameter: nothing to train")
  unbound, values = unbind_frozen(model)
  axes = {label: tuple(values[label].named_shape) for label in trained}
  params = {label: values[label].unwrap(*axes[label]) for label in trained}
  trainable = MaskTrainable(
      unbound=unbound,
      frozen_values={k: v for k, v in values.items() if k not in params},
      param_axes=tuple((label, axes[label]) for label in trained),
  )
  partial = [label for label in trained if masks[label].ndim and not masks[label].all()]
  update_mask = None
  if partial:
    update_mask = {
        label: jnp.asarray(masks[label] if label in partial else np.bool_(True))
        for label in trained
    }
  return params, trainable, update_mask


# ----------------------------------------------------------------------------------
# LoRA.


@pz.pytree_dataclass
class LowRankAdapter(pz.nn.Layer):
  """A linear map plus a low-rank update: base(x) + scale * up(down(x)).

  Attributes:
    base: the pretrained `pz.nn.Linear` (its weights stay frozen).
    down: A, the input axes -> "lowrank" map (random init).
    up: B, the "lowrank" -> output axes map (zero init, so the layer starts out
      computing exactly what `base` computes).
    scale: alpha / rank (static).
  """

  base: pz.nn.Linear
  down: pz.nn.Linear
  up: pz.nn.Linear
  scale: float = dataclasses.field(metadata={"pytree_node": False})
  forward_mode: str = dataclasses.field(default="auto", metadata={"pytree_node": False})

  def __call__(self, x: pz.nx.NamedArray, **side_inputs) -> pz.nx.NamedArray:
    if self._fold(x):
      # W + scale * A B, then one contraction: the same function (and gradients, by
      # the chain rule through the sum) as the factored form below.
      weights = self.base.weights.value
      delta = pz.nn.contract(LOWRANK_AXIS, self.down.weights.value, self.up.weights.value)
      folded = weights + (delta * self.scale).astype(weights.dtype)
      return pz.nn.contract(self.base.in_axis_names, x, folded)
    delta = self.up(self.down(x, **side_inputs), **side_inputs)
    return self.base(x, **side_inputs) + delta * self.scale

  def _fold(self, x: pz.nx.NamedArray) -> bool:
    """Whether folding A B into W costs fewer FLOPs for this input (static shapes).

    Per call, forward + backward, beyond the base map: the factored form pays
    ~6 n r (d_in + d_out) for n input vectors; the folded one pays the weight
    gradient 2 n d_in d_out plus forming W + A B and its gradients, ~6 d_in d_out r.
    A big rank on many tokens (the relearning attack: r = 512 on every map) folds;
    a small rank or a single token does not.
    """
    if self.forward_mode != "auto":
      return self.forward_mode == "folded"
    w = self.down.weights.value.named_shape
    d_in = math.prod(w[n] for n in self.base.in_axis_names)
    rank = w[LOWRANK_AXIS]
    out_shape = self.up.weights.value.named_shape
    d_out = math.prod(out_shape[n] for n in self.base.out_axis_names)
    n = math.prod(x.positional_shape) * math.prod(
        size for name, size in x.named_shape.items() if name not in self.base.in_axis_names
    )
    factored = 6 * n * rank * (d_in + d_out)
    folded = 2 * n * d_in * d_out + 6 * d_in * d_out * rank
    return folded < factored


@dataclasses.dataclass(frozen=True)
class LoraAdapterInfo:
  """One adapted matrix: its label, its A and B labels, effective rank and scale."""

  label: str
  a_label: str
  b_label: str
  rank: int
  scale: float


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraTrainable:
  """LoRA adapters on a frozen base model; params are label -> A or B array.

  Attributes:
    unbound: the model with `LowRankAdapter`s, parameter slots everywhere.
    base_unbound: the original model with parameter slots (for `merge`).
    frozen_values: label -> named value of every base parameter.
    param_axes: static (label, axis names) of every A and B.
    adapters: static per-matrix records (effective rank, scale).
    rank, alpha, seed, targets: static, how the adapters were made.
  """

  unbound: Any
  base_unbound: Any
  frozen_values: dict[str, pz.nx.NamedArray]
  param_axes: tuple[tuple[str, tuple[str, ...]], ...] = dataclasses.field(
      metadata={"static": True}
  )
  adapters: tuple[LoraAdapterInfo, ...] = dataclasses.field(metadata={"static": True})
  rank: int = dataclasses.field(metadata={"static": True})
  alpha: float = dataclasses.field(metadata={"static": True})
  seed: int = dataclasses.field(metadata={"static": True})
  targets: tuple[str, ...] = dataclasses.field(metadata={"static": True})

  @property
  def effective_ranks(self) -> dict[str, int]:
    """Adapted label -> rank actually used (the requested rank, capped)."""
    return {a.label: a.rank for a in self.adapters}

  def bind(self, params: Mapping[str, jax.Array], compute_dtype: str = "float32") -> CausalLM:
    """The adapted model (base weights frozen, A and B from `params`)."""
    return bind_values(self.unbound, self.frozen_values, self.param_axes, params, compute_dtype)

  def project(self, params: Any) -> Any:
    """No constraint: the identity."""
    return params

  def merge(self, params: Mapping[str, jax.Array]) -> CausalLM:
    """The base architecture with W + scale * A B folded into each adapted matrix.

    Evaluation then runs the unmodified model code (interventions, probes) at the
    base model's cost. Folding rounds once in float32, so the merged logits equal the
    adapted model's up to float32 rounding, and exactly at initialization (B = 0).
    """
    axes = dict(self.param_axes)
    values = dict(self.frozen_values)
    for info in self.adapters:
      base = values[info.label]
      a = pz.nx.wrap(jnp.asarray(params[info.a_label], jnp.float32)).tag(*axes[info.a_label])
      b = pz.nx.wrap(jnp.asarray(params[info.b_label], jnp.float32)).tag(*axes[info.b_label])
      delta = pz.nn.contract(LOWRANK_AXIS, a, b) * info.scale
      merged = (base.astype(jnp.float32) + delta).astype(base.dtype)
      values[info.label] = merged.order_as(*base.named_shape)
    return concrete_model(self.base_unbound, values)

  def spec(self) -> dict[str, Any]:
    """JSON description recorded with checkpoints."""
    return {
        "kind": "lora", "rank": self.rank, "alpha": self.alpha, "seed": self.seed,
        "targets": list(self.targets), "effective_ranks": self.effective_ranks,
    }


def _normalize_targets(targets: Sequence[str]) -> tuple[str, ...]:
  if isinstance(targets, str):
    targets = (targets,)
  out = []
  for t in targets:
    name = _TARGET_ALIASES.get(t, t)
    if name not in LORA_TARGETS:
      raise ValueError(
          f"unknown LoRA target {t!r}; expected one of {LORA_TARGETS} or aliases"
          f" {tuple(_TARGET_ALIASES)}"
      )
    out.append(name)
  if not out:
    raise ValueError("LoRA needs at least one target")
  return tuple(n for n in LORA_TARGETS if n in out)


def _matrix_name(label: str) -> str:
  return label.rsplit("/", 1)[-1].removesuffix(".weights")


def lora_trainable(
    model: CausalLM,
    *,
    rank: int,
    alpha: float,
    seed: int,
    targets: Sequence[str] = LORA_TARGETS,
    forward_mode: str = "auto",
) -> tuple[dict[str, jax.Array], LoraTrainable, None]:
  """LoRA adapters on the blocks' linear maps -> (params, `LoraTrainable`, None).

  Each targeted `pz.nn.Linear` W (inside the transformer blocks) becomes
  W x + (alpha / r) B A x with A: input axes -> r, B: r -> output axes. r is `rank`
  capped by the smaller side of the matrix (a larger rank adds parameters but no
  expressiveness); the effective rank of every matrix is recorded in
  `trainable.effective_ranks`, and its scale is alpha / effective rank. A is drawn
  from N(0, 1 / fan_in) (seeded per matrix), B is zero, so the initial model computes
  exactly the base model's function. Base weights are frozen inputs of the step;
  only A and B get gradients and optimizer state.

  Args:
    model: the base model (not modified).
    rank: requested adapter rank (>= 1).
    alpha: LoRA alpha (> 0).
    seed: seeds A's initialization.
    targets: matrix names ("query", "key", "value", "output", "gating_linear",
      "value_linear", "out_linear", or q/k/v/o/gate/up/down); default all.
    forward_mode: how an adapted map computes W x + scale B A x: "factored" (through
      the rank-r bottleneck), "folded" (W + scale A B formed first, one contraction),
      or "auto" (per call, whichever costs fewer FLOPs at the input's static shape:
      `LowRankAdapter._fold`). Same function either way; only the cost differs.
  """
  if forward_mode not in LORA_FORWARD_MODES:
    raise ValueError(f"LoRA forward_mode must be one of {LORA_FORWARD_MODES}, got {forward_mode!r}")
  if int(rank) != rank or rank < 1:
    raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
  if not alpha > 0:
    raise ValueError(f"LoRA alpha must be positive, got {alpha!r}")
  targets = _normalize_targets(targets)
  unbound, values = unbind_frozen(model)
  base_unbound = unbound
  key = jax.random.key(seed)
  params: dict[str, jax.Array] = {}
  param_axes: list[tuple[str, tuple[str, ...]]] = []
  adapters: list[LoraAdapterInfo] = []

  def adapt(linear: pz.nn.Linear) -> LowRankAdapter:
    label = linear.weights.label
    named = values[label].named_shape
    parallel = [n for n in named if n not in linear.in_axis_names + linear.out_axis_names]
    size = lambda names: math.prod(named[n] for n in names)
    r = int(min(rank, size(linear.in_axis_names), size(linear.out_axis_names)))
    prefix = label.removesuffix(".weights")
    a_label, b_label = f"{prefix}/lora_a.weights", f"{prefix}/lora_b.weights"
    a_axes = (*parallel, *linear.in_axis_names, LOWRANK_AXIS)
    b_axes = (*parallel, LOWRANK_AXIS, *linear.out_axis_names)
    a_shape = tuple(r if n == LOWRANK_AXIS else named[n] for n in a_axes)
    b_shape = tuple(r if n == LOWRANK_AXIS else named[n] for n in b_axes)
    # One key per matrix, folded from its label, so an adapter's draw does not
    # depend on which other matrices are targeted.
    a_key = jax.random.fold_in(key, zlib.crc32(label.encode()) & 0x7FFFFFFF)
    params[a_label] = jax.random.normal(a_key, a_shape, jnp.float32) / math.sqrt(
        size(linear.in_axis_names)
    )
    params[b_label] = jnp.zeros(b_shape, jnp.float32)
    param_axes.extend([(a_label, a_axes), (b_label, b_axes)])
    scale = float(alpha) / r
    adapters.append(LoraAdapterInfo(label, a_label, b_label, r, scale))
    return LowRankAdapter(
        base=linear,
        down=pz.nn.Linear(
            weights=pz.ParameterSlot(a_label), in_axis_names=linear.in_axis_names,
            out_axis_names=(LOWRANK_AXIS,),
        ),
        up=pz.nn.Linear(
            weights=pz.ParameterSlot(b_label), in_axis_names=(LOWRANK_AXIS,),
            out_axis_names=linear.out_axis_names,
        ),
        scale=scale,
        forward_mode=forward_mode,
    )

  adapted = (
      pz.select(unbound)
      .at(lambda m: m.blocks)
      .at_instances_of(pz.nn.Linear)
      .where(lambda lin: _is_linear_map(lin) and _matrix_name(lin.weights.label) in targets)
      .apply(adapt)
  )
  found = {_matrix_name(a.label) for a in adapters}
  absent = [t for t in targets if t not in found]
  if absent:
    raise ValueError(f"LoRA targets {absent} match no linear map in the model's blocks")
  trainable = LoraTrainable(
      unbound=adapted,
      base_unbound=base_unbound,
      frozen_values=values,
      param_axes=tuple(param_axes),
      adapters=tuple(adapters),
      rank=int(rank),
      alpha=float(alpha),
      seed=int(seed),
      targets=targets,
  )
  return params, trainable, None


def count_parameters(params: Any) -> int:
  """Number of trained scalars in a params pytree."""
  return int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(params)))
