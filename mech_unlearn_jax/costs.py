"""What an edit step costs per device, from shapes alone (no weights allocated).

For a model config, a parameter mask and a data-parallel mesh of `n` devices this
module computes per-device bytes of

  (a) the float32 master weights,
  (b) the float32 gradients and AdamW state (two moments) of the trained leaves,
  (c) the activations one edit step saves for its backward pass, and
  (d) the largest transient: one weight tensor gathered whole (and, with bfloat16
      compute, the bfloat16 copy of the weights),

and the smallest mesh (1, 2, 4, 8, ..., up to the batch size) on which their sum fits
an accelerator with 10% headroom, optionally with gradient accumulation.

Parameters come from `jax.eval_shape` of `build_transformer` and the optimizer state
from `jax.eval_shape` of the edit optimizer's `init` (`train.step.make_optimizer`),
so the byte counts are those of the arrays the library would allocate. Placement is
FSDP over the "data" mesh axis: `fsdp_rules` maps every parameter axis name to "data",
and `sharding.partition_spec` then shards the first axis (in named-shape order) that
divides the mesh; a leaf none of whose axes divides stays replicated. So sharded
leaves cost exactly 1/n of their bytes per device and replicated leaves cost their
full bytes; there is no other rounding. Batches are sharded along "batch" by the same
rule (`sharding.shard_batch`): 64 examples split over up to 64 devices, and beyond
that (64 % n != 0) they are replicated.

Activations are an analytic estimate (`activation_elements` documents the formula).
XLA fuses and reuses buffers, so a compiler's peak differs: on the CPU backend the
compiled float32 train step's temporaries are 0.82-1.05 x the estimated activations +
gradients (Gemma 3 270M and 1B, Llama 3 8B, with and without gradient accumulation;
`python -m benchmarks.costs --xla_check=...`, see docs/costs.md). bfloat16 compute is
costed but not verified (the CPU backend computes many bfloat16 ops in float32).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, PartitionSpec

from mech_unlearn_jax import sharding
from mech_unlearn_jax.batch import FactBatch
from mech_unlearn_jax.models import config as config_lib
from mech_unlearn_jax.models import transformer
from mech_unlearn_jax.models.config import TransformerConfig
from mech_unlearn_jax.train import losses, trainables
from mech_unlearn_jax.train import step as step_lib

MaskKind = Literal["fact_lookup", "nonlocalized"]

GIB = 2**30

# Accelerators the fit search reports (capacity in bytes of device memory).
ACCELERATORS: dict[str, int] = {
    "16 GB GPU": 16 * GIB,
    "80 GB GPU": 80 * GIB,
    "TPU v5e (16 GB HBM)": 16 * GIB,
}

# The models the cost table covers.
COST_MODELS: tuple[str, ...] = (
    "gemma3-270m", "gemma3-1b", "gemma3-4b", "gemma3-12b", "gemma3-27b", "llama3-8b",
)

_ATTENTION = ("query", "key", "value", "output")
_MLP = ("gating_linear", "value_linear", "out_linear")


@dataclasses.dataclass(frozen=True)
class EditWorkload:
  """The batch of one edit step (the paper's: 64 + 64 prompts, 64 text windows).

  Attributes:
    forget_batch, maintain_batch: fact prompts per step and term.
    fact_prompt_tokens: tokens per fact prompt (the one-shot sports prompt is ~24).
    retain_batch: general-text windows per step.
    retain_tokens: tokens per window.
    compute_dtype: dtype of activations ("float32" is the library's default).
    num_microbatches: gradient accumulation (`train.EditConfig.num_microbatches`): only one
      micro-batch's activations are alive at a time.
  """

  forget_batch: int = 64
  maintain_batch: int = 64
  fact_prompt_tokens: int = 24
  retain_batch: int = 64
  retain_tokens: int = 100
  compute_dtype: str = "float32"
  num_microbatches: int = 1


@dataclasses.dataclass(frozen=True)
class CostRow:
  """Per-device bytes of one (model, mask, mesh size).

  Attributes:
    model: preset name.
    mask: "fact_lookup" or "nonlocalized".
    trained_layers: layers whose matrices the mask trains.
    num_devices: devices on the "data" axis.
    parameters, trainable_parameters: counts (whole model, masked).
    weight_bytes: float32 weights, all parameters.
    gradient_bytes: float32 gradients of the trained parameters.
    optimizer_bytes: AdamW state of the trained parameters (mu, nu, step count).
    activation_bytes: saved activations of one step plus the logits' cotangent.
    gathered_bytes: the largest sharded weight tensor, all-gathered whole for its
      use (0 on one device).
    cast_bytes: with a bfloat16 `compute_dtype`, the bfloat16 copy of every weight
      that the trainable's `bind` makes inside the loss (0 in float32).
    num_microbatches: gradient accumulation of the step.
  """

  model: str
  mask: str
  trained_layers: tuple[int, ...]
  num_devices: int
  parameters: int
  trainable_parameters: int
  weight_bytes: int
  gradient_bytes: int
  optimizer_bytes: int
  activation_bytes: int
  gathered_bytes: int
  cast_bytes: int = 0
  num_microbatches: int = 1

  @property
  def total_bytes(self) -> int:
    """Peak per-device bytes of the step.

    Weights, gradients and optimizer state live throughout. The backward pass adds
    the activations, a gathered weight, (bfloat16) the cast weights and, when
    gradients are accumulated, the micro-batch's gradient next to the running sum;
    the optimizer update, which runs after the activations are freed, adds one
    trainable-sized buffer (the updates).
    """
    resident = self.weight_bytes + self.gradient_bytes + self.optimizer_bytes
    backward = self.activation_bytes + self.gathered_bytes + self.cast_bytes
    if self.num_microbatches > 1:
      backward += self.gradient_bytes
    return resident + max(backward, self.gradient_bytes)


# ----------------------------------------------------------------------------------
# Shapes, masks and placement.


@functools.lru_cache(maxsize=None)
def _parameter_shapes(config: TransformerConfig) -> tuple[tuple[str, tuple[tuple[str, int], ...]], ...]:
  # Cached (configs are hashable): the fit search asks for the same shapes often.
  shapes = transformer.parameter_shapes(config)
  return tuple((label, tuple(named.items())) for label, named in shapes.items())


def parameter_shapes(config: TransformerConfig) -> dict[str, dict[str, int]]:
  """Label -> named shape of every parameter (`jax.eval_shape`, nothing allocated)."""
  return {label: dict(named) for label, named in _parameter_shapes(config)}


def parameter_count(config: TransformerConfig) -> int:
  """Number of weights of the model."""
  return sum(math.prod(named.values()) for named in parameter_shapes(config).values())


def fact_lookup_layers(config: TransformerConfig) -> tuple[int, ...]:
  """The "few early MLPs" of the fact-lookup mask used for costs.

  k = round(num_layers / 6) consecutive layers starting at layer k, i.e. the second
  sixth of the depth (Gemma 3 270M: MLPs 3-5, where the automated fact-lookup
  procedure puts the sports facts). Only the count matters for weights and optimizer
  state; the first layer sets how many layers keep activations for the backward pass.
  """
  k = max(1, round(config.num_layers / 6))
  return tuple(range(k, min(2 * k, config.num_layers)))


def mask_labels(config: TransformerConfig, kind: MaskKind) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """(trained parameter labels, trained layers) of a mask kind.

  "fact_lookup": gate, up and down of the MLPs of `fact_lookup_layers`;
  "nonlocalized": every attention (q, k, v, o) and MLP matrix of every layer.
  """
  if kind == "fact_lookup":
    layers, names = fact_lookup_layers(config), [f"mlp/{m}" for m in _MLP]
  elif kind == "nonlocalized":
    layers = tuple(range(config.num_layers))
    names = [f"attention/{a}" for a in _ATTENTION] + [f"mlp/{m}" for m in _MLP]
  else:
    raise ValueError(f"mask kind must be 'fact_lookup' or 'nonlocalized', got {kind!r}")
  labels = tuple(f"transformer/block_{i}/{n}.weights" for i in layers for n in names)
  known = parameter_shapes(config)
  unknown = [label for label in labels if label not in known]
  if unknown:  # the label scheme of transformer.py changed under us
    raise ValueError(f"mask labels {unknown[:3]} are not parameters of the model")
  return labels, layers


def data_mesh(num_devices: int) -> AbstractMesh:
  """A ("data", "model") = (n, 1) mesh without devices (shapes only)."""
  return AbstractMesh((num_devices, 1), ("data", "model"))


def fsdp_rules(shapes: Mapping[str, Mapping[str, int]]) -> dict[str, str]:
  """Rules for `sharding.partition_spec` that map every parameter axis to "data".

  `partition_spec` uses a mesh axis once per array and only where it divides the
  axis size, so each leaf is sharded along its first divisible axis: FSDP.
  """
  return {"batch": "data", **{axis: "data" for named in shapes.values() for axis in named}}


def fsdp_specs(shapes: Mapping[str, Mapping[str, int]], mesh: AbstractMesh) -> dict[str, PartitionSpec]:
  """Label -> PartitionSpec (positional axes in named-shape order) under FSDP."""
  rules = fsdp_rules(shapes)
  return {
      label: sharding.partition_spec(named, tuple(named), mesh, rules)
      for label, named in shapes.items()
  }


def shard_bytes(shape: Sequence[int], itemsize: int, spec: PartitionSpec, mesh: AbstractMesh) -> int:
  """Bytes of one device's shard of an array placed with `spec` on `mesh`."""
  local = list(shape)
  for i, axis in enumerate(tuple(spec)):
    if axis is not None:
      size = mesh.shape[axis]
      if local[i] % size:  # partition_spec never does this; guard hand-made specs
        raise ValueError(f"axis {i} of {tuple(shape)} does not divide mesh axis {axis}={size}")
      local[i] //= size
  return math.prod(local) * itemsize


def weight_bytes_per_device(
    config: TransformerConfig, num_devices: int, labels: Iterable[str] | None = None,
    dtype: str = "float32",
) -> int:
  """Per-device bytes of the parameters `labels` (default: all) under FSDP."""
  shapes = parameter_shapes(config)
  mesh = data_mesh(num_devices)
  specs = fsdp_specs(shapes, mesh)
  itemsize = jnp.dtype(dtype).itemsize
  chosen = shapes if labels is None else {label: shapes[label] for label in labels}
  return sum(
      shard_bytes(tuple(named.values()), itemsize, specs[label], mesh)
      for label, named in chosen.items()
  )


def optimizer_bytes_per_device(
    config: TransformerConfig, labels: Iterable[str], num_devices: int,
    edit_config: step_lib.EditConfig = step_lib.EditConfig(),
) -> int:
  """Per-device bytes of the edit optimizer's state for the trained `labels`.

  The state's shapes come from `jax.eval_shape(optimizer.init)` on abstract trainable
  arrays (what `train.step.init_state` allocates: frozen leaves get none). A state leaf
  under a parameter's label (Adam's mu and nu) is sharded like that parameter; the
  rest (step counts) is replicated.
  """
  shapes = parameter_shapes(config)
  labels = tuple(labels)
  mesh = data_mesh(num_devices)
  specs = fsdp_specs(shapes, mesh)
  trainable = {
      label: jax.ShapeDtypeStruct(tuple(shapes[label].values()), jnp.float32) for label in labels
  }
  state = jax.eval_shape(step_lib.make_optimizer(edit_config).init, trainable)
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    label = next((k for k in keys if k in trainable), None)
    mirrors_param = label is not None and leaf.shape == trainable[label].shape
    spec = specs[label] if mirrors_param else PartitionSpec()
    total += shard_bytes(leaf.shape, jnp.dtype(leaf.dtype).itemsize, spec, mesh)
  return total


# ----------------------------------------------------------------------------------
# Activations.


def layer_activation_elements(config: TransformerConfig, tokens: int) -> int:
  """Elements one transformer layer saves for backward, per token of a sequence.

  With d = embedding, H/K = query/KV heads, p = head dim, F = MLP hidden, T = tokens:
    (4 + n_post) d   RMSNorm inputs and outputs: pre-attention and pre-MLP norms (in
                     and out), and the input of each post-norm (n_post = 2 for
                     Gemma's sandwich norms, 0 for Llama)
    (2 + qk)(H+K) p  q and k entering the score einsum, v, the attention output
                     entering the output projection, and (qk = 1 with QK-norm) q, k
                     before their norm
    H T              softmax probabilities (penzai computes dense T x T scores; the
                     sliding window only masks)
    4 F              gate pre-activation, up, activated gate, their product (the
                     input of the down projection)
  """
  d, p, h, k = config.embedding_dim, config.head_dim, config.num_heads, config.num_kv_heads
  qk = 1 if config.qk_norm else 0
  n_post = int(config.post_attn_norm) + int(config.post_ffw_norm)
  return (4 + n_post) * d + (2 + qk) * (h + k) * p + h * tokens + 4 * config.mlp_hidden_dim


def activation_elements(
    config: TransformerConfig, workload: EditWorkload, first_trained_layer: int, batch_divisor: int = 1
) -> int:
  """Elements of activations alive at the start of an edit step's backward pass.

  Per sequence of T tokens whose logits are taken at S positions (S = 1 for fact
  prompts, whose answer is read at the last position; S = T for retain windows):

    T * (L_saved * layer_activation_elements(T) + 2 d)  +  2 * S * V

  where L_saved = num_layers - first_trained_layer: JAX saves residuals only for
  operations that depend on trained parameters, so the frozen layers below the first
  trained one save nothing. 2 d is the final norm's input and output. The logits are
  counted twice: `train.losses.softmax_cross_entropy` keeps them for its backward, and their
  cotangent, the same size, is formed from them (V = vocabulary, 262k for Gemma: for
  the retain windows this term dominates). Each term's batch is divided by
  `batch_divisor` (its share on one device).
  """
  if not 0 <= first_trained_layer <= config.num_layers:
    raise ValueError(f"first_trained_layer={first_trained_layer} outside 0..{config.num_layers}")
  saved_layers = config.num_layers - first_trained_layer
  d, v = config.embedding_dim, config.vocab_size

  def per_sequence(tokens: int, logit_positions: int) -> int:
    body = tokens * (saved_layers * layer_activation_elements(config, tokens) + 2 * d)
    return body + 2 * logit_positions * v

  terms = (
      (workload.forget_batch, workload.fact_prompt_tokens, 1),
      (workload.maintain_batch, workload.fact_prompt_tokens, 1),
      (workload.retain_batch, workload.retain_tokens, workload.retain_tokens),
  )
  total = 0
  for batch, tokens, positions in terms:
    if batch:
      total += math.ceil(batch / batch_divisor) * per_sequence(tokens, positions)
  return total


def batch_shards(batch: int, num_devices: int) -> int:
  """How many ways `sharding.partition_spec` splits a batch axis over the mesh."""
  spec = sharding.partition_spec({"batch": batch}, ("batch",), data_mesh(num_devices))
  return num_devices if tuple(spec) == ("data",) else 1


def activation_bytes_per_device(
    config: TransformerConfig, workload: EditWorkload, first_trained_layer: int, num_devices: int
) -> int:
  """Per-device activation bytes of one micro-batch.

  Each term's micro-batch (batch / num_microbatches examples) is sharded over "data"
  when it divides the mesh, and replicated otherwise.
  """
  itemsize = jnp.dtype(workload.compute_dtype).itemsize
  m = workload.num_microbatches
  total = 0
  for name in ("forget", "maintain", "retain"):
    batch = getattr(workload, f"{name}_batch")
    if not batch:
      continue
    only = dataclasses.replace(
        workload, **{f"{other}_batch": 0 for other in ("forget", "maintain", "retain") if other != name}
    )
    divisor = m * batch_shards(math.ceil(batch / m), num_devices)
    total += activation_elements(config, only, first_trained_layer, batch_divisor=divisor)
  return total * itemsize


def gathered_bytes(config: TransformerConfig, num_devices: int, compute_dtype: str = "float32") -> int:
  """The largest sharded weight tensor, whole: FSDP all-gathers a weight to use it.

  For Gemma this is the 262k-row embedding table (the tied unembedding), which every
  step uses whole. Replicated leaves (all of them on one device) need no gather.
  """
  shapes = parameter_shapes(config)
  specs = fsdp_specs(shapes, data_mesh(num_devices))
  itemsize = jnp.dtype(compute_dtype).itemsize
  sharded = [
      math.prod(named.values()) for label, named in shapes.items()
      if any(axis is not None for axis in tuple(specs[label]))
  ]
  return max(sharded, default=0) * itemsize


def compiled_step_memory(
    config: TransformerConfig, kind: MaskKind, workload: EditWorkload = EditWorkload()
) -> jax.stages.CompiledMemoryStats:
  """XLA's buffer sizes for the real `train.step.train_step` on one device.

  The step is lowered and compiled on abstract inputs (`jax.eval_shape` of the model,
  its mask split and the train state; `ShapeDtypeStruct` batches), so nothing is
  allocated. Compare `temp_size_in_bytes` with activations + gradients (+ cast
  weights) of `cost_row(..., 1, workload)`, and `argument_size_in_bytes` with weights
  + optimizer state.
  """
  labels, _ = mask_labels(config, kind)
  mask = {label: label in labels for label in parameter_shapes(config)}
  params, trainable, update_mask = jax.eval_shape(
      lambda: trainables.mask_trainable(transformer.build_transformer(config, jax.random.key(0)), mask)
  )
  m = workload.num_microbatches
  edit_config = step_lib.EditConfig(
      forget_batch_size=workload.forget_batch, maintain_batch_size=workload.maintain_batch,
      retain_batch_size=workload.retain_batch, num_microbatches=m,
      compute_dtype=workload.compute_dtype,
  )
  ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)

  def facts(batch):
    b, length = batch // m, workload.fact_prompt_tokens
    return FactBatch(
        tokens_BxL=ints(m, b, length), positions_BxL=ints(m, b, length),
        answer_ids_B=ints(m, b), wrong_ids_BxK=ints(m, b, 2),
        subject_mask_BxL=jax.ShapeDtypeStruct((m, b, length), jnp.bool_),
    )

  text_shape = (m, workload.retain_batch // m, workload.retain_tokens)
  batch = losses.EditBatch(
      forget=facts(workload.forget_batch) if workload.forget_batch else None,
      maintain=facts(workload.maintain_batch) if workload.maintain_batch else None,
      retain=losses.TextBatch(ints(*text_shape), ints(*text_shape)) if workload.retain_batch else None,
  )
  lowered = step_lib.train_step.lower(
      step_lib.abstract_state(params, edit_config), batch, jax.random.key(0), trainable,
      update_mask, loss_fn=losses.EditLoss(edit_config), config=edit_config,
  )
  return lowered.compile().memory_analysis()


# ----------------------------------------------------------------------------------
# Rows and fits.


def cost_row(
    name: str, kind: MaskKind, num_devices: int, workload: EditWorkload = EditWorkload(),
    config: TransformerConfig | None = None,
) -> CostRow:
  """Per-device costs of editing preset `name` with a `kind` mask on n devices."""
  config = config or config_lib.get_preset(name)
  labels, layers = mask_labels(config, kind)
  shapes = parameter_shapes(config)
  return CostRow(
      model=name,
      mask=kind,
      trained_layers=layers,
      num_devices=num_devices,
      parameters=parameter_count(config),
      trainable_parameters=sum(math.prod(shapes[label].values()) for label in labels),
      weight_bytes=weight_bytes_per_device(config, num_devices),
      gradient_bytes=weight_bytes_per_device(config, num_devices, labels),
      optimizer_bytes=optimizer_bytes_per_device(config, labels, num_devices),
      activation_bytes=activation_bytes_per_device(config, workload, min(layers), num_devices),
      gathered_bytes=gathered_bytes(config, num_devices, workload.compute_dtype),
      cast_bytes=(
          0 if workload.compute_dtype == "float32"
          else weight_bytes_per_device(config, num_devices, dtype=workload.compute_dtype)
      ),
      num_microbatches=workload.num_microbatches,
  )


def cost_rows(
    models: Sequence[str] = COST_MODELS,
    masks: Sequence[MaskKind] = ("fact_lookup", "nonlocalized"),
    mesh_sizes: Sequence[int] = (1, 8, 64),
    workload: EditWorkload = EditWorkload(),
) -> list[CostRow]:
  """One row per (model, mask, mesh size)."""
  return [
      cost_row(name, kind, n, workload) for name in models for kind in masks for n in mesh_sizes
  ]


def fits(row: CostRow, capacity_bytes: int, headroom: float = 0.1) -> bool:
  """Whether the row's total fits `capacity_bytes` with `headroom` left free."""
  return row.total_bytes <= (1.0 - headroom) * capacity_bytes


def smallest_mesh(
    name: str, kind: MaskKind, capacity_bytes: int, *, headroom: float = 0.1,
    workload: EditWorkload = EditWorkload(), max_devices: int | None = None,
    accumulate: bool = False,
) -> tuple[int, int] | None:
  """Smallest (n, micro-batches) with n in 1, 2, 4, ... whose per-device total fits.

  Args:
    name: preset.
    kind: mask kind.
    capacity_bytes: device memory.
    headroom: fraction of the memory left free.
    workload: the step's batch (its `num_microbatches` is used unless `accumulate`).
    max_devices: largest mesh tried; default the largest batch: beyond it the batch
      no longer divides the "data" axis (a bigger mesh needs the "model" axis, which
      this module does not cost).
    accumulate: also try gradient accumulation: for each n the fewest micro-batches
      M (1, 2, 4, ...; per-device micro-batch >= 1 example) that fit.

  Returns:
    (n, M), or None when nothing up to `max_devices` fits.
  """
  batch = max(workload.forget_batch, workload.maintain_batch, workload.retain_batch)
  max_devices = max_devices or batch
  n = 1
  while n <= max_devices:
    choices = [workload.num_microbatches]
    if accumulate:
      choices = [m for m in (2**i for i in range(batch.bit_length())) if n * m <= batch]
    for m in choices:
      trial = dataclasses.replace(workload, num_microbatches=m)
      if fits(cost_row(name, kind, n, trial), capacity_bytes, headroom):
        return n, m
    n *= 2
  return None


def fit_rows(
    models: Sequence[str] = COST_MODELS,
    masks: Sequence[MaskKind] = ("fact_lookup", "nonlocalized"),
    accelerators: Mapping[str, int] = ACCELERATORS,
    headroom: float = 0.1,
    workload: EditWorkload = EditWorkload(),
    accumulate: bool = False,
) -> list[dict[str, object]]:
  """Per (model, mask): `smallest_mesh` for every accelerator (None: none fits)."""
  return [
      {
          "model": name,
          "mask": kind,
          **{
              acc: smallest_mesh(
                  name, kind, cap, headroom=headroom, workload=workload, accumulate=accumulate
              )
              for acc, cap in accelerators.items()
          },
      }
      for name in models
      for kind in masks
  ]
