"""Attribution patching (AP, METHOD §2): every component's score from 2 forwards + 1 backward.

Setup: clean prompts and corrupted prompts (subject tokens replaced, see
`corruption.py`), aligned column by column.

Metric. Per prompt, the logit difference at the last position
    ld_i = logit[answer_i] - mean_k logit[wrong_ik]
(each prompt's OWN wrong answers, -1 padding ignored). Over prompts m = mean_i ld_i,
and the normalized ("noising") metric is, as in the reference code,
    M = (m - m_clean) / (m_clean - m_corrupt),
so M = 0 on clean prompts and M = -1 on corrupted ones. We normalize the batch
means rather than averaging per-prompt ratios: a prompt whose corruption barely moves
its logit difference would otherwise dominate with a huge ratio.

Score. For an activation a (one site; one head for per-head sites),
    score(a) = sum_{batch, seq, dims} (a_corrupt - a_clean) * dM/da |clean,
the first-order prediction of the change in M when a alone takes its corrupted value
in the clean run: about -1 for a component that carries the whole effect, 0 for
one that does not matter. Gradients come from a single `jax.grad` with respect to
zero deltas inserted at every site (`interventions.AddDelta`); the metric only needs
the logits of the candidate answers, so the 262k-way unembedding is never formed.
Columns before the first corrupted token are identical in both runs (causal
attention), so only the later columns are run, against the clean prefix's attention
keys and values (`interventions.with_prefix`): with the sports template this skips
over half the columns.

Sites scored (see `interventions.SITE_KINDS`): per head "q", "k", "v" (projection
outputs) and "head_out" (the per-head input of the output projection; by linearity its
score equals that of the head's write into the residual stream, TransformerLens's
"result"), per MLP "mlp_in", "mlp_out", and per weight matrix: gate -> "gate", up ->
"up" (their outputs), down -> "mlp_hidden" (its input: for a linear map, input
attribution equals output attribution, and the input also gives per-neuron scores).
`APResult.matrix_scores` maps these onto the weight matrices.

Many devices: for a model placed on a multi-device mesh (`sharding.shard_model`),
each chunk of prompts is split over the mesh's "data" axis; a chunk the axis does not
divide is padded with rows of weight 0 in the summed metric (their gradients, hence
their scores, are exactly 0), and the padded rows' logit differences are dropped.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from mech_unlearn_jax import interventions as iv
from mech_unlearn_jax import sharding
from mech_unlearn_jax.batch import FactBatch
from mech_unlearn_jax.models.forward import named_inputs
from mech_unlearn_jax.models.transformer import CausalLM

DEFAULT_KINDS = ("q", "k", "v", "head_out", "mlp_in", "mlp_out", "gate", "up", "mlp_hidden")

# Which site stands for which weight matrix (matrix names as in parameter labels).
MATRIX_SITES = {
    "query": "q",
    "key": "k",
    "value": "v",
    "output": "head_out",
    "gating_linear": "gate",
    "value_linear": "up",
    "out_linear": "mlp_hidden",
}


# ----------------------------------------------------------------------------------
# Metric pieces.


def last_hidden(model: CausalLM, tokens_BxL, positions_BxL, **side_inputs) -> pz.nx.NamedArray:
  """Final-normed residual stream at the last column, axes (batch, embedding)."""
  tokens, positions = named_inputs(tokens_BxL, positions_BxL)
  hidden = model.residual(tokens, token_positions=positions, **side_inputs)
  return hidden[{"seq": -1}]


_ELEMENTWISE = (pz.nn.TanhSoftCap, pz.nn.CastToDType, pz.nn.ConstantRescale, pz.nn.Identity)


def candidate_logits(model: CausalLM, hidden: pz.nx.NamedArray, ids_BxC) -> jax.Array:
  """Logits of the tokens `ids_BxC` (ids < 0 give 0) from hidden states (batch, embedding).

  Uses only the unembedding rows of the candidates when the unembedding is a tied
  `EmbeddingDecode` or a `Linear` followed by elementwise layers (soft cap, casts);
  otherwise falls back to the full vocabulary.
  """
  ids_BxC = jnp.asarray(ids_BxC)
  safe = pz.nx.wrap(jnp.maximum(ids_BxC, 0)).tag("batch", "candidates")
  layers = list(model.unembed.sublayers) if isinstance(model.unembed, pz.nn.Sequential) else [model.unembed]
  first, rest = layers[0], layers[1:]
  if isinstance(first, pz.nn.EmbeddingDecode | pz.nn.Linear) and all(
      isinstance(l, _ELEMENTWISE) for l in rest
  ):
    if isinstance(first, pz.nn.EmbeddingDecode):
      table = first.table.embeddings.value
    else:
      table = first.weights.value
    if set(table.named_shape) != {"vocabulary", "embedding"}:
      raise ValueError(f"unexpected unembedding axes {dict(table.named_shape)}")
    rows = table.untag("vocabulary")[safe]  # axes batch, candidates, embedding
    logits = pz.nx.nmap(jnp.dot)(rows.untag("embedding"), hidden.untag("embedding"))
    for layer in rest:
      logits = layer(logits)
  else:
    full = model.unembed(hidden)
    logits = pz.nx.nmap(lambda l, i: l[i])(full.untag("vocabulary"), safe)
  out = logits.untag("batch", "candidates").unwrap()
  return jnp.where(ids_BxC >= 0, out, 0.0)


def logit_diff(cand_logits_BxC: jax.Array, cand_ids_BxC) -> jax.Array:
  """Column 0 (answer) minus the mean of the valid (id >= 0) other columns, [B]."""
  valid = (jnp.asarray(cand_ids_BxC)[:, 1:] >= 0).astype(cand_logits_BxC.dtype)
  wrong = (cand_logits_BxC[:, 1:] * valid).sum(-1) / jnp.maximum(valid.sum(-1), 1.0)
  return cand_logits_BxC[:, 0] - wrong


def _check_batches(clean: FactBatch, corrupt_tokens_BxL) -> np.ndarray:
  corrupt = np.asarray(corrupt_tokens_BxL)
  if corrupt.shape != np.shape(clean.tokens_BxL):
    raise ValueError(
        f"corrupt_tokens_BxL has shape {corrupt.shape}, the clean batch"
        f" {np.shape(clean.tokens_BxL)}"
    )
  cands = clean.candidate_ids_BxC
  no_wrong = np.flatnonzero((cands[:, 1:] < 0).all(-1))
  if no_wrong.size:
    raise ValueError(f"rows {no_wrong.tolist()} have no wrong answers (wrong_ids_BxK all -1)")
  return corrupt


def _sum_except(x: pz.nx.NamedArray, keep: Iterable[str]) -> pz.nx.NamedArray:
  keep = set(keep)
  axes = [a for a in x.named_shape if a not in keep]
  return pz.nx.nmap(jnp.sum)(x.untag(*axes))


def head_axes_of(x: pz.nx.NamedArray) -> tuple[str, ...]:
  return tuple(a for a in iv.HEAD_AXES if a in x.named_shape)


# ----------------------------------------------------------------------------------
# The AP pass.


def _ap_traced(
    model, sites, clean_tokens, corrupt_tokens, positions, cand_ids, per_neuron, start,
    row_weights_B=None,
):
  """Unnormalized scores (sum over prompts of Δa · d ld_i / da) and per-prompt lds.

  Columns before `start` are identical in both runs (so Δa = 0 there): only the
  columns from `start` on are run, against the clean prefix's keys and values.
  `row_weights_B` (0 on padding rows) weights the summed metric; None: all 1.
  """
  side = {}
  if start > 0:
    prefix = iv.prefix_key_values(model, clean_tokens[:, :start], positions[:, :start])
    side[iv.KV_POSITIONS] = pz.nx.wrap(jnp.asarray(positions)).tag("batch", "seq")
    body = iv.with_prefix(model, prefix)
    clean_tokens, corrupt_tokens = clean_tokens[:, start:], corrupt_tokens[:, start:]
    positions = positions[:, start:]
  else:
    body = model

  def run(hooked, tokens):
    hidden = last_hidden(hooked, tokens, positions, **side)
    return logit_diff(candidate_logits(model, hidden, cand_ids), cand_ids)

  hooked = iv.with_captures(body, sites)
  corrupt_ld = run(hooked, corrupt_tokens)
  corrupt_acts = jax.lax.stop_gradient(iv.captured_values(hooked))

  def total_ld(deltas):
    patched = iv.insert_hooks(
        body, {s: [iv.AddDelta(s, deltas[s]), iv.Capture(s, pz.StateVariable(None))] for s in sites}
    )
    ld = run(patched, clean_tokens)
    total = ld.sum() if row_weights_B is None else (ld * row_weights_B).sum()
    return total, (ld, iv.captured_values(patched))

  zeros = jax.tree.map(jnp.zeros_like, corrupt_acts)
  grads, (clean_ld, clean_acts) = jax.grad(total_ld, has_aux=True)(zeros)
  scores, neurons = {}, {}
  for s in sites:
    product = (corrupt_acts[s] - clean_acts[s]) * grads[s]
    scores[s] = _sum_except(product, iv.HEAD_AXES)
    if per_neuron and s.kind == "mlp_hidden":
      neurons[s.layer] = _sum_except(product, ("neurons",))
  return scores, neurons, clean_ld, corrupt_ld


def _frozen_ap(
    unbound, params, clean_tokens, corrupt_tokens, positions, cand_ids, sites, per_neuron, start,
    row_weights_B=None,
):
  model = pz.bind_variables(unbound, params)
  return _ap_traced(
      model, sites, clean_tokens, corrupt_tokens, positions, cand_ids, per_neuron, start, row_weights_B
  )


_AP_STATIC = ("sites", "per_neuron", "start")
_jitted_ap = jax.jit(_frozen_ap, static_argnames=_AP_STATIC)


@functools.lru_cache(maxsize=8)
def _sharded_ap(mesh: jax.sharding.Mesh):
  # Scores are sums over prompts: replicated outputs, readable on every host.
  return jax.jit(_frozen_ap, static_argnames=_AP_STATIC, out_shardings=sharding.replicated(mesh))


def _ap_chunk(mesh, unbound, params, clean_tokens, corrupt_tokens, positions, cand_ids, sites, per_neuron, start):
  """One jitted AP call; on a multi-device mesh, padded and split over "data"."""
  if mesh is None:
    return _jitted_ap(
        unbound, params, clean_tokens, corrupt_tokens, positions, cand_ids, sites, per_neuron, start
    )
  n = np.shape(clean_tokens)[0]
  size = sharding.padded_size(n, sharding.data_size(mesh))
  weights = (np.arange(size) < n).astype(np.float32)
  rows = [sharding.pad_rows(x, size) for x in (clean_tokens, corrupt_tokens, positions, cand_ids)]
  rows = sharding.shard_batch([*rows, weights], mesh)
  scores, neurons, clean_ld, corrupt_ld = _sharded_ap(mesh)(
      unbound, params, *rows[:4], sites, per_neuron, start, rows[4]
  )
  return scores, neurons, clean_ld[:n], corrupt_ld[:n]


def first_differing_column(clean_tokens_BxL, corrupt_tokens_BxL) -> int:
  """The first column where any row's clean and corrupted tokens differ."""
  differs = (np.asarray(clean_tokens_BxL) != np.asarray(corrupt_tokens_BxL)).any(0)
  if not differs.any():
    raise ValueError("the corrupted tokens equal the clean tokens: nothing to attribute")
  return int(differs.argmax())


@dataclasses.dataclass(frozen=True)
class APConfig:
  """Attribution patching options.

  Attributes:
    kinds: site kinds to score (see `interventions.SITE_KINDS`), in every layer.
    batch_size: prompts per jitted call (None: all at once).
    per_neuron: also return per-neuron scores of "mlp_hidden" (needs that kind).
    reuse_prefix: run only the columns from the first one where clean and corrupted
      tokens differ (earlier columns are identical in both runs and score 0); the
      scores are the same either way, up to float rounding.
  """

  kinds: tuple[str, ...] = DEFAULT_KINDS
  batch_size: int | None = None
  per_neuron: bool = False
  reuse_prefix: bool = True

  def __post_init__(self):
    bad = [k for k in self.kinds if k not in iv.SITE_KINDS or k == "embed"]
    if bad:
      raise ValueError(f"APConfig.kinds has unsupported kinds {bad}")
    if self.per_neuron and "mlp_hidden" not in self.kinds:
      raise ValueError("APConfig.per_neuron needs 'mlp_hidden' in kinds")
    if self.batch_size is not None and self.batch_size < 1:
      raise ValueError(f"APConfig.batch_size must be positive, got {self.batch_size}")


@dataclasses.dataclass(frozen=True)
class APResult:
  """Normalized AP scores (see the module docstring for units and sign).

  Attributes:
    scores: Site -> named array of the site's head axes ("query_heads", and
      "head_groups" with grouped KV) for per-head kinds, a scalar named array otherwise.
    neuron_scores: layer -> named array over "neurons" (if requested).
    clean_logit_diff_B, corrupt_logit_diff_B: per-prompt logit differences.
  """

  scores: dict[iv.Site, pz.nx.NamedArray]
  neuron_scores: dict[int, pz.nx.NamedArray] | None
  clean_logit_diff_B: np.ndarray
  corrupt_logit_diff_B: np.ndarray

  @property
  def clean_metric(self) -> float:
    return float(np.mean(self.clean_logit_diff_B))

  @property
  def corrupt_metric(self) -> float:
    return float(np.mean(self.corrupt_logit_diff_B))

  @property
  def num_layers(self) -> int:
    return 1 + max(s.layer for s in self.scores)

  def by_kind(self, kind: str) -> pz.nx.NamedArray:
    """Scores of one kind stacked over layers: axes ("layers", *head axes)."""
    layers = [self.scores.get(iv.Site(l, kind)) for l in range(self.num_layers)]
    if any(x is None for x in layers):
      raise KeyError(f"no {kind!r} scores in this result; kinds: {sorted({s.kind for s in self.scores})}")
    return pz.nx.stack(layers, "layers")

  def as_numpy(self) -> dict[iv.Site, np.ndarray]:
    """Site -> float array: heads flattened KV-group-major, () for MLP sites."""
    out = {}
    for site, x in self.scores.items():
      axes = head_axes_of(x)
      out[site] = np.asarray(x.untag(*axes).unwrap()).reshape(-1) if axes else np.asarray(x.unwrap())
    return out

  def matrix_scores(self) -> dict[tuple[int, str], float]:
    """(layer, matrix) -> score summed over heads, for the matrices of `MATRIX_SITES`."""
    out = {}
    for (layer_site, values) in self.as_numpy().items():
      for matrix, kind in MATRIX_SITES.items():
        if kind == layer_site.kind:
          out[(layer_site.layer, matrix)] = float(np.sum(values))
    return out


def attribution_patching(
    model: CausalLM,
    clean: FactBatch,
    corrupt_tokens_BxL: np.ndarray,
    config: APConfig = APConfig(),
) -> APResult:
  """AP scores of every site of `config.kinds` in every layer (METHOD §2).

  Args:
    model: the model (parameters are treated as constants).
    clean: clean prompts with answers and wrong answers.
    corrupt_tokens_BxL: the same prompts with subjects corrupted, same columns.
    config: kinds, batching.
  """
  corrupt = _check_batches(clean, corrupt_tokens_BxL)
  # One shared start for every chunk: one compilation.
  start = first_differing_column(clean.tokens_BxL, corrupt) if config.reuse_prefix else 0
  sites = tuple(iv.all_sites(model.config.num_layers, config.kinds))
  unbound, params = sharding.unbind_for_jit(model)
  mesh = sharding.mesh_of((unbound, params))
  size = clean.size
  step = config.batch_size or size
  raw, neurons, clean_lds, corrupt_lds = None, None, [], []
  for lo in range(0, size, step):
    hi = min(lo + step, size)
    part = clean.slice(lo, hi)
    scores, nscores, clean_ld, corrupt_ld = _ap_chunk(
        mesh, unbound, params, part.tokens_BxL, corrupt[lo:hi], part.positions_BxL,
        part.candidate_ids_BxC, sites, config.per_neuron, start,
    )
    raw = scores if raw is None else jax.tree.map(jnp.add, raw, scores)
    neurons = nscores if neurons is None else jax.tree.map(jnp.add, neurons, nscores)
    clean_lds.append(np.asarray(clean_ld))
    corrupt_lds.append(np.asarray(corrupt_ld))
  clean_ld = np.concatenate(clean_lds)
  corrupt_ld = np.concatenate(corrupt_lds)
  total_effect = float(clean_ld.mean() - corrupt_ld.mean())
  if not abs(total_effect) > 1e-6:
    raise ValueError(
        f"clean and corrupted prompts have the same mean logit difference"
        f" ({clean_ld.mean():.6g}); the normalized metric is undefined (is the corruption a no-op?)"
    )
  # dM/da = (1 / N) d(sum_i ld_i)/da / (m_clean - m_corrupt).
  scale = 1.0 / (size * total_effect)
  return APResult(
      scores={s: x * scale for s, x in raw.items()},
      neuron_scores={l: x * scale for l, x in neurons.items()} if config.per_neuron else None,
      clean_logit_diff_B=clean_ld,
      corrupt_logit_diff_B=corrupt_ld,
  )


# ----------------------------------------------------------------------------------
# Exact activation patching (the quantity AP approximates), for validation.


@dataclasses.dataclass(frozen=True, order=True)
class Component:
  """A site, or one head of a per-head site (`head` = flat index, KV-group-major)."""

  site: iv.Site
  head: int | None = None

  def __str__(self) -> str:
    return f"{self.site}" if self.head is None else f"{self.site}.h{self.head}"


def _head_mask(head_shape: dict[str, int], head: int | None) -> np.ndarray:
  sizes = tuple(head_shape.values())
  mask = np.zeros(sizes, dtype=np.float32)
  if head is None:
    mask[...] = 1.0
  else:
    if not 0 <= head < mask.size:
      raise ValueError(f"head {head} outside 0..{mask.size - 1}")
    mask.reshape(-1)[head] = 1.0
  return mask


def _component_lds(model, sites, masks, clean_tokens, corrupt_tokens, positions, cand_ids, eps):
  """[C, B] logit differences, component c patched by eps * masks[site][c] * (corrupt - clean).

  `masks[site]` has shape [C, *site head axes] (0/1); the C patched runs are batched
  along a "component" axis that enters the model at the patched sites.
  """
  clean_acts = iv.capture_traced(model, sites, clean_tokens, positions)
  corrupt_acts = iv.capture_traced(model, sites, corrupt_tokens, positions)
  hooks = {}
  for site in sites:
    diff = corrupt_acts[site] - clean_acts[site]
    mask = pz.nx.wrap(masks[site]).tag("component", *head_axes_of(diff))
    hooks[site] = iv.AddDelta(site, diff * mask * eps)
  # The "component" axis must exist before the patched sites: penzai's attention
  # einsums reject a batch axis that only keys or values carry.
  first = iv.Site(0, "resid_pre")
  num = next(iter(masks.values())).shape[0]
  widen = iv.AddDelta(first, pz.nx.zeros({"component": num}))
  patched = iv.insert_hooks(iv.insert_hooks(model, {first: widen}), hooks)
  hidden = last_hidden(patched, clean_tokens, positions)
  hidden = hidden.untag("component", "batch", "embedding").unwrap()
  logits = jax.vmap(
      lambda h: candidate_logits(model, pz.nx.wrap(h).tag("batch", "embedding"), cand_ids)
  )(hidden)
  return jax.vmap(lambda l: logit_diff(l, cand_ids))(logits)


def _frozen_component_lds(unbound, params, masks, clean_tokens, corrupt_tokens, positions, cand_ids, eps, sites):
  model = pz.bind_variables(unbound, params)
  return _component_lds(model, sites, masks, clean_tokens, corrupt_tokens, positions, cand_ids, eps)


_jitted_component_lds = jax.jit(_frozen_component_lds, static_argnames="sites")


def site_head_shape(model: CausalLM, site: iv.Site) -> dict[str, int]:
  """Head axes (in `HEAD_AXES` order) of a site's activation; {} for non-head sites."""
  meta = model.metadata
  if site.kind in ("q", "head_out"):
    axes = {**meta.common_head_axes, **meta.query_only_head_axes}
  elif site.kind in ("k", "v"):
    axes = dict(meta.common_head_axes)
  else:
    axes = {}
  return {a: axes[a] for a in iv.HEAD_AXES if a in axes}


def activation_patching(
    model: CausalLM,
    clean: FactBatch,
    corrupt_tokens_BxL: np.ndarray,
    components: Sequence[Component],
    eps: float = 1.0,
    components_per_call: int = 16,
) -> np.ndarray:
  """Exact effect of patching each component, in AP's units, [len(components)].

  Component c's activation becomes clean + eps * (corrupt - clean) (eps = 1: the
  corrupted value) in an otherwise clean run; the result is
  (m_patched - m_clean) / (m_clean - m_corrupt) / eps, which AP approximates to first
  order (exactly, as eps -> 0). Components run batched along a "component" axis,
  `components_per_call` at a time (one compilation for all chunks).
  """
  corrupt = _check_batches(clean, corrupt_tokens_BxL)
  components = list(components)
  if not components:
    return np.zeros((0,), np.float32)
  sites = tuple(sorted({c.site for c in components}))
  head_shapes = {s: tuple(site_head_shape(model, s).values()) for s in sites}
  unbound, params = sharding.unbind_for_jit(model)
  size = min(components_per_call, len(components))

  def run(chunk, tokens, eps_value):
    masks = {s: np.zeros((size, *head_shapes[s]), np.float32) for s in sites}
    for i, c in enumerate(chunk):
      masks[c.site][i] = _head_mask(dict(enumerate(head_shapes[c.site])), c.head)
    lds = _jitted_component_lds(
        unbound, params, masks, tokens, corrupt, clean.positions_BxL,
        clean.candidate_ids_BxC, jnp.float32(eps_value), sites,
    )
    return np.asarray(lds)[: len(chunk)]

  clean_ld = run(components[:1], clean.tokens_BxL, 0.0)[0]
  corrupt_ld = run(components[:1], corrupt, 0.0)[0]
  m_clean, m_corrupt = clean_ld.mean(), corrupt_ld.mean()
  out = []
  for start in range(0, len(components), size):
    lds = run(components[start : start + size], clean.tokens_BxL, eps)
    out.append((lds.mean(-1) - m_clean) / (m_clean - m_corrupt) / eps)
  return np.concatenate(out)


def ap_component_scores(result: APResult, components: Sequence[Component]) -> np.ndarray:
  """AP scores of the given components (a head's entry or a whole site's sum)."""
  flat = result.as_numpy()
  return np.asarray([
      float(np.sum(flat[c.site])) if c.head is None else float(flat[c.site][c.head])
      for c in components
  ])


def spearman(a, b) -> float:
  """Spearman rank correlation (average ranks for ties)."""

  def ranks(x):
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    for value in np.unique(x):
      tied = x == value
      r[tied] = r[tied].mean()
    return r

  ra, rb = ranks(a), ranks(b)
  ra, rb = ra - ra.mean(), rb - rb.mean()
  denom = np.sqrt((ra**2).sum() * (rb**2).sum())
  return float((ra * rb).sum() / denom) if denom else float("nan")


def compare_with_activation_patching(
    model: CausalLM,
    clean: FactBatch,
    corrupt_tokens_BxL: np.ndarray,
    result: APResult | None = None,
    mlp_kinds: Sequence[str] = ("mlp_out",),
    head_kind: str = "head_out",
    num_heads_sampled: int | None = None,
    seed: int = 0,
) -> dict[str, object]:
  """Spearman correlation between AP and exact patching (MLPs, and a sample of heads).

  Returns a dict with "mlp_spearman", "head_spearman", "all_spearman" and the
  components with both scores ("components", "ap", "patching").
  """
  if result is None:
    kinds = tuple(dict.fromkeys([*mlp_kinds, head_kind]))
    result = attribution_patching(model, clean, corrupt_tokens_BxL, APConfig(kinds=kinds))
  num_layers = model.config.num_layers
  mlps = [Component(iv.Site(l, k)) for k in mlp_kinds for l in range(num_layers)]
  num_heads = result.as_numpy()[iv.Site(0, head_kind)].size
  heads = [Component(iv.Site(l, head_kind), h) for l in range(num_layers) for h in range(num_heads)]
  if num_heads_sampled is not None and num_heads_sampled < len(heads):
    pick = np.random.default_rng(seed).choice(len(heads), num_heads_sampled, replace=False)
    heads = [heads[i] for i in sorted(pick)]
  components = mlps + heads
  exact = activation_patching(model, clean, corrupt_tokens_BxL, components)
  approx = ap_component_scores(result, components)
  n = len(mlps)
  return {
      "mlp_spearman": spearman(approx[:n], exact[:n]),
      "head_spearman": spearman(approx[n:], exact[n:]),
      "all_spearman": spearman(approx, exact),
      "components": [str(c) for c in components],
      "ap": approx,
      "patching": exact,
  }
