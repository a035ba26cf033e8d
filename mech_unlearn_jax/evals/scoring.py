"""Batched, jitted scoring of facts and text: the numbers every report is made of.

"Accuracy" in the paper is a probability (METHOD §4): for sports, the softmax over the
candidate answer tokens; for CounterFact, the full-vocabulary probability of the first
target token. `score_facts` returns both, plus argmax accuracies, per example, so a
report can aggregate however it needs. Only the last position is unembedded.

A row whose logits are not finite (a diverged edit) scores as wrong with p = 0: an
argmax over NaNs returns index 0, which is the asked-for answer, so without this a
broken model would look perfect.

Many devices: a model placed on a multi-device mesh (`sharding.shard_model`) is
scored with every chunk split over the mesh's "data" axis (chunks padded to a
multiple of it; the padded rows are dropped, or count for nothing in the text
metrics); results are replicated, so every host reads them. Compute dtype: the
functions compute in the model's own dtype; `with_compute_dtype` gives a model that
computes in bfloat16 (the float32 model stays the master copy).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from mech_unlearn_jax import batch as batch_lib
from mech_unlearn_jax.batch import FactBatch
from mech_unlearn_jax import interventions as iv
from mech_unlearn_jax import progress
from mech_unlearn_jax import sharding
from mech_unlearn_jax.models import forward


@dataclasses.dataclass(frozen=True)
class FactScores:
  """Per-example scores of a `FactBatch` (numpy arrays of shape [B]).

  Attributes:
    logprob_full: log p(answer) over the full vocabulary.
    prob_full: p(answer) over the full vocabulary.
    prob_normalized: p(answer) renormalized over the candidates (answer + wrong ids).
    correct_argmax_candidates: the answer has the highest logit among the candidates.
    correct_argmax_full: the answer is the top-1 token of the full vocabulary.
    candidate_probs: [B, C] probabilities normalized over candidates (answer first).
  """

  logprob_full: np.ndarray
  prob_full: np.ndarray
  prob_normalized: np.ndarray
  correct_argmax_candidates: np.ndarray
  correct_argmax_full: np.ndarray
  candidate_probs: np.ndarray

  def summary(self) -> dict[str, float]:
    """Means over examples (the paper's "accuracy" is `prob_normalized`/`prob_full`)."""
    return {
        "prob_full": float(self.prob_full.mean()),
        "prob_normalized": float(self.prob_normalized.mean()),
        "argmax_candidates": float(self.correct_argmax_candidates.mean()),
        "argmax_full": float(self.correct_argmax_full.mean()),
        "n": int(self.prob_full.shape[0]),
    }


def candidate_log_probs(last_logits_BxV: jax.Array, candidate_ids_BxC: jax.Array):
  """Full-vocab log-probs and candidate-normalized log-probs of candidates ([B, C]).

  Candidate ids of -1 (padding) get -inf in the normalized distribution.
  """
  logp = jax.nn.log_softmax(last_logits_BxV.astype(jnp.float32), axis=-1)
  valid = candidate_ids_BxC >= 0
  picked = jnp.take_along_axis(logp, jnp.maximum(candidate_ids_BxC, 0), axis=-1)
  picked = jnp.where(valid, picked, -jnp.inf)
  normalized = picked - jax.nn.logsumexp(picked, axis=-1, keepdims=True)
  return logp, picked, normalized


def scores_from_logits(last_logits_BxV: jax.Array, candidate_ids_BxC: jax.Array) -> dict[str, jax.Array]:
  """Per-example scores of last-position logits (the fields of `FactScores` but p_full).

  Rows with a non-finite log-softmax (NaN or +inf logits) count as wrong: every
  probability 0, log-probability -inf, both argmax flags False.
  """
  logp, picked, normalized = candidate_log_probs(last_logits_BxV, candidate_ids_BxC)
  finite_B = ~jnp.any(jnp.isnan(logp), axis=-1)
  top_full = jnp.argmax(logp, axis=-1)
  return {
      "logprob_full": jnp.where(finite_B, picked[:, 0], -jnp.inf),
      "prob_normalized": jnp.where(finite_B, jnp.exp(normalized[:, 0]), 0.0),
      "correct_argmax_candidates": finite_B & (jnp.argmax(picked, axis=-1) == 0),
      "correct_argmax_full": finite_B & (top_full == candidate_ids_BxC[:, 0]),
      "candidate_probs": jnp.where(finite_B[:, None], jnp.exp(normalized), 0.0),
  }


def _score_chunk_fn(unbound, params, tokens, positions, candidates):
  model = pz.bind_variables(unbound, params)
  return scores_from_logits(forward.last_logits(model, tokens, positions), candidates)


_score_chunk = jax.jit(_score_chunk_fn)


# Shared prefixes: every sports prompt starts with the same one-shot example ("Fact:
# Tiger Woods plays the sport of golf\nFact: ", about half its tokens). Its keys and
# values are computed once per chunk, on one row, and the rows run only their suffixes
# against them (`interventions.with_prefix`); the logits are those of the full rows up
# to float rounding.

def _score_prefixed_chunk_fn(unbound, params, prefix_P, tokens, positions, candidates):
  model = pz.bind_variables(unbound, params)
  return scores_from_logits(iv.last_logits_with_prefix(model, prefix_P, tokens, positions), candidates)


_score_prefixed_chunk = jax.jit(_score_prefixed_chunk_fn)


@functools.lru_cache(maxsize=32)
def _replicated_out(fn, mesh: jax.sharding.Mesh):
  """`fn` jitted with replicated outputs on `mesh` (readable on every host)."""
  return jax.jit(fn, out_shardings=sharding.replicated(mesh))


def _bucket(n: int, cap: int, multiple: int = 1) -> int:
  """Rows a chunk of `n` is padded to: a power of two (>= 8) up to `cap`, rounded up
  to a multiple of `multiple` (the mesh's "data" axis).

  Few distinct shapes means few traces and compiles of the jitted scorer, which for
  small evaluation cells cost more than the padded rows.
  """
  size = 8
  while size < n:
    size *= 2
  return sharding.padded_size(min(max(size, n), max(cap, n)), multiple)


def score_facts(
    model: Any, batch: FactBatch, chunk_size: int = 64, desc: str | None = None, share_prefix: bool = True
) -> FactScores:
  """Scores every example of `batch` at its last position, in jitted chunks.

  `desc` shows a progress bar over the chunks under that name. share_prefix: run the
  tokens every row starts with (e.g. a few-shot example) once (see above); False
  runs every row whole. Models that `interventions.shares_prefixes` rejects
  always run rows whole.
  """
  unbound, params = sharding.unbind_for_jit(model)
  mesh = sharding.mesh_of((unbound, params))
  multiple = sharding.data_size(mesh)
  score = _score_chunk if mesh is None else _replicated_out(_score_chunk_fn, mesh)
  candidates = batch.candidate_ids_BxC
  all_tokens, all_positions = np.asarray(batch.tokens_BxL), np.asarray(batch.positions_BxL)
  # A plain model, or one that says how rows continue after the prefix (a soft prompt
  # inserted after BOS runs inside the prefix: `interventions.shares_prefixes`).
  share_prefix = share_prefix and iv.shares_prefixes(unbound)
  prefix = None
  if batch.prefix_BxP is not None:  # already split (`batch.share_prefix`)
    if not iv.shares_prefixes(unbound):
      raise ValueError(f"a {type(unbound).__name__} cannot score a batch split at a shared prefix")
    prefix = np.asarray(batch.prefix_BxP[0], np.int32)
  elif share_prefix:
    prefix_len = batch_lib.shared_prefix_length(all_tokens, all_positions)
    if prefix_len >= batch_lib.MIN_SHARED_PREFIX:
      prefix, all_tokens, all_positions = batch_lib.split_prefix(all_tokens, all_positions, prefix_len)
  if prefix is not None:
    score = _score_prefixed_chunk if mesh is None else _replicated_out(_score_prefixed_chunk_fn, mesh)
    if mesh is not None:
      prefix = jax.device_put(prefix, sharding.replicated(mesh))
  # Chunks of similar length (shortest first), each cut to its own longest row rounded
  # up to 8 columns: little padding, few compiled shapes. Results are put back in order.
  lengths = (all_positions >= 0).sum(1)
  order = np.argsort(lengths, kind="stable")
  outs = []
  starts = range(0, batch.size, chunk_size)
  if desc:
    starts = progress.bar(starts, desc=desc, unit="chunk")
  for start in starts:
    rows = order[start : start + chunk_size]
    width = min(all_tokens.shape[1], -(-int(lengths[rows].max()) // 8) * 8)
    tokens = all_tokens[rows, -width:]
    positions = all_positions[rows, -width:]
    cands = candidates[rows]
    n = len(rows)
    pad = _bucket(n, chunk_size, multiple) - n
    if pad:
      # Repeat the last row so the padded chunk reuses a compiled shape.
      tokens = np.concatenate([tokens, np.repeat(tokens[-1:], pad, 0)])
      positions = np.concatenate([positions, np.repeat(positions[-1:], pad, 0)])
      cands = np.concatenate([cands, np.repeat(cands[-1:], pad, 0)])
    if mesh is not None:
      tokens, positions, cands = sharding.shard_batch((tokens, positions, cands), mesh)
    args = (tokens, positions, cands) if prefix is None else (prefix, tokens, positions, cands)
    out = score(unbound, params, *args)
    outs.append(jax.tree.map(lambda x: np.asarray(x)[:n], out))
  inverse = np.argsort(order, kind="stable")
  merged = {k: np.concatenate([o[k] for o in outs])[inverse] for k in outs[0]}
  return FactScores(
      logprob_full=merged["logprob_full"],
      prob_full=np.exp(merged["logprob_full"]),
      prob_normalized=merged["prob_normalized"],
      correct_argmax_candidates=merged["correct_argmax_candidates"],
      correct_argmax_full=merged["correct_argmax_full"],
      candidate_probs=merged["candidate_probs"],
  )


# ---------------------------------------------------------------------------------
# Text: next-token loss / accuracy and KL(original || edited).


def _next_token_terms(logits_BxLxV, tokens_BxL, positions_BxL):
  logp = jax.nn.log_softmax(logits_BxLxV[:, :-1].astype(jnp.float32), axis=-1)
  targets = tokens_BxL[:, 1:]
  # A position predicts the next one only when both are real tokens.
  valid = (positions_BxL[:, :-1] >= 0) & (positions_BxL[:, 1:] >= 0)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  # A non-finite distribution predicts nothing (argmax over NaNs would say token 0).
  finite = ~jnp.any(jnp.isnan(logp), axis=-1)
  correct = finite & (jnp.argmax(logp, axis=-1) == targets)
  return logp, nll, correct, valid


def _text_sums(logits_BxLxV, tokens_BxL, positions_BxL):
  _, nll, correct, valid = _next_token_terms(logits_BxLxV, tokens_BxL, positions_BxL)
  return jnp.stack([(nll * valid).sum(), (correct * valid).sum(), valid.sum().astype(jnp.float32)])


def _text_chunk_fn(unbound, params, tokens, positions, row_wise=True):
  model = pz.bind_variables(unbound, params)
  if not row_wise:
    return _text_sums(forward.full_logits(model, tokens, positions), tokens, positions)
  # The body on the whole chunk, the 262k-way unembedding one row at a time: the
  # chunk's [B, L, V] logits and log-probabilities were the edited evaluation's peak.
  hidden = forward.residual_stream(model, tokens, positions)
  per_row = forward.map_vocab_rows(
      lambda h, t, p: _text_sums(forward.unembed(model, h), t, p), hidden, tokens, positions
  )
  return per_row.sum(axis=0)


_text_chunk = jax.jit(_text_chunk_fn, static_argnames="row_wise")


def _text_rows(mesh, tokens_BxL, positions_BxL):
  """Text rows split over "data", padded with rows of padding (positions -1: they
  predict nothing and count for nothing)."""
  size = sharding.padded_size(np.shape(tokens_BxL)[0], sharding.data_size(mesh))
  tokens = sharding.pad_rows(tokens_BxL, size, fill=0)
  positions = sharding.pad_rows(positions_BxL, size, fill=-1)
  return sharding.shard_batch((tokens, positions), mesh)


# On a mesh the chunk's rows are split over "data", so each device already holds only
# its share of the logits; the rows are unembedded together there.
_text_chunk_batched = functools.partial(_text_chunk_fn, row_wise=False)


def text_metrics(model: Any, tokens_BxL, positions_BxL, chunk_size: int = 8) -> dict[str, float]:
  """Mean next-token cross-entropy and accuracy over real positions."""
  unbound, params = sharding.unbind_for_jit(model)
  mesh = sharding.mesh_of((unbound, params))
  run = _text_chunk if mesh is None else _replicated_out(_text_chunk_batched, mesh)
  totals = np.zeros(3)
  for start in range(0, tokens_BxL.shape[0], chunk_size):
    sl = slice(start, start + chunk_size)
    rows = (tokens_BxL[sl], positions_BxL[sl]) if mesh is None else _text_rows(mesh, tokens_BxL[sl], positions_BxL[sl])
    totals += np.asarray(run(unbound, params, *rows), np.float64)
  return {"loss": totals[0] / totals[2], "accuracy": totals[1] / totals[2], "tokens": int(totals[2])}


def _kl_sums(la, lb, positions):
  pa = jax.nn.log_softmax(la.astype(jnp.float32), -1)
  pb = jax.nn.log_softmax(lb.astype(jnp.float32), -1)
  kl = (jnp.exp(pa) * (pa - pb)).sum(-1)
  valid = positions >= 0
  return jnp.stack([(kl * valid).sum(), valid.sum().astype(jnp.float32)])


def _kl_chunk_fn(unbound_a, params_a, unbound_b, params_b, tokens, positions, row_wise=True):
  a = pz.bind_variables(unbound_a, params_a)
  b = pz.bind_variables(unbound_b, params_b)
  if not row_wise:
    return _kl_sums(forward.full_logits(a, tokens, positions), forward.full_logits(b, tokens, positions), positions)
  ha = forward.residual_stream(a, tokens, positions)
  hb = forward.residual_stream(b, tokens, positions)
  per_row = forward.map_vocab_rows(
      lambda x, y, p: _kl_sums(forward.unembed(a, x), forward.unembed(b, y), p), ha, hb, positions
  )
  return per_row.sum(axis=0)


_kl_chunk = jax.jit(_kl_chunk_fn, static_argnames="row_wise")
_kl_chunk_batched = functools.partial(_kl_chunk_fn, row_wise=False)


def kl_divergence(original: Any, edited: Any, tokens_BxL, positions_BxL, chunk_size: int = 4) -> float:
  """Mean per-token KL(original || edited) of next-token distributions on text.

  On one device both models' full-vocabulary logits are formed one window at a time
  (`forward.map_vocab_rows`), so the chunk size sets the body's batch, not the peak.
  """
  ua, pa = sharding.unbind_for_jit(original)
  ub, pb = sharding.unbind_for_jit(edited)
  mesh = sharding.mesh_of((ua, pa, ub, pb))
  run = _kl_chunk if mesh is None else _replicated_out(_kl_chunk_batched, mesh)
  total, count = 0.0, 0
  for start in range(0, tokens_BxL.shape[0], chunk_size):
    sl = slice(start, start + chunk_size)
    rows = (tokens_BxL[sl], positions_BxL[sl]) if mesh is None else _text_rows(mesh, tokens_BxL[sl], positions_BxL[sl])
    kl, n = np.asarray(run(ua, pa, ub, pb, *rows), np.float64)
    total, count = total + float(kl), count + int(n)
  return total / max(count, 1)


def with_compute_dtype(model: Any, compute_dtype: str) -> Any:
  """`model` computing in `compute_dtype` ("float32": `model` itself).

  Casts every floating array of the model (weights and constants such as the
  embedding scale, which would otherwise promote activations back to float32) into a
  new, frozen copy; the scorers still form log-probabilities in float32. Placement
  is kept (the cast of a sharded weight is sharded alike).
  """
  if compute_dtype == "float32":
    return model
  if compute_dtype != "bfloat16":
    raise ValueError(f"compute_dtype must be 'float32' or 'bfloat16', got {compute_dtype!r}")
  dtype = jnp.dtype(compute_dtype)
  cast = lambda tree: jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree
  )
  unbound, params = sharding.unbind_for_jit(model)
  return pz.bind_variables(cast(unbound), [pz.Parameter(value=v.value, label=v.label) for v in cast(params)])
