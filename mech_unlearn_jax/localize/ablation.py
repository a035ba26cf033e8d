"""Total effect of each MLP on known facts: mean-ablation at the subject tokens.

An independent check of the fact-lookup pick (the path-patching enrichment score
measures one path: an MLP's output straight into the extraction layer). Here MLP
l's output at the subject tokens is replaced by its mean over every subject-token
position of the batch (mean-ablation: the activation keeps its typical scale but
loses what is specific to the subject), every later layer sees the change, and we
measure the drop in p(true answer), normalized over the candidate answers, at the
last position:

  effect_l = mean_b [ p_clean(b) - p_ablated_l(b) ]   (with its standard error).

A fact-lookup MLP should have a clearly positive effect. All layers share one
compiled function: every MLP output gets a `Patch` whose mask is the subject mask
times a per-layer flag, and only the flags change between calls.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from mech_unlearn_jax import sharding
from mech_unlearn_jax import interventions as iv
from mech_unlearn_jax.batch import FactBatch
from mech_unlearn_jax.models import forward
from mech_unlearn_jax.models.transformer import CausalLM


@dataclasses.dataclass(frozen=True)
class AblationResult:
  """Per MLP layer: mean drop in p(true) under mean-ablation at the subject tokens."""

  clean_p: float
  effect: np.ndarray  # [n_layers]
  effect_se: np.ndarray  # [n_layers], standard error over prompts
  num_prompts: int

  def to_json(self) -> dict[str, Any]:
    return {
        "clean_p": self.clean_p, "effect": [float(x) for x in self.effect],
        "effect_se": [float(x) for x in self.effect_se], "num_prompts": self.num_prompts,
        "measure": "p(true) normalized over candidates; MLP output mean-ablated at subject tokens",
    }


def _normalized_p_true(logits_BxV, candidates_BxC):
  valid = candidates_BxC >= 0
  picked = jnp.take_along_axis(logits_BxV.astype(jnp.float32), jnp.maximum(candidates_BxC, 0), axis=1)
  picked = jnp.where(valid, picked, -jnp.inf)
  return jax.nn.softmax(picked, axis=1)[:, 0]


@jax.jit
def _subject_means(unbound, params, tokens_BxL, positions_BxL, subject_BxL):
  """[n_layers, D]: each MLP's output averaged over every subject-token position."""
  model = pz.bind_variables(unbound, params)
  n = model.config.num_layers
  sites = [iv.Site(i, "mlp_out") for i in range(n)]
  acts = iv.capture_traced(model, sites, tokens_BxL, positions_BxL)
  weight = subject_BxL.astype(jnp.float32)
  out = []
  for s in sites:
    a = acts[s].untag("batch", "seq", "embedding").unwrap().astype(jnp.float32)
    out.append(jnp.einsum("bs,bsd->d", weight, a) / jnp.maximum(weight.sum(), 1.0))
  return jnp.stack(out)


@jax.jit
def _ablated_p(unbound, params, tokens_BxL, positions_BxL, subject_BxL, means_LxD, flags_L, candidates_BxC):
  model = pz.bind_variables(unbound, params)
  n = model.config.num_layers
  subject = pz.nx.wrap(subject_BxL).tag("batch", "seq")
  hooks = {
      iv.Site(i, "mlp_out"): iv.Patch(
          iv.Site(i, "mlp_out"),
          pz.nx.wrap(means_LxD[i]).tag("embedding"),
          pz.nx.nmap(jnp.logical_and)(subject, pz.nx.wrap(flags_L[i])),
      )
      for i in range(n)
  }
  hooked = iv.insert_hooks(model, hooks)
  logits = forward.last_logits(hooked, tokens_BxL, positions_BxL)
  return _normalized_p_true(logits, candidates_BxC)


def mlp_mean_ablation(model: CausalLM, batch: FactBatch, chunk_size: int = 32) -> AblationResult:
  """The total effect of every MLP layer on p(true) (see the module docstring)."""
  unbound, params = sharding.unbind_for_jit(model)
  n = model.config.num_layers
  subject = np.asarray(batch.subject_mask_BxL, bool)
  if not subject.any():
    raise ValueError("the batch has no subject tokens (subject_mask_BxL is all False)")
  chunks = [(s, min(s + chunk_size, batch.size)) for s in range(0, batch.size, chunk_size)]
  # The mean over the whole batch's subject positions, weighted by their count per chunk.
  total, count = 0.0, 0
  for a, b in chunks:
    k = float(subject[a:b].sum())
    total = total + np.asarray(_subject_means(
        unbound, params, batch.tokens_BxL[a:b], batch.positions_BxL[a:b], subject[a:b])) * k
    count += k
  means = jnp.asarray(total / max(count, 1.0))
  candidates = np.asarray(batch.candidate_ids_BxC)
  off = np.zeros(n, bool)

  def p_with(flags):
    return np.concatenate([
        np.asarray(_ablated_p(unbound, params, batch.tokens_BxL[a:b], batch.positions_BxL[a:b],
                              subject[a:b], means, flags, candidates[a:b]))
        for a, b in chunks
    ])

  clean = p_with(off)
  drops = []
  for layer in range(n):
    flags = off.copy()
    flags[layer] = True
    drops.append(clean - p_with(flags))
  drops = np.stack(drops)  # [n_layers, B]
  se = drops.std(axis=1, ddof=1) / np.sqrt(batch.size) if batch.size > 1 else np.zeros(n)
  return AblationResult(float(clean.mean()), drops.mean(axis=1), se, batch.size)
