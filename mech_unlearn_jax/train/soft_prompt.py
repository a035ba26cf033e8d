"""Soft-prompt trainables: a learned embedding prefix, and an embedding-level adapter.

Both train a few vectors in the residual stream's input space (the output of the
model's embedding stage, i.e. AFTER Gemma's sqrt(d) scaling: what block 0 reads)
while every weight of the model stays frozen. They are attacks (METHOD §4): how much
of an edited fact can a small, norm-bounded input perturbation bring back?

* `soft_prompt_trainable`: k vectors inserted right AFTER each row's first real token
  (BOS for every prompt this library builds) and before the rest of the prompt. So
  the one-shot example and the question stay intact and contiguous, and BOS keeps
  position 0 (Gemma's attention leans on it). The bound model (`SoftPromptLM`, a
  `CausalLM`) takes the caller's left-padded `tokens_BxL` / `positions_BxL`, runs
  L + k columns, and returns logits (and residuals) for the caller's L columns only:
  column -1 is still each row's last real token. Real tokens after the prefix have
  their positions shifted by k; padding keeps position -1 and stays masked. Each
  vector's L2 norm is bounded by `max_norm` (`project`).
* `embedding_adapter_trainable`: m learned keys and values. Every token embedding e
  attends over the keys (query e / ||e||, scores = keys . query, softmax over the m
  keys) and the attention-weighted sum of the values is added to it:
  e' = e + softmax(K e / ||e||) V. Keys and values each have L2 norm <= `max_norm`,
  so |e' - e| <= max_norm and the score temperature is bounded too. Values start at
  zero, so the initial model computes exactly the base model's function.

What holds for the prefix at initialization: it is not the identity (the prompt's
tokens attend to the prefix vectors), but the bound model equals the base model run
on the longer sequence with those vectors in its embedding (tested with vectors that
are real token embeddings: identical logits to the base model on the token sequence
with those tokens inserted after BOS). Zero vectors are NOT a no-op: their keys are zero (the
projections have no bias, RMSNorm maps 0 to 0), so each gets attention logit 0 rather
than being masked, and dilutes the attention of every later token.

`median_embedding_norm` gives the scale of real token embeddings, to choose
`max_norm` relative to it.

Axis vocabulary: none added (parameters are positional [k, embedding] arrays).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from mech_unlearn_jax.train import trainables as trainables_lib
from mech_unlearn_jax.models import forward
from mech_unlearn_jax.models.transformer import CausalLM

SOFT_PROMPT = "soft_prompt"
ADAPTER_KEYS = "adapter_keys"
ADAPTER_VALUES = "adapter_values"


# ----------------------------------------------------------------------------------
# Norm bounds and the embedding scale.


def clip_norms(vectors_NxD: jax.Array, max_norm: float) -> jax.Array:
  """Rescales each row whose L2 norm exceeds `max_norm` onto the sphere of that radius."""
  norms = jnp.linalg.norm(vectors_NxD.astype(jnp.float32), axis=-1, keepdims=True)
  factor = jnp.minimum(1.0, max_norm / jnp.maximum(norms, 1e-12))
  return (vectors_NxD * factor).astype(vectors_NxD.dtype)


def embed_tokens(model: CausalLM, token_ids) -> jax.Array:
  """[N, D] outputs of the model's embedding stage (scaled, as block 0 sees them)."""
  ids = jnp.asarray(token_ids, jnp.int32)[None]
  tokens, positions = forward.named_inputs(ids, jnp.arange(ids.shape[1], dtype=jnp.int32)[None])
  out = model.embed(tokens, token_positions=positions)
  return out.untag("batch", "seq", "embedding").unwrap()[0]


def median_embedding_norm(model: CausalLM, num_tokens: int = 4096, seed: int = 0) -> float:
  """Median L2 norm of the embedding-stage output over a seeded sample of tokens."""
  vocab = model.config.vocab_size
  ids = np.random.default_rng(seed).choice(vocab, size=min(num_tokens, vocab), replace=False)
  return float(jnp.median(jnp.linalg.norm(embed_tokens(model, ids).astype(jnp.float32), axis=-1)))


def _check_max_norm(max_norm: float) -> float:
  if not (isinstance(max_norm, (int, float)) and np.isfinite(max_norm) and max_norm > 0):
    raise ValueError(f"max_norm must be a positive finite number, got {max_norm!r}")
  return float(max_norm)


# ----------------------------------------------------------------------------------
# Frozen base models (unbound model + frozen values, passed to the step as inputs).


def _bind_frozen(unbound: Any, values: Mapping[str, pz.nx.NamedArray], compute_dtype: str) -> CausalLM:
  """The frozen base model, with weights and constants cast to `compute_dtype`."""
  return trainables_lib.bind_values(unbound, values, (), {}, compute_dtype)


# ----------------------------------------------------------------------------------
# The prefix.


def _insert_after_first(x_LxD, positions_L, prefix_KxD):
  """One row: (embeddings [L+K, D], positions [L+K], caller column -> new column [L])."""
  length, k = x_LxD.shape[0], prefix_KxD.shape[0]
  real = positions_L >= 0
  has_real = real.any()
  first = jnp.argmax(real)  # the first real token (BOS); 0 for an all-padding row
  col = jnp.arange(length + k)
  is_prefix = (col > first) & (col <= first + k)
  source = jnp.clip(jnp.where(col <= first, col, col - k), 0, length - 1)
  prefix_rows = prefix_KxD[jnp.clip(col - first - 1, 0, k - 1)].astype(x_LxD.dtype)
  x = jnp.where(is_prefix[:, None], prefix_rows, x_LxD[source])
  shifted = jnp.where(positions_L[source] >= 0, positions_L[source] + jnp.where(col > first, k, 0), -1)
  prefix_pos = jnp.where(has_real, positions_L[first] + col - first, -1)
  positions = jnp.where(is_prefix, prefix_pos, shifted)
  caller = jnp.arange(length)
  back = jnp.where(caller <= first, caller, caller + k)
  return x, positions.astype(positions_L.dtype), back


def _causal_lm_fields(model: CausalLM) -> dict[str, Any]:
  """The fields a plain `CausalLM` has, read off `model` (a subclass adds its own)."""
  return {f.name: getattr(model, f.name) for f in dataclasses.fields(CausalLM)}


@pz.pytree_dataclass(has_implicitly_inherited_fields=True)  # pytype: disable=wrong-keyword-args
class SoftPromptLM(CausalLM):
  """A `CausalLM` that inserts `soft_prompt_KxD` after each row's first real token.

  Called like the base model (left-padded tokens, "token_positions", optional
  "selected_positions" in the caller's columns); `residual` and the logits cover the
  caller's columns only. Hooks inserted into its blocks see the L + K columns. Rows
  split at a shared prefix run the prefix (with the K vectors) once (`suffix_model`).
  """

  soft_prompt_KxD: jax.Array

  def residual(
      self, tokens: pz.nx.NamedArray, *, token_positions: pz.nx.NamedArray, **side_inputs
  ) -> pz.nx.NamedArray:
    x = self.embed(tokens, token_positions=token_positions, **side_inputs)
    prefix = pz.nx.wrap(jnp.asarray(self.soft_prompt_KxD))
    x, positions, back = pz.nx.nmap(_insert_after_first)(
        x.untag("seq", "embedding"), token_positions.untag("seq"), prefix
    )
    x, positions, back = x.tag("seq", "embedding"), positions.tag("seq"), back.tag("seq")
    side = dict(side_inputs, token_positions=positions)
    h = self.final_norm(self.blocks(x, **side), **side)
    # Back to the caller's columns: its last column is still each row's last token.
    return pz.nx.nmap(lambda h_SxD, i: h_SxD[i])(h.untag("seq", "embedding"), back.untag("seq")).tag(
        "seq", "embedding"
    )

  def suffix_model(self) -> CausalLM:
    """The base model: it runs the columns after a shared prefix that holds the first
    real token, because the soft prompt then lives in the prefix's keys and values
    (`interventions.last_logits_with_prefix`)."""
    return CausalLM(**_causal_lm_fields(self))


def with_soft_prompt(model: CausalLM, soft_prompt_KxD: jax.Array) -> SoftPromptLM:
  """`model` (any bound `CausalLM`) with a soft prefix; see `SoftPromptLM`."""
  return SoftPromptLM(**_causal_lm_fields(model), soft_prompt_KxD=soft_prompt_KxD)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SoftPromptTrainable:
  """A frozen model plus a trained soft prefix; params = {"soft_prompt": [K, D]}.

  Attributes:
    unbound: the base model with parameter slots.
    frozen_values: label -> named value of every base parameter.
    num_vectors, max_norm: static, how the prefix was made.
    seed: the seed it was made with, a scalar array (data, not static: seeded attacks
      of the same shapes then share one traced and compiled training step).
  """

  unbound: Any
  frozen_values: dict[str, pz.nx.NamedArray]
  num_vectors: int = dataclasses.field(metadata={"static": True})
  max_norm: float = dataclasses.field(metadata={"static": True})
  seed: np.ndarray

  def bind(self, params: Mapping[str, jax.Array], compute_dtype: str = "float32") -> SoftPromptLM:
    """The base model with the prefix `params["soft_prompt"]` inserted."""
    base = _bind_frozen(self.unbound, self.frozen_values, compute_dtype)
    prefix = jnp.asarray(params[SOFT_PROMPT])
    if compute_dtype != "float32":
      prefix = prefix.astype(jnp.dtype(compute_dtype))
    return with_soft_prompt(base, prefix)

  def project(self, params: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Each prefix vector's L2 norm clipped to `max_norm`."""
    return {SOFT_PROMPT: clip_norms(params[SOFT_PROMPT], self.max_norm)}

  def merge(self, params: Mapping[str, jax.Array]) -> SoftPromptLM:
    """A concrete `SoftPromptLM` (frozen base weights as ordinary parameters)."""
    base = trainables_lib.concrete_model(self.unbound, self.frozen_values)
    return with_soft_prompt(base, jnp.asarray(params[SOFT_PROMPT], jnp.float32))

  def spec(self) -> dict[str, Any]:
    """JSON description recorded with checkpoints."""
    return {
        "kind": "soft_prompt", "num_vectors": self.num_vectors, "max_norm": self.max_norm,
        "seed": int(self.seed),
    }


def soft_prompt_trainable(
    model: CausalLM, *, num_vectors: int, max_norm: float, seed: int
) -> tuple[dict[str, jax.Array], SoftPromptTrainable, None]:
  """A soft prefix of `num_vectors` vectors -> (params, `SoftPromptTrainable`, None).

  The vectors start as the embeddings (embedding-stage outputs) of `num_vectors`
  seeded random vocabulary tokens, so the attack starts from an in-distribution input,
  clipped to `max_norm`. Nothing of `model` is trained.
  """
  if int(num_vectors) != num_vectors or num_vectors < 1:
    raise ValueError(f"num_vectors must be a positive integer, got {num_vectors!r}")
  max_norm = _check_max_norm(max_norm)
  vocab = model.config.vocab_size
  ids = np.random.default_rng(seed).choice(vocab, size=int(num_vectors), replace=num_vectors > vocab)
  init = clip_norms(embed_tokens(model, ids).astype(jnp.float32), max_norm)
  unbound, values = trainables_lib.unbind_frozen(model)
  trainable = SoftPromptTrainable(
      unbound=unbound, frozen_values=values, num_vectors=int(num_vectors), max_norm=max_norm,
      seed=np.asarray(seed, np.int32),
  )
  return {SOFT_PROMPT: jnp.array(init, copy=True)}, trainable, None


# ----------------------------------------------------------------------------------
# The embedding adapter.


@pz.pytree_dataclass
class EmbeddingAdapter(pz.nn.Layer):
  """e -> e + softmax(keys . e / |e|) . values, per token (axes ..., "embedding").

  Attributes:
    keys_MxD: [M, D] keys (positional arrays).
    values_MxD: [M, D] values; all zero gives exactly the identity.
  """

  keys_MxD: jax.Array
  values_MxD: jax.Array

  def __call__(self, x: pz.nx.NamedArray, **_unused_side_inputs) -> pz.nx.NamedArray:
    keys, values = jnp.asarray(self.keys_MxD), jnp.asarray(self.values_MxD)

    def adapt(e_D):
      e32 = e_D.astype(jnp.float32)
      query = e32 / jnp.maximum(jnp.linalg.norm(e32), 1e-6)
      weights = jax.nn.softmax(keys.astype(jnp.float32) @ query)
      return (e32 + weights @ values.astype(jnp.float32)).astype(e_D.dtype)

    return pz.nx.nmap(adapt)(x.untag("embedding")).tag("embedding")


def with_embedding_adapter(model: CausalLM, keys_MxD: jax.Array, values_MxD: jax.Array) -> CausalLM:
  """A copy of `model` whose embedding stage ends with an `EmbeddingAdapter`."""
  adapter = EmbeddingAdapter(keys_MxD=keys_MxD, values_MxD=values_MxD)
  return dataclasses.replace(model, embed=pz.nn.Sequential([model.embed, adapter]))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EmbeddingAdapterTrainable:
  """A frozen model plus a trained embedding adapter; params = keys and values [M, D].

  Attributes:
    unbound: the base model with parameter slots.
    frozen_values: label -> named value of every base parameter.
    num_keys, max_norm: static, how the adapter was made.
    seed: the seed it was made with, a scalar array (data, not static: seeded attacks
      of the same shapes then share one traced and compiled training step).
  """

  unbound: Any
  frozen_values: dict[str, pz.nx.NamedArray]
  num_keys: int = dataclasses.field(metadata={"static": True})
  max_norm: float = dataclasses.field(metadata={"static": True})
  seed: np.ndarray

  def bind(self, params: Mapping[str, jax.Array], compute_dtype: str = "float32") -> CausalLM:
    """The base model with the adapter after its embedding stage."""
    base = _bind_frozen(self.unbound, self.frozen_values, compute_dtype)
    keys, values = jnp.asarray(params[ADAPTER_KEYS]), jnp.asarray(params[ADAPTER_VALUES])
    if compute_dtype != "float32":
      keys, values = keys.astype(jnp.dtype(compute_dtype)), values.astype(jnp.dtype(compute_dtype))
    return with_embedding_adapter(base, keys, values)

  def project(self, params: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Each key's and each value's L2 norm clipped to `max_norm`."""
    return {name: clip_norms(params[name], self.max_norm) for name in (ADAPTER_KEYS, ADAPTER_VALUES)}

  def merge(self, params: Mapping[str, jax.Array]) -> CausalLM:
    """A concrete model with the adapter (frozen base weights as ordinary parameters)."""
    base = trainables_lib.concrete_model(self.unbound, self.frozen_values)
    return with_embedding_adapter(
        base, jnp.asarray(params[ADAPTER_KEYS], jnp.float32), jnp.asarray(params[ADAPTER_VALUES], jnp.float32)
    )

  def spec(self) -> dict[str, Any]:
    """JSON description recorded with checkpoints."""
    return {
        "kind": "embedding_adapter", "num_keys": self.num_keys, "max_norm": self.max_norm,
        "seed": int(self.seed),
    }


def embedding_adapter_trainable(
    model: CausalLM, *, num_keys: int, max_norm: float, seed: int
) -> tuple[dict[str, jax.Array], EmbeddingAdapterTrainable, None]:
  """An embedding adapter with `num_keys` keys -> (params, trainable, None).

  Keys start as seeded random directions of norm min(1, max_norm) (so attention over
  them starts near uniform), values at zero (so the initial model is exactly the base
  model). Nothing of `model` is trained.
  """
  if int(num_keys) != num_keys or num_keys < 1:
    raise ValueError(f"num_keys must be a positive integer, got {num_keys!r}")
  max_norm = _check_max_norm(max_norm)
  dim = model.config.embedding_dim
  keys = jax.random.normal(jax.random.key(seed), (int(num_keys), dim), jnp.float32)
  keys = keys / jnp.linalg.norm(keys, axis=-1, keepdims=True) * min(1.0, max_norm)
  unbound, values = trainables_lib.unbind_frozen(model)
  trainable = EmbeddingAdapterTrainable(
      unbound=unbound, frozen_values=values, num_keys=int(num_keys), max_norm=max_norm,
      seed=np.asarray(seed, np.int32),
  )
  params = {ADAPTER_KEYS: keys, ADAPTER_VALUES: jnp.zeros((int(num_keys), dim), jnp.float32)}
  return params, trainable, None
