"""Batching and forward passes on plain arrays.

Library code outside `models/` talks to the model through these functions with plain
`jax.Array`s (`tokens_BxL`, `positions_BxL`), so it does not need to know about
named axes. Batches are left-padded (see `transformer.py`): the last real token of
every row is at column -1 and padding has position -1.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from mech_unlearn_jax import sharding
from mech_unlearn_jax.models.transformer import CausalLM


def left_pad(
    sequences: Sequence[Sequence[int]],
    pad_id: int = 0,
    length: int | None = None,
    multiple: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists into `(tokens_BxL, positions_BxL)` int32 arrays.

  Args:
    sequences: token id lists (e.g. with BOS).
    pad_id: id written into padding (never attended to).
    length: pad to exactly this length (error if a sequence is longer).
    multiple: round the length up to a multiple of this, so that jitted functions
      see few distinct shapes.
  """
  if not sequences:
    raise ValueError("left_pad needs at least one sequence")
  longest = max(len(s) for s in sequences)
  if min(len(s) for s in sequences) == 0:
    raise ValueError("left_pad got an empty token sequence")
  if length is None:
    length = -(-longest // multiple) * multiple
  elif longest > length:
    raise ValueError(f"a sequence has {longest} tokens, more than length={length}")
  tokens = np.full((len(sequences), length), pad_id, dtype=np.int32)
  positions = np.full((len(sequences), length), -1, dtype=np.int32)
  for row, seq in enumerate(sequences):
    n = len(seq)
    tokens[row, length - n :] = np.asarray(seq, dtype=np.int32)
    positions[row, length - n :] = np.arange(n, dtype=np.int32)
  return tokens, positions


def named_inputs(tokens_BxL, positions_BxL) -> tuple[pz.nx.NamedArray, pz.nx.NamedArray]:
  """Wraps `(tokens_BxL, positions_BxL)` as named arrays with axes batch, seq."""
  return (
      pz.nx.wrap(jnp.asarray(tokens_BxL)).tag("batch", "seq"),
      pz.nx.wrap(jnp.asarray(positions_BxL)).tag("batch", "seq"),
  )


def full_logits(model: CausalLM, tokens_BxL, positions_BxL, **side_inputs) -> jax.Array:
  """Logits at every position, shape [B, L, V]."""
  tokens, positions = named_inputs(tokens_BxL, positions_BxL)
  logits = model(tokens, token_positions=positions, **side_inputs)
  return logits.untag("batch", "seq", "vocabulary").unwrap()


def logits_at(
    model: CausalLM, tokens_BxL, positions_BxL, columns_BxK, **side_inputs
) -> jax.Array:
  """Logits at selected columns only, shape [B, K, V]."""
  tokens, positions = named_inputs(tokens_BxL, positions_BxL)
  columns = pz.nx.wrap(jnp.asarray(columns_BxK, dtype=jnp.int32)).tag("batch", "selected")
  logits = model(tokens, token_positions=positions, selected_positions=columns, **side_inputs)
  return logits.untag("batch", "selected", "vocabulary").unwrap()


def last_logits(model: CausalLM, tokens_BxL, positions_BxL, **side_inputs) -> jax.Array:
  """Logits at the last column (the last real token of a left-padded batch), [B, V]."""
  tokens_BxL = jnp.asarray(tokens_BxL)
  last = jnp.full((tokens_BxL.shape[0], 1), tokens_BxL.shape[1] - 1, dtype=jnp.int32)
  return logits_at(model, tokens_BxL, positions_BxL, last, **side_inputs)[:, 0]


def residual_stream(model: CausalLM, tokens_BxL, positions_BxL, **side_inputs) -> jax.Array:
  """Final-normed residual stream, shape [B, L, D]."""
  tokens, positions = named_inputs(tokens_BxL, positions_BxL)
  hidden = model.residual(tokens, token_positions=positions, **side_inputs)
  return hidden.untag("batch", "seq", "embedding").unwrap()


def unembed(model: CausalLM, hidden_BxLxD: jax.Array) -> jax.Array:
  """Vocabulary logits [B, L, V] of final-normed residual vectors (`residual_stream`)."""
  hidden = pz.nx.wrap(hidden_BxLxD).tag("batch", "seq", "embedding")
  return model.unembed(hidden).untag("batch", "seq", "vocabulary").unwrap()


def map_vocab_rows(row_fn, hidden_BxLxD: jax.Array, *row_args: jax.Array):
  """`row_fn(hidden_1xLxD, *args_1x...)` for one row at a time (`jax.lax.map`), stacked.

  For reductions over full-vocabulary logits (text loss, KL): the body runs once on
  the whole batch, and only one row's [L, V] logits are live at a time, a 1/B share of
  what unembedding the batch at once holds (262k-way vocabulary: ~1 MiB per token).
  """
  return jax.lax.map(
      lambda xs: row_fn(*(x[None] for x in xs)), (hidden_BxLxD, *row_args)
  )


def _frozen_last_logits(unbound, params, tokens_BxL, positions_BxL):
  return last_logits(pz.bind_variables(unbound, params), tokens_BxL, positions_BxL)


_jitted_last_logits = jax.jit(_frozen_last_logits)


def jitted_last_logits(model: CausalLM, tokens_BxL, positions_BxL) -> jax.Array:
  """`last_logits` through one cached jit; parameters are passed as frozen inputs."""
  unbound, params = sharding.unbind_for_jit(model)
  return _jitted_last_logits(unbound, params, tokens_BxL, positions_BxL)
