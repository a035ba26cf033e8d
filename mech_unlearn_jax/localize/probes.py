"""Fact-lookup probes: where in the residual stream the attribute becomes decodable.

The probe itself (logistic regression, seeded split, intervals) lives in
`mech_unlearn_jax/probes.py`; its names are re-exported here so fact-lookup code can
keep using `probes_lib.ProbeConfig` etc. What is specific to fact lookup is which
activations are probed.

Residual "layer" index r = 0 is the (scaled) token embedding, r = i + 1 the residual
stream after block i, so a model with n blocks has n + 1 probe layers. Activations
are read at one column per prompt: the subject's last token ("subject_last") or the
final prompt token ("final").

The latent-knowledge test after an edit (probes fit on maintain facts, applied to
edited ones) is `mech_unlearn_jax/evals/latent.py`.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from mech_unlearn_jax import sharding
from mech_unlearn_jax.batch import FactBatch
from mech_unlearn_jax.models import forward
from mech_unlearn_jax.models.transformer import CausalLM
from mech_unlearn_jax.probes import (  # pylint: disable=unused-import  (re-exported for fact lookup)
    LinearProbes,
    ProbeConfig,
    ProbeResult,
    accuracy_with_interval,
    fit_probes,
    split_indices,
    train_and_evaluate,
)

Position = Literal["subject_last", "final"]


# ----------------------------------------------------------------------------------
# Activations.


def subject_last_columns(subject_mask_BxL: np.ndarray) -> np.ndarray:
  """Column of each row's last subject token; ValueError if a row has none."""
  mask = np.asarray(subject_mask_BxL, dtype=bool)
  empty = np.flatnonzero(~mask.any(axis=1))
  if empty.size:
    raise ValueError(f"rows {empty[:5].tolist()} of subject_mask_BxL have no subject token")
  width = mask.shape[1]
  return (width - 1 - np.argmax(mask[:, ::-1], axis=1)).astype(np.int32)


def position_columns(batch: FactBatch, position: Position) -> np.ndarray:
  """[B] column index of `position` in each row of a left-padded batch."""
  if position == "subject_last":
    return subject_last_columns(batch.subject_mask_BxL)
  if position == "final":
    return np.full((batch.size,), batch.tokens_BxL.shape[1] - 1, dtype=np.int32)
  raise ValueError(f"position must be 'subject_last' or 'final', got {position!r}")


def residuals_by_layer(model: CausalLM, tokens_BxL, positions_BxL) -> list[pz.nx.NamedArray]:
  """Residual streams [embedding, after block 0, ..., after block n-1] (named arrays)."""
  tokens, positions = forward.named_inputs(tokens_BxL, positions_BxL)
  side = {"token_positions": positions}
  x = model.embed(tokens, **side)
  out = [x]
  for block in model.blocks.sublayers:
    x = block(x, **side)
    out.append(x)
  return out


def _residuals_at(unbound, params, tokens_BxL, positions_BxL, columns_BxK):
  model = pz.bind_variables(unbound, params)
  stream = residuals_by_layer(model, tokens_BxL, positions_BxL)
  cols = jnp.asarray(columns_BxK, jnp.int32)

  def gather(x):
    x_BxLxD = x.untag("batch", "seq", "embedding").unwrap()
    return jnp.take_along_axis(x_BxLxD, cols[:, :, None], axis=1)

  return jnp.stack([gather(x) for x in stream])


_jit_residuals_at = jax.jit(_residuals_at)


def residuals_at(model: CausalLM, tokens_BxL, positions_BxL, columns_BxK) -> jax.Array:
  """Residual stream at given columns for every layer: [n_layers + 1, B, K, D]."""
  unbound, params = sharding.unbind_for_jit(model)
  return _jit_residuals_at(unbound, params, tokens_BxL, positions_BxL, columns_BxK)


def batch_activations(
    model: CausalLM, batch: FactBatch, position: Position, chunk: int = 64
) -> np.ndarray:
  """[n_layers + 1, B, D] float32 activations at `position`, in chunks of prompts."""
  cols = position_columns(batch, position)
  parts = []
  for start in range(0, batch.size, chunk):
    stop = min(start + chunk, batch.size)
    acts = residuals_at(
        model,
        batch.tokens_BxL[start:stop],
        batch.positions_BxL[start:stop],
        cols[start:stop, None],
    )
    parts.append(np.asarray(acts[:, :, 0], dtype=np.float32))
  return np.concatenate(parts, axis=1)


# ----------------------------------------------------------------------------------
# The probe curve of fact-lookup localization.


def probe_curve(
    model: CausalLM,
    batch: FactBatch,
    labels_N,
    num_classes: int,
    position: Position = "subject_last",
    config: ProbeConfig = ProbeConfig(),
) -> ProbeResult:
  """Probe accuracy per residual layer at `position` of each prompt."""
  acts = batch_activations(model, batch, position)
  return train_and_evaluate(acts, labels_N, num_classes, config)
