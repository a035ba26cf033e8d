"""Fact-lookup (FLU) localization as a reproducible procedure with stored evidence.

METHOD §2 "Fact lookup": early-to-mid MLPs acting on the subject's tokens write the
subject's attribute into the residual stream; later attention layers move it to the
final position. We find the FLU MLP layers from three measurements and one rule:

(a) Probe curve: per residual layer, a linear probe for the attribute (the sport) at
    the subject's last token (`probes.py`); the attribute becomes decodable after the
    FLU MLPs have run. Probes at the final token are recorded too.
(b) Extraction layers: for each layer L, the clean-minus-corrupt attention output at
    the final position is patched into a corrupted-subject run, and the recovery of
    the normalized logit-diff metric is measured. "direct" adds it straight to the
    final residual stream (path patching: no later layer sees it); "total" adds it to
    the residual after layer L's attention (every later layer sees it). Extraction
    layers are those with score >= `extraction_fraction` x the best score.
(c) Enrichment: for each MLP layer l, the clean-minus-corrupt MLP output at the
    SUBJECT positions is added to the corrupted run's residual stream entering the
    first extraction layer E > l (bypassing layers l+1..E-1, which never see it), and
    the normalized metric is measured. Layers with no extraction layer after them get
    NaN.
(d) Rule (`FLURule`, every parameter stored in the evidence): candidates are MLP
    layers before the first extraction layer whose output lands no later than the
    residual layer where the probe first reaches `probe_saturation` x its best held-out
    accuracy. By default a candidate is kept when its enrichment exceeds both
    `threshold` (0.02) and `z` (2) standard errors over prompts; gaps of at most
    `max_gap` layers between kept layers are filled so the FLU range is contiguous.
    `FLURule.paper()` is the paper's CounterFact rule (|score - last scored layer's
    score| > 0.02; the layers that pass, not the gaps); its pick is recorded next to ours. An
    explicit layer list overrides the result (the computed one is still recorded).

Metric: logit diff = logit(answer) - mean logit(wrong candidates) at the last prompt
token; normalized = (mean patched - mean corrupt) / (mean clean - mean corrupt) over
the whole patching set (means first: per-prompt ratios explode when a prompt's
clean and corrupt values are close).

Corruption: each prompt's subject tokens are replaced by random tokens of the same
count. Callers may pass their own corrupted tokens (the pipeline uses the AP
corruption of `corruption.py`); the default draws (seeded) from the subject tokens of
the whole batch, so corrupted subjects look like names without being one.

Activations are captured and deltas added with the hook layers of
`mech_unlearn_jax.interventions` ("attn_out", "mlp_out", "resid_pre" sites). Patched
runs put an `AddDelta` at every block input and attention output (zeros where
nothing is patched), so one compiled function serves every layer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from mech_unlearn_jax import interventions as iv
from mech_unlearn_jax import io as mio
from mech_unlearn_jax import sharding
from mech_unlearn_jax.batch import FactBatch
from mech_unlearn_jax.localize import probes as probes_lib
from mech_unlearn_jax.models import forward
from mech_unlearn_jax.models.transformer import CausalLM

# ----------------------------------------------------------------------------------
# Runs: capture every sublayer output, or add deltas to the residual stream.


def _site_hooks(num_layers: int, pre_LxBxSxD, attn_LxBxSxD):
  """`AddDelta` hooks at every block input and attention output (one compiled shape)."""
  named = lambda a: pz.nx.wrap(a).tag("batch", "seq", "embedding")
  hooks = {}
  for i in range(num_layers):
    hooks[iv.Site(i, "resid_pre")] = iv.AddDelta(iv.Site(i, "resid_pre"), named(pre_LxBxSxD[i]))
    hooks[iv.Site(i, "attn_out")] = iv.AddDelta(iv.Site(i, "attn_out"), named(attn_LxBxSxD[i]))
  return hooks


def _logit_diff(model: CausalLM, final_resid_BxD: pz.nx.NamedArray, answer_B, wrong_BxK):
  hidden = model.final_norm(final_resid_BxD)
  logits_BxV = model.unembed(hidden).untag("batch", "vocabulary").unwrap()
  logits_BxV = logits_BxV.astype(jnp.float32)
  answer = jnp.take_along_axis(logits_BxV, answer_B[:, None], axis=1)[:, 0]
  valid = wrong_BxK >= 0
  wrong = jnp.take_along_axis(logits_BxV, jnp.maximum(wrong_BxK, 0), axis=1)
  mean_wrong = (wrong * valid).sum(1) / jnp.maximum(valid.sum(1), 1)
  return answer - mean_wrong


@jax.jit
def _capture_run(unbound, params, tokens_BxL, positions_BxL, answer_B, wrong_BxK):
  """Sublayer outputs and final residual, and the logit diff [B].

  Returns (attn_out [n, B, L, D], mlp_out [n, B, L, D], final residual [B, D], ld [B]).
  """
  model = pz.bind_variables(unbound, params)
  n = model.config.num_layers
  sites = [iv.Site(i, k) for i in range(n) for k in ("attn_out", "mlp_out")]
  sites.append(iv.Site(n - 1, "resid_post"))
  acts = iv.capture_traced(model, sites, tokens_BxL, positions_BxL)
  unwrap = lambda x: x.untag("batch", "seq", "embedding").unwrap()
  attn = jnp.stack([unwrap(acts[iv.Site(i, "attn_out")]) for i in range(n)])
  mlp = jnp.stack([unwrap(acts[iv.Site(i, "mlp_out")]) for i in range(n)])
  final = acts[iv.Site(n - 1, "resid_post")][{"seq": -1}]
  ld = _logit_diff(model, final, answer_B, wrong_BxK)
  return attn, mlp, final.untag("batch", "embedding").unwrap(), ld


@jax.jit
def _patched_run(unbound, params, tokens_BxL, positions_BxL, pre_LxBxSxD, attn_LxBxSxD, answer_B, wrong_BxK):
  """Logit diff [B] with deltas added to every block input and attention output."""
  model = pz.bind_variables(unbound, params)
  hooked = iv.insert_hooks(model, _site_hooks(model.config.num_layers, pre_LxBxSxD, attn_LxBxSxD))
  tokens, positions = forward.named_inputs(tokens_BxL, positions_BxL)
  x = hooked.blocks(hooked.embed(tokens, token_positions=positions), token_positions=positions)
  return _logit_diff(hooked, x[{"seq": -1}], answer_B, wrong_BxK)


@jax.jit
def _direct_to_final(unbound, params, final_BxD, deltas_LxBxD, answer_B, wrong_BxK):
  """Logit diff [L, B] after adding each delta to the final residual stream."""
  model = pz.bind_variables(unbound, params)

  def one(delta_BxD):
    resid = pz.nx.wrap(final_BxD + delta_BxD).tag("batch", "embedding")
    return _logit_diff(model, resid, answer_B, wrong_BxK)

  return jax.lax.map(one, deltas_LxBxD)


# ----------------------------------------------------------------------------------
# Corruption.


def corrupt_subject_tokens(
    batch: FactBatch, seed: int, token_pool: Sequence[int] | None = None
) -> np.ndarray:
  """tokens_BxL with every subject token replaced by a random pool token (seeded)."""
  tokens = np.array(batch.tokens_BxL)
  subject = np.asarray(batch.subject_mask_BxL, dtype=bool)
  if not subject.any():
    raise ValueError("the batch has no subject tokens to corrupt (subject_mask_BxL is all False)")
  pool = np.unique(tokens[subject] if token_pool is None else np.asarray(token_pool))
  if pool.size < 2:
    raise ValueError("the corruption token pool needs at least two distinct ids")
  rng = np.random.default_rng(seed)
  tokens[subject] = rng.choice(pool, size=int(subject.sum()))
  return tokens


# ----------------------------------------------------------------------------------
# Configuration and results.


@dataclasses.dataclass(frozen=True)
class FLURule:
  """How FLU layers are read off the evidence (stored with every result).

  The default keeps MLPs whose own enrichment is clearly positive: score > 0.02 and
  > 2 standard errors (over prompts). `FLURule.paper()` is the paper's CounterFact
  rule, |score - last layer's score| > 0.02 (the layers that pass): it also keeps
  layers that merely differ from a nonzero last layer, including negative ones.

  Attributes:
    threshold: minimal difference from the baseline.
    baseline: "zero" or "last" (enrichment of the last MLP layer that has an
      extraction layer after it, as the paper).
    absolute: compare |score - baseline| (paper) rather than score - baseline.
    z: the difference must also exceed z standard errors of the layer's score.
    probe_saturation: MLP layer l is a candidate only if its output (residual layer
      l + 1) is at or before the first residual layer whose held-out probe accuracy
      reaches this fraction of the best; None disables the probe constraint.
    before_first_extraction: candidates must precede the first extraction layer.
    contiguous: fill gaps between kept layers...
    max_gap: ...when at most this many layers are missing (None: fill everything
      between the first and the last kept layer).
    extraction_measure: "direct" or "total" patching scores pick extraction layers.
    extraction_fraction: extraction layers score >= this fraction of the best
      (layer 0 excluded: no MLP precedes it).
    max_extraction_layers: keep at most this many (best first).
    layers: explicit FLU layers; overrides the rule (the rule's pick is recorded).
    extraction_layers: explicit extraction layers; overrides (b).
  """

  threshold: float = 0.02
  baseline: Literal["last", "zero"] = "zero"
  absolute: bool = False
  z: float = 2.0
  probe_saturation: float | None = 0.95
  before_first_extraction: bool = True
  contiguous: bool = True
  max_gap: int | None = 2
  extraction_measure: Literal["direct", "total"] = "direct"
  extraction_fraction: float = 0.5
  max_extraction_layers: int = 3
  layers: tuple[int, ...] | None = None
  extraction_layers: tuple[int, ...] | None = None

  def __post_init__(self):
    if self.baseline not in ("last", "zero"):
      raise ValueError(f"FLURule.baseline must be 'last' or 'zero', got {self.baseline!r}")
    if self.extraction_measure not in ("direct", "total"):
      raise ValueError(
          f"FLURule.extraction_measure must be 'direct' or 'total', got {self.extraction_measure!r}"
      )
    if self.max_extraction_layers < 1:
      raise ValueError("FLURule.max_extraction_layers must be >= 1")
    if self.max_gap is not None and self.max_gap < 0:
      raise ValueError("FLURule.max_gap must be >= 0 or None")

  @classmethod
  def paper(cls, **overrides: Any) -> "FLURule":
    """The paper's CounterFact rule: keep the layers with |score - last layer's score| > 0.02.

    Only the layers that pass are kept, not the gaps between them.
    """
    return cls(**{
        **dict(baseline="last", absolute=True, z=0.0, contiguous=False, probe_saturation=None),
        **overrides,
    })

  def replace(self, **changes: Any) -> "FLURule":
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class FactLookupConfig:
  """Settings of `run_fact_lookup`.

  Attributes:
    rule: the layer-picking rule.
    probe: probe training settings.
    seed: seeds the corruption.
    max_patch_prompts: patching uses at most this many prompts (first rows).
    chunk_size: prompts per forward pass.
  """

  rule: FLURule = FLURule()
  probe: probes_lib.ProbeConfig = probes_lib.ProbeConfig()
  seed: int = 0
  max_patch_prompts: int = 128
  chunk_size: int = 32


@dataclasses.dataclass(frozen=True)
class PatchingScores:
  """Normalized logit-diff recoveries (see the module docstring)."""

  clean_logit_diff: float
  corrupt_logit_diff: float
  extraction_direct: np.ndarray  # [n_layers]
  extraction_total: np.ndarray  # [n_layers]
  num_prompts: int
  extraction_direct_se: np.ndarray | None = None  # standard errors over prompts
  extraction_total_se: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class FactLookupResult:
  """All evidence of one FLU localization and the layers it chose."""

  probe_subject: probes_lib.ProbeResult
  probe_final: probes_lib.ProbeResult
  patching: PatchingScores
  extraction_layers: tuple[int, ...]
  enrichment: np.ndarray  # [n_layers], NaN where no extraction layer follows
  enrichment_se: np.ndarray  # standard errors over prompts
  enrichment_target: tuple[int | None, ...]  # extraction layer each MLP was patched into
  layers: tuple[int, ...]
  rule: FLURule
  trace: dict[str, Any]
  total_effect: Any = None  # ablation.AblationResult: the independent total-effect check

  def to_json(self) -> dict[str, Any]:
    nan_to_none = lambda xs: [None if not math.isfinite(float(x)) else float(x) for x in xs]
    return {
        "total_effect": None if self.total_effect is None else self.total_effect.to_json(),
        "layers": list(self.layers),
        "extraction_layers": list(self.extraction_layers),
        "rule": dataclasses.asdict(self.rule),
        "trace": self.trace,
        "residual_layer_names": ["embed"] + [f"after_block_{i}" for i in range(len(self.enrichment))],
        "probe_subject_last": self.probe_subject.to_json(),
        "probe_final": self.probe_final.to_json(),
        "clean_logit_diff": self.patching.clean_logit_diff,
        "corrupt_logit_diff": self.patching.corrupt_logit_diff,
        "num_patching_prompts": self.patching.num_prompts,
        "extraction_direct": nan_to_none(self.patching.extraction_direct),
        "extraction_total": nan_to_none(self.patching.extraction_total),
        "extraction_direct_se": nan_to_none(self.patching.extraction_direct_se),
        "extraction_total_se": nan_to_none(self.patching.extraction_total_se),
        "enrichment": nan_to_none(self.enrichment),
        "enrichment_se": nan_to_none(self.enrichment_se),
        "enrichment_target_layer": list(self.enrichment_target),
    }


# ----------------------------------------------------------------------------------
# Measurements.


def _chunks(batch: FactBatch, size: int):
  for start in range(0, batch.size, size):
    yield batch.slice(start, min(start + size, batch.size))


def _normalized(patched_KxN, clean_N, corrupt_N) -> tuple[np.ndarray, np.ndarray]:
  """Normalized recovery of each row of `patched_KxN` and its standard error.

  score_k = (mean_i patched_ki - mean_i corrupt_i) / (mean_i clean_i - mean_i corrupt_i);
  the standard error is that of the numerator's mean over prompts divided by the
  (shared) denominator: it measures how much a score could move with other prompts.
  """
  patched = np.asarray(patched_KxN, dtype=np.float64)
  clean, corrupt = np.asarray(clean_N, np.float64), np.asarray(corrupt_N, np.float64)
  denom = clean.mean() - corrupt.mean()
  if abs(denom) < 1e-9:
    raise ValueError(
        "clean and corrupted runs have the same mean logit diff; the normalized metric"
        " is undefined (does the model know these facts?)"
    )
  diff = patched - corrupt[None]
  n = clean.size
  se = diff.std(axis=1, ddof=1) / np.sqrt(n) / abs(denom) if n > 1 else np.zeros(len(diff))
  return diff.mean(axis=1) / denom, se


def _run_pair(unbound, params, chunk: FactBatch, corrupt_BxL):
  """Capture runs of the clean and the corrupted prompts of one chunk."""
  args = (jnp.asarray(chunk.positions_BxL), jnp.asarray(chunk.answer_ids_B), jnp.asarray(chunk.wrong_ids_BxK))
  clean = _capture_run(unbound, params, jnp.asarray(chunk.tokens_BxL), *args)
  corrupt = _capture_run(unbound, params, jnp.asarray(corrupt_BxL), *args)
  return clean, corrupt


def _corrupted(batch: FactBatch, seed: int, corrupt_tokens_BxL) -> np.ndarray:
  if corrupt_tokens_BxL is None:
    return corrupt_subject_tokens(batch, seed)
  corrupt = np.asarray(corrupt_tokens_BxL)
  if corrupt.shape != np.shape(batch.tokens_BxL):
    raise ValueError(
        f"corrupt_tokens_BxL has shape {corrupt.shape}, the batch {np.shape(batch.tokens_BxL)}"
    )
  return corrupt


def extraction_scores(
    model: CausalLM,
    batch: FactBatch,
    seed: int,
    chunk_size: int = 32,
    corrupt_tokens_BxL: np.ndarray | None = None,
) -> PatchingScores:
  """(b): per-layer attention-output patching at the final position, direct and total.

  `corrupt_tokens_BxL` (same columns as the batch) overrides the default corruption.
  """
  n = model.config.num_layers
  unbound, params = sharding.unbind_for_jit(model)
  lds = {"clean": [], "corrupt": [], "direct": [], "total": []}
  corrupt_all = _corrupted(batch, seed, corrupt_tokens_BxL)
  for start in range(0, batch.size, chunk_size):
    chunk = batch.slice(start, min(start + chunk_size, batch.size))
    corrupt = corrupt_all[start : start + chunk.size]
    (c_attn, _, _, c_ld), (x_attn, _, x_final, x_ld) = _run_pair(unbound, params, chunk, corrupt)
    lds["clean"].append(np.asarray(c_ld))
    lds["corrupt"].append(np.asarray(x_ld))
    attn_delta_nxBxD = c_attn[:, :, -1] - x_attn[:, :, -1]
    answer, wrong = jnp.asarray(chunk.answer_ids_B), jnp.asarray(chunk.wrong_ids_BxK)
    direct = _direct_to_final(unbound, params, x_final, attn_delta_nxBxD, answer, wrong)
    lds["direct"].append(np.asarray(direct))
    zeros = jnp.zeros_like(x_attn)
    total = []
    for layer in range(n):
      attn_add = zeros.at[layer, :, -1].set(attn_delta_nxBxD[layer])
      total.append(np.asarray(_patched_run(
          unbound, params, jnp.asarray(corrupt), jnp.asarray(chunk.positions_BxL),
          zeros, attn_add, answer, wrong,
      )))
    lds["total"].append(np.stack(total))
  clean, corrupt = np.concatenate(lds["clean"]), np.concatenate(lds["corrupt"])
  direct, direct_se = _normalized(np.concatenate(lds["direct"], axis=1), clean, corrupt)
  total, total_se = _normalized(np.concatenate(lds["total"], axis=1), clean, corrupt)
  return PatchingScores(
      clean_logit_diff=float(clean.mean()),
      corrupt_logit_diff=float(corrupt.mean()),
      extraction_direct=direct,
      extraction_total=total,
      num_prompts=batch.size,
      extraction_direct_se=direct_se,
      extraction_total_se=total_se,
  )


def enrichment_targets(num_layers: int, extraction_layers: Sequence[int]) -> list[int | None]:
  """For each MLP layer, the first extraction layer after it (None if there is none)."""
  ext = sorted(set(extraction_layers))
  return [next((e for e in ext if e > l), None) for l in range(num_layers)]


def enrichment_scores(
    model: CausalLM,
    batch: FactBatch,
    extraction_layers: Sequence[int],
    seed: int,
    chunk_size: int = 32,
    corrupt_tokens_BxL: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, list[int | None]]:
  """(c): MLP output at subject positions patched into the extraction layer's input.

  Returns (scores [n], standard errors [n], target extraction layer per MLP), NaN
  score and error where no extraction layer follows the MLP.
  """
  n = model.config.num_layers
  targets = enrichment_targets(n, extraction_layers)
  unbound, params = sharding.unbind_for_jit(model)
  lds = {"clean": [], "corrupt": [], "patched": []}
  corrupt_all = _corrupted(batch, seed, corrupt_tokens_BxL)
  for start in range(0, batch.size, chunk_size):
    chunk = batch.slice(start, min(start + chunk_size, batch.size))
    corrupt = corrupt_all[start : start + chunk.size]
    (_, c_mlp, _, c_ld), (_, x_mlp, _, x_ld) = _run_pair(unbound, params, chunk, corrupt)
    lds["clean"].append(np.asarray(c_ld))
    lds["corrupt"].append(np.asarray(x_ld))
    subject = jnp.asarray(chunk.subject_mask_BxL, c_mlp.dtype)[None, :, :, None]
    mlp_delta_nxBxLxD = (c_mlp - x_mlp) * subject
    answer, wrong = jnp.asarray(chunk.answer_ids_B), jnp.asarray(chunk.wrong_ids_BxK)
    zeros = jnp.zeros_like(x_mlp)
    patched = np.array(np.broadcast_to(np.asarray(x_ld), (n, chunk.size)))
    for layer, target in enumerate(targets):
      if target is None:
        continue
      pre_add = zeros.at[target].set(mlp_delta_nxBxLxD[layer])
      patched[layer] = np.asarray(_patched_run(
          unbound, params, jnp.asarray(corrupt), jnp.asarray(chunk.positions_BxL),
          pre_add, zeros, answer, wrong,
      ))
    lds["patched"].append(patched)
  clean, corrupt = np.concatenate(lds["clean"]), np.concatenate(lds["corrupt"])
  scores, se = _normalized(np.concatenate(lds["patched"], axis=1), clean, corrupt)
  missing = np.array([t is None for t in targets])
  return np.where(missing, np.nan, scores), np.where(missing, np.nan, se), targets


# ----------------------------------------------------------------------------------
# Rules.


def choose_extraction_layers(scores: np.ndarray, rule: FLURule) -> list[int]:
  """Layers scoring >= extraction_fraction x best (at most max_extraction_layers).

  Layer 0 is never an extraction layer here: no MLP output exists before its
  attention, so it could not carry MLP-enriched attributes (and enrichment needs an
  extraction layer after some MLP).
  """
  if rule.extraction_layers is not None:
    return sorted(set(int(i) for i in rule.extraction_layers))
  scores = np.asarray(scores, dtype=np.float64)
  if scores.size < 2:
    raise ValueError("fact lookup needs a model with at least 2 layers")
  order = sorted(range(1, len(scores)), key=lambda i: (-scores[i], i))
  best = float(scores[order[0]])
  if best <= 0:
    return [order[0]]
  keep = [i for i in order if scores[i] >= rule.extraction_fraction * best]
  return sorted(keep[: rule.max_extraction_layers])


def probe_saturation_layer(test_accuracy: np.ndarray, fraction: float) -> int:
  """First residual layer whose accuracy reaches `fraction` x the best accuracy."""
  acc = np.asarray(test_accuracy, dtype=np.float64)
  target = fraction * np.nanmax(acc)
  return int(np.flatnonzero(acc >= target - 1e-12)[0])


def _fill_gaps(layers: Sequence[int], max_gap: int | None) -> list[int]:
  """Adds the layers between kept ones when at most `max_gap` are missing (None: all)."""
  layers = sorted(layers)
  out = [layers[0]]
  for l in layers[1:]:
    if max_gap is None or l - out[-1] - 1 <= max_gap:
      out.extend(range(out[-1] + 1, l))
    out.append(l)
  return out


def choose_flu_layers(
    enrichment: np.ndarray,
    probe_test_accuracy: np.ndarray | None,
    extraction_layers: Sequence[int],
    rule: FLURule,
    enrichment_se: np.ndarray | None = None,
) -> tuple[list[int], dict[str, Any]]:
  """(d): applies `rule`; returns (layers, trace of every intermediate quantity).

  A candidate passes when d = score - baseline (|d| if `rule.absolute`) exceeds both
  `rule.threshold` and `rule.z` standard errors of its score.
  """
  scores = np.asarray(enrichment, dtype=np.float64)
  n = scores.size
  se = np.zeros(n) if enrichment_se is None else np.nan_to_num(np.asarray(enrichment_se, np.float64))
  scored = [l for l in range(n) if np.isfinite(scores[l])]
  trace: dict[str, Any] = {}
  if not scored:
    raise ValueError("no MLP layer has an enrichment score (no extraction layer after any MLP)")
  candidates = list(scored)
  if rule.before_first_extraction and extraction_layers:
    first = min(extraction_layers)
    candidates = [l for l in candidates if l < first]
  if rule.probe_saturation is not None and probe_test_accuracy is not None:
    sat = probe_saturation_layer(probe_test_accuracy, rule.probe_saturation)
    trace["probe_saturation_residual_layer"] = sat
    # MLP l writes residual layer l + 1 (residual layer 0 is the embedding).
    candidates = [l for l in candidates if l + 1 <= max(sat, 1)]
  baseline = float(scores[scored[-1]]) if rule.baseline == "last" else 0.0
  trace.update(candidates=candidates, baseline=baseline, baseline_layer=scored[-1] if rule.baseline == "last" else None)
  diff = {l: scores[l] - baseline for l in candidates}
  passes = {
      l: (abs(d) if rule.absolute else d) > max(rule.threshold, rule.z * se[l])
      for l, d in diff.items()
  }
  kept = [l for l in candidates if passes[l]]
  trace["passing_threshold"] = kept
  trace["fallback"] = False
  if not kept and candidates:
    # Nothing clears the threshold: keep the single most enriching candidate, and say so.
    kept = [max(candidates, key=lambda l: (diff[l], -l))]
    trace["fallback"] = True
  if not kept:
    kept = [max(scored, key=lambda l: (scores[l] - baseline, -l))]
    trace["fallback"] = True
    trace["note"] = "no candidate survived the probe/extraction constraints"
  if rule.contiguous:
    kept = _fill_gaps(kept, rule.max_gap)
  trace["rule_layers"] = kept
  if rule.layers is not None:
    bad = [l for l in rule.layers if not 0 <= l < n]
    if bad:
      raise ValueError(f"FLURule.layers {bad} outside the model's {n} layers")
    trace["overridden"] = True
    return sorted(set(int(l) for l in rule.layers)), trace
  trace["overridden"] = False
  return kept, trace


# ----------------------------------------------------------------------------------
# The procedure.


def run_fact_lookup(
    model: CausalLM,
    batch: FactBatch,
    labels_N: np.ndarray,
    num_classes: int,
    config: FactLookupConfig = FactLookupConfig(),
    corrupt_tokens_BxL: np.ndarray | None = None,
    probe_batch: FactBatch | None = None,
    probe_labels_N: np.ndarray | None = None,
    total_effect: bool = True,
) -> FactLookupResult:
  """Runs (a)-(d) on prompts whose subject's attribute is `labels_N`.

  Args:
    model: the model.
    batch: fact prompts (answers = true attribute tokens, wrong = other candidates).
    labels_N: attribute class of each prompt (probe targets), in 0..num_classes-1.
    num_classes: number of attribute classes.
    config: rule, probe and patching settings.
    corrupt_tokens_BxL: corrupted tokens for the whole batch (e.g. from
      `corruption.corrupt_subjects`); default: `corrupt_subject_tokens`.
    probe_batch, probe_labels_N: the probes' facts (a few hundred give a stable
      curve; default: `batch`).
    total_effect: also run the independent mean-ablation check (`ablation.py`) on
      the patching prompts.
  """
  labels = np.asarray(labels_N)
  if labels.shape != (batch.size,):
    raise ValueError(f"labels_N has shape {labels.shape}, expected ({batch.size},)")
  if probe_batch is None:
    probe_batch, probe_labels = batch, labels
  else:
    probe_labels = np.asarray(probe_labels_N)
    if probe_labels.shape != (probe_batch.size,):
      raise ValueError(f"probe_labels_N has shape {probe_labels.shape}, expected ({probe_batch.size},)")
  logging.info("fact lookup: probes on %d prompts", probe_batch.size)
  acts_subject = probes_lib.batch_activations(model, probe_batch, "subject_last", config.chunk_size)
  acts_final = probes_lib.batch_activations(model, probe_batch, "final", config.chunk_size)
  probe_subject = probes_lib.train_and_evaluate(acts_subject, probe_labels, num_classes, config.probe)
  probe_final = probes_lib.train_and_evaluate(acts_final, probe_labels, num_classes, config.probe)
  num_patch = min(batch.size, config.max_patch_prompts)
  patch_batch = batch.slice(0, num_patch)
  corrupt = _corrupted(batch, config.seed, corrupt_tokens_BxL)[:num_patch]
  logging.info("fact lookup: extraction patching on %d prompts", num_patch)
  patching = extraction_scores(model, patch_batch, config.seed, config.chunk_size, corrupt)
  measure = (
      patching.extraction_direct if config.rule.extraction_measure == "direct"
      else patching.extraction_total
  )
  extraction = choose_extraction_layers(measure, config.rule)
  logging.info("fact lookup: extraction layers %s; enrichment patching", extraction)
  enrichment, enrichment_se, targets = enrichment_scores(
      model, patch_batch, extraction, config.seed, config.chunk_size, corrupt
  )
  layers, trace = choose_flu_layers(
      enrichment, probe_subject.test_accuracy, extraction, config.rule, enrichment_se
  )
  # Recorded for comparison: what the paper's CounterFact rule picks on this evidence.
  trace["paper_rule_layers"] = choose_flu_layers(
      enrichment, None, extraction, FLURule.paper(), enrichment_se
  )[0]
  effect = None
  if total_effect:
    from mech_unlearn_jax.localize import ablation  # pylint: disable=g-import-not-at-top

    effect = ablation.mlp_mean_ablation(model, patch_batch, config.chunk_size)
    # Do both measurements agree on the pick? The mask follows the enrichment rule.
    top = int(np.argmax(effect.effect))
    trace["total_effect_top_layer"] = top
    trace["total_effect_significant_layers"] = [
        int(l) for l in range(len(effect.effect))
        if effect.effect[l] > max(config.rule.threshold, 2 * effect.effect_se[l])
    ]
  return FactLookupResult(
      probe_subject=probe_subject,
      probe_final=probe_final,
      patching=patching,
      extraction_layers=tuple(extraction),
      enrichment=np.asarray(enrichment),
      enrichment_se=np.asarray(enrichment_se),
      enrichment_target=tuple(targets),
      layers=tuple(layers),
      rule=config.rule,
      trace=trace,
      total_effect=effect,
  )


# ----------------------------------------------------------------------------------
# Evidence files.




def plot_evidence(result: FactLookupResult, directory: str | os.PathLike, title: str = "") -> list[pathlib.Path]:
  """Writes probe_curve.png, extraction.png and enrichment.png; returns their paths."""
  plt = mio.pyplot()
  directory = pathlib.Path(directory)
  n = result.enrichment.size
  paths = []
  suffix = f" ({title})" if title else ""

  fig, ax = plt.subplots(figsize=(6.5, 3.6))
  xs = np.arange(n + 1)
  for probe, name, color in (
      (result.probe_subject, "subject last token", "tab:blue"),
      (result.probe_final, "final token", "tab:orange"),
  ):
    ax.plot(xs, probe.test_accuracy, "-", color=color, marker="o", ms=3, label=f"{name}, held-out")
    ax.plot(xs, probe.train_accuracy, "--", color=color, alpha=0.4, label=f"{name}, train")
  sat = result.trace.get("probe_saturation_residual_layer")
  if sat is not None:
    where = "embedding" if sat == 0 else f"after block {sat - 1}"
    ax.axvline(sat, color="gray", ls=":", label=f"probe saturation ({where})")
  ax.set_xticks(xs)
  ax.set_xticklabels(["emb"] + [str(i) for i in range(n)], fontsize=7)
  ax.set_xlabel("residual stream after block")
  ax.set_ylabel("probe accuracy")
  ax.set_title("Linear probes for the attribute" + suffix)
  ax.legend(fontsize=7)
  paths.append(directory / "probe_curve.png")
  mio.save_figure(fig, paths[-1])
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6.5, 3.6))
  layers = np.arange(n)
  ax.bar(layers - 0.2, result.patching.extraction_direct, 0.4, label="direct to final residual")
  ax.bar(layers + 0.2, result.patching.extraction_total, 0.4, label="total (later layers see it)")
  for e in result.extraction_layers:
    ax.axvspan(e - 0.5, e + 0.5, color="orange", alpha=0.15)
  ax.set_xticks(layers)
  ax.set_xlabel("layer (attention output at the final token)")
  ax.set_ylabel("normalized logit-diff recovery")
  ax.set_title(f"Extraction layers {list(result.extraction_layers)}" + suffix)
  ax.legend(fontsize=7)
  paths.append(directory / "extraction.png")
  mio.save_figure(fig, paths[-1])
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6.5, 3.6))
  colors = ["tab:green" if l in result.layers else "tab:blue" for l in layers]
  ax.bar(layers, np.nan_to_num(result.enrichment), color=colors,
         yerr=np.nan_to_num(result.enrichment_se), capsize=2, ecolor="black")
  base = result.trace.get("baseline", 0.0)
  thr = result.rule.threshold
  ax.axhline(base, color="gray", ls="--", lw=1, label="baseline")
  if result.rule.absolute:
    ax.axhspan(base - thr, base + thr, color="gray", alpha=0.15, label=f"|diff| <= {thr}")
  else:
    ax.axhline(base + thr, color="red", ls=":", lw=1, label=f"baseline + {thr}")
  for e in result.extraction_layers:
    ax.axvspan(e - 0.5, e + 0.5, color="orange", alpha=0.15)
  ax.set_xticks(layers)
  ax.set_xlabel("MLP layer (output at subject tokens)")
  ax.set_ylabel("normalized logit-diff recovery")
  ax.set_title(f"Enrichment (+-1 s.e.); FLU layers {list(result.layers)} green" + suffix)
  ax.legend(fontsize=7)
  paths.append(directory / "enrichment.png")
  mio.save_figure(fig, paths[-1])
  plt.close(fig)

  if result.total_effect is not None:
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    te = result.total_effect
    width = 0.4
    ax.bar(layers - width / 2, np.nan_to_num(result.enrichment), width, label="enrichment (path patching)",
           color=colors)
    ax.bar(layers + width / 2, te.effect, width, yerr=te.effect_se, capsize=2, ecolor="black",
           label="total effect: drop in p(true) under mean-ablation", color="tab:orange")
    ax.axhline(0, color="gray", lw=1)
    ax.set_xticks(layers)
    ax.set_xlabel("MLP layer (output at subject tokens)")
    ax.set_ylabel("score")
    ax.set_title("Two measurements per MLP (FLU layers green)" + suffix)
    ax.legend(fontsize=7)
    paths.append(directory / "total_effect.png")
    mio.save_figure(fig, paths[-1])
    plt.close(fig)
  return paths


def save_evidence(
    result: FactLookupResult,
    directory: str | os.PathLike,
    extra: dict[str, Any] | None = None,
    title: str = "",
) -> dict[str, pathlib.Path]:
  """Writes fact_lookup.json and the three plots atomically; returns their paths."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  data = result.to_json()
  if extra:
    data["context"] = extra
  json_path = directory / "fact_lookup.json"
  mio.write_json(json_path, data)
  plots = plot_evidence(result, directory, title)
  return {"json": json_path, **{p.stem: p for p in plots}}
