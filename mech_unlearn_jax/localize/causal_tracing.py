"""Causal tracing (CT, METHOD §2; Meng et al. 2022 "ROME"), all restorations batched.

Corrupted run: Gaussian noise is added to the subject tokens' embeddings (at the
"embed" site: the table lookup, before Gemma's sqrt(d) scaling), with standard
deviation `noise_scale * sigma`, sigma = the std of the embedding table (ROME used
3 x the std of subject-token embeddings; `sigma_from="subjects"` does that). The
reference code used sqrt(3 * sigma) (a bug), kept as `noise="reference"`.

Restoration: one component (an MLP's output, or one head's output before the output
projection) gets its clean value back, at all positions (default) or at one position
(`per_position`), in the corrupted run. Per run we read q = the probability of the
prompt's OWN correct answer at the last position (full-vocabulary softmax); the
reference summed, for every prompt, the probabilities of ALL prompts' answer tokens
(a bug), kept as `recovery="reference"`. Probabilities are averaged over the noise
samples (the same noise for the corrupted baseline and every restoration), then

    recovery = (mean_b q_patch - mean_b q_corrupt) / (mean_b q_clean - mean_b q_corrupt)

(batch means first, as the reference normalizes batch-level quantities; per-prompt
ratios are unstable when noise barely hurts a prompt). 1 = full recovery.

How it is batched (all restorations in one jitted call per prompt chunk):
  * Restoring a component of layer l leaves layers < l equal to the corrupted run,
    so the corrupted run is carried as row 0 of a "restoration" axis and layer l's
    restorations branch off it there: every restoration runs only the suffix of the
    network from its own layer on.
  * A head restoration starts at the head outputs (no recomputation of its q/k/v),
    an MLP restoration replaces the MLP output (the restored MLP is never run).
  * Columns before the first subject token are identical in the clean, corrupted and
    every restored run (causal attention; noise only on the subject), so only the
    columns from there on are computed; attention reads the prefix keys/values from
    the clean run (`reuse_prefix`).
  * The last layer only computes the last column, the one that is read out.
`causal_tracing_unbatched` is the straightforward one-restoration-per-forward version
the batched one is tested against.

Many devices: for a model placed on a multi-device mesh (`sharding.shard_model`),
each chunk of prompts is split over the mesh's "data" axis (rows are independent, so
a chunk the axis does not divide is padded with copies of its last row, which are
dropped from the outputs).

New named axes here: "sample" (noise samples), "restoration" (rows of the batched
run), "layers", "heads_flat" (query heads flattened KV-group-major).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from mech_unlearn_jax import interventions as iv
from mech_unlearn_jax import sharding
from mech_unlearn_jax.batch import FactBatch
from mech_unlearn_jax.models.forward import named_inputs
from mech_unlearn_jax.models.transformer import CausalLM

@dataclasses.dataclass(frozen=True)
class CTConfig:
  """Causal tracing options.

  Attributes:
    num_samples: noise samples per prompt (probabilities are averaged over them).
    noise_scale: multiplier of sigma (ROME: 3).
    noise: "rome" (std = noise_scale * sigma) or "reference" (sqrt(noise_scale * sigma)).
    sigma_from: "table" (std of the whole embedding table) or "subjects" (std of the
      batch's subject-token embeddings, as ROME).
    recovery: "own" (each prompt's own answer) or "reference" (sum over every
      prompt's answer token, duplicates included).
    per_position: restore each component at one position at a time (columns before
      the first subject token are exact no-ops and report 0).
    heads, mlps: which components to restore.
    seed: noise seed (noise depends on seed, prompt index and padded width only).
    prompts_per_call: prompts per jitted call (None: all); bounds memory.
    reuse_prefix: compute only columns from the first subject token on.
  """

  num_samples: int = 10
  noise_scale: float = 3.0
  noise: Literal["rome", "reference"] = "rome"
  sigma_from: Literal["table", "subjects"] = "table"
  recovery: Literal["own", "reference"] = "own"
  per_position: bool = False
  heads: bool = True
  mlps: bool = True
  seed: int = 0
  prompts_per_call: int | None = None
  reuse_prefix: bool = True

  def __post_init__(self):
    if self.noise not in ("rome", "reference"):
      raise ValueError(f"CTConfig.noise must be 'rome' or 'reference', got {self.noise!r}")
    if self.sigma_from not in ("table", "subjects"):
      raise ValueError(f"CTConfig.sigma_from must be 'table' or 'subjects', got {self.sigma_from!r}")
    if self.recovery not in ("own", "reference"):
      raise ValueError(f"CTConfig.recovery must be 'own' or 'reference', got {self.recovery!r}")
    if self.num_samples < 1:
      raise ValueError(f"CTConfig.num_samples must be >= 1, got {self.num_samples}")
    if not (self.heads or self.mlps):
      raise ValueError("CTConfig: at least one of heads, mlps must be True")
    if self.prompts_per_call is not None and self.prompts_per_call < 1:
      raise ValueError(f"CTConfig.prompts_per_call must be positive, got {self.prompts_per_call}")


@dataclasses.dataclass(frozen=True)
class CTResult:
  """Causal tracing output.

  Attributes:
    mlp: recovery per layer, [layers] (per position: [layers, L]); None if not run.
    heads: recovery per head, [layers, heads] (per position: [layers, heads, L]).
    q_clean_B, q_corrupt_B: per-prompt answer probability (or, with
      recovery="reference", summed answer probabilities), corrupted averaged over
      noise samples.
    q_mlp_B, q_heads_B: the same for every restoration, prompt axis first.
    noise_std: the noise standard deviation used.
    per_position: whether the arrays have a trailing column axis.
  """

  mlp: np.ndarray | None
  heads: np.ndarray | None
  q_clean_B: np.ndarray
  q_corrupt_B: np.ndarray
  q_mlp_B: np.ndarray | None
  q_heads_B: np.ndarray | None
  noise_std: float
  per_position: bool = False

  def scores(self) -> dict[iv.Site, np.ndarray]:
    """Site(l, "mlp_out") -> recovery, Site(l, "head_out") -> per-head recoveries."""
    out = {}
    if self.mlp is not None:
      out.update({iv.Site(l, "mlp_out"): self.mlp[l] for l in range(self.mlp.shape[0])})
    if self.heads is not None:
      out.update({iv.Site(l, "head_out"): self.heads[l] for l in range(self.heads.shape[0])})
    return out

  def named(self) -> dict[str, pz.nx.NamedArray]:
    """Named views for treescope: "mlp" (layers[, seq]), "heads" (layers, heads_flat[, seq])."""
    out = {}
    seq = ("seq",) if self.per_position else ()
    if self.mlp is not None:
      out["mlp"] = pz.nx.wrap(self.mlp).tag("layers", *seq)
    if self.heads is not None:
      out["heads"] = pz.nx.wrap(self.heads).tag("layers", "heads_flat", *seq)
    return out


# ----------------------------------------------------------------------------------
# Shared pieces.


def embedding_table(model: CausalLM) -> pz.nx.NamedArray:
  """The token embedding table (axes vocabulary, embedding)."""
  lookup = pz.select(model.embed).at_instances_of(pz.nn.EmbeddingLookup).get_sequence()
  if len(lookup) != 1:
    raise ValueError("expected exactly one EmbeddingLookup in model.embed")
  return lookup[0].table.embeddings.value


def noise_std(model: CausalLM, batch: FactBatch, config: CTConfig) -> float:
  """Standard deviation of the subject-embedding noise (see `CTConfig`)."""
  table = embedding_table(model).untag("vocabulary", "embedding").unwrap()
  if config.sigma_from == "table":
    sigma = float(jnp.std(table))
  else:
    ids = np.asarray(batch.tokens_BxL)[np.asarray(batch.subject_mask_BxL, bool)]
    if ids.size == 0:
      raise ValueError("sigma_from='subjects' needs subject tokens in the batch")
    sigma = float(jnp.std(table[jnp.asarray(ids)]))
  if config.noise == "rome":
    return config.noise_scale * sigma
  return float(np.sqrt(config.noise_scale * sigma))


def subject_noise(seed: int, prompt_indices, num_samples: int, length: int, dim: int) -> jax.Array:
  """Standard normal noise [S, B, L, D]; prompt b's noise depends on (seed, index_b)."""
  key = jax.random.key(seed)

  def one(index):
    return jax.random.normal(jax.random.fold_in(key, index), (num_samples, length, dim))

  return jnp.swapaxes(jax.vmap(one)(jnp.asarray(prompt_indices, jnp.uint32)), 0, 1)


def _answer_mass(model: CausalLM, hidden: pz.nx.NamedArray, prob_ids_BxK, max_logits: int = 1 << 24):
  """Sum over K of p(prob_ids[b, k]) (full-vocabulary softmax), for hidden (..., batch, embedding).

  Rows are unembedded in chunks of at most `max_logits` logits, so the [rows, vocab]
  logits never exist all at once.
  """
  other = [a for a in hidden.named_shape if a not in ("batch", "embedding")]
  flat = hidden.untag(*other, "batch", "embedding").unwrap()
  lead = flat.shape[:-2]
  b, d = flat.shape[-2:]
  flat = flat.reshape(-1, b, d)
  n = flat.shape[0]
  vocab = model.config.vocab_size
  chunk = max(1, min(n, max_logits // max(1, b * vocab)))
  pad = (-n) % chunk
  flat = jnp.concatenate([flat, jnp.zeros((pad, b, d), flat.dtype)]) if pad else flat
  ids = jnp.asarray(prob_ids_BxK)

  def mass(h_CxBxD):
    named = pz.nx.wrap(h_CxBxD).tag("rows", "batch", "embedding")
    logits = model.unembed(named).untag("rows", "batch", "vocabulary").unwrap().astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, jnp.broadcast_to(ids[None], (logp.shape[0], *ids.shape)), -1)
    return jnp.exp(picked).sum(-1)

  out = jax.lax.map(mass, flat.reshape(-1, chunk, b, d)).reshape(-1, b)[:n]
  return pz.nx.wrap(out.reshape(*lead, b)).tag(*other, "batch")


def _prob_ids(batch: FactBatch, config: CTConfig, all_answers: np.ndarray) -> np.ndarray:
  if config.recovery == "own":
    return np.asarray(batch.answer_ids_B, np.int32)[:, None]
  return np.broadcast_to(np.asarray(all_answers, np.int32)[None], (batch.size, len(all_answers)))


def _head_shape(model: CausalLM) -> dict[str, int]:
  meta = model.metadata
  shape = {**meta.common_head_axes, **meta.query_only_head_axes}
  return {a: shape[a] for a in iv.HEAD_AXES if a in shape}


def _one_hot_heads(head_shape: dict[str, int]) -> np.ndarray:
  num = int(np.prod(list(head_shape.values())))
  return np.eye(num, dtype=bool).reshape(num, *head_shape.values())


# ----------------------------------------------------------------------------------
# The batched core.


@dataclasses.dataclass(frozen=True)
class _BlockParts:
  pre_attn: pz.nn.Layer
  attention: pz.nn.Attention
  qk_to_attn: pz.nn.Layer
  attn_to_z: pz.nn.Layer
  out_proj: pz.nn.Layer
  post_attn: pz.nn.Layer
  mlp: pz.nn.Layer


def _block_parts(block, layer: int) -> _BlockParts:
  """Splits a block into the pieces the batched core calls one by one."""
  attn_res, mlp_res = block.sublayers
  seq = attn_res.delta
  kinds = [isinstance(s, pz.nn.Attention) for s in getattr(seq, "sublayers", [])]
  if kinds.count(True) != 1:
    raise ValueError(
        f"layer {layer}: the attention residual must be a Sequential with one top-level"
        " Attention for batched causal tracing"
    )
  i = kinds.index(True)
  attention = seq.sublayers[i]
  out = attention.attn_value_to_output
  if not isinstance(out, pz.nn.Sequential) or not isinstance(out.sublayers[-1], pz.nn.Linear):
    raise ValueError(f"layer {layer}: attn_value_to_output must end with the output Linear")
  qk = iv.reading_kv_positions(attention, layer).query_key_to_attn
  return _BlockParts(
      pre_attn=pz.nn.Sequential(seq.sublayers[:i]),
      attention=attention,
      qk_to_attn=qk,
      attn_to_z=pz.nn.Sequential(out.sublayers[:-1]),
      out_proj=out.sublayers[-1],
      post_attn=pz.nn.Sequential(seq.sublayers[i + 1 :]),
      mlp=mlp_res.delta,
  )


def _rows_like(x0: pz.nx.NamedArray, n: int) -> pz.nx.NamedArray:
  return x0 + pz.nx.zeros({"restoration": n}, dtype=x0.dtype)


def _ct_traced(
    model, tokens_BxL, positions_BxL, subject_mask_BxL, noise_SxBxLxD, std, prob_ids_BxK,
    *, start, per_position, heads, mlps,
):
  """Returns (q_clean [B], q_rows [R, S, B]); row 0 is the corrupted run."""
  num_layers = model.config.num_layers
  width = tokens_BxL.shape[1]
  tokens, positions = named_inputs(tokens_BxL, positions_BxL)
  head_shape = _head_shape(model)
  head_axes = tuple(head_shape)

  # Clean run: component outputs to restore, prefix residuals for prefix keys/values.
  sites = []
  if heads:
    sites += [iv.Site(l, "head_out") for l in range(num_layers)]
  if mlps:
    sites += [iv.Site(l, "mlp_out") for l in range(num_layers)]
  if start > 0:
    sites += [iv.Site(l, "resid_pre") for l in range(num_layers)]
  hooked = iv.with_captures(model, sites)
  clean_hidden = hooked.residual(tokens, token_positions=positions)[{"seq": -1}]
  clean = iv.captured_values(hooked)
  q_clean = _answer_mass(model, clean_hidden, prob_ids_BxK)

  suffix = slice(start, width)
  pos_suf = positions[{"seq": suffix}]
  pos_pre = positions[{"seq": slice(0, start)}]
  noise = pz.nx.wrap(noise_SxBxLxD[:, :, start:] * std).tag("sample", "batch", "seq", "embedding")
  subject = pz.nx.wrap(jnp.asarray(subject_mask_BxL)[:, start:]).tag("batch", "seq")
  noisy = iv.insert_hooks(model, {iv.Site(0, "embed"): iv.AddMaskedNoise(iv.Site(0, "embed"), noise, subject)})
  x = noisy.embed(tokens[{"seq": suffix}], token_positions=pos_suf)[{"restoration": None}]

  num_cols = width - start
  num_heads = int(np.prod(list(head_shape.values()))) if heads else 0
  heads_1hot = _one_hot_heads(head_shape) if heads else None
  for l, block in enumerate(model.blocks.sublayers):
    parts = _block_parts(block, l)
    last = l == num_layers - 1
    q_cols = slice(num_cols - 1, num_cols) if last else slice(0, num_cols)
    h = parts.pre_attn(x, token_positions=pos_suf)
    attn = parts.attention
    q = attn.input_to_query(h[{"seq": q_cols}], token_positions=pos_suf[{"seq": q_cols}])
    k = attn.input_to_key(h, token_positions=pos_suf)
    v = attn.input_to_value(h, token_positions=pos_suf)
    if start > 0:
      h_pre = parts.pre_attn(clean[iv.Site(l, "resid_pre")][{"seq": slice(0, start)}], token_positions=pos_pre)
      k_pre = attn.input_to_key(h_pre, token_positions=pos_pre)
      v_pre = attn.input_to_value(h_pre, token_positions=pos_pre)
      k = pz.nx.concatenate([iv.broadcast_like(k_pre, k, "seq"), k], "seq")
      v = pz.nx.concatenate([iv.broadcast_like(v_pre, v, "seq"), v], "seq")
    weights = parts.qk_to_attn(
        (q, k), token_positions=pos_suf[{"seq": q_cols}], **{iv.KV_POSITIONS: positions}
    )
    z = parts.attn_to_z((weights, v))
    x = x[{"seq": q_cols}]
    x0 = x[{"restoration": 0}]
    if heads:
      z_clean = clean[iv.Site(l, "head_out")][{"seq": suffix}][{"seq": q_cols}]
      if per_position:
        onehot = np.einsum("h...,pq->hp...q", heads_1hot, np.eye(num_cols, dtype=bool))
        onehot = onehot.reshape(num_heads * num_cols, *head_shape.values(), num_cols)
        mask = pz.nx.wrap(jnp.asarray(onehot)).tag("restoration", *head_axes, "seq")[{"seq": q_cols}]
      else:
        mask = pz.nx.wrap(jnp.asarray(heads_1hot)).tag("restoration", *head_axes)
      z_new = pz.nx.nmap(jnp.where)(mask, z_clean, z[{"restoration": 0}])
      z = pz.nx.concatenate([z, z_new], "restoration")
      x = pz.nx.concatenate([x, _rows_like(x0, z_new.named_shape["restoration"])], "restoration")
    x_mid = x + parts.post_attn(parts.out_proj(z), token_positions=pos_suf[{"seq": q_cols}])
    mlp_out = parts.mlp(x_mid, token_positions=pos_suf[{"seq": q_cols}])
    x = x_mid + mlp_out
    if mlps:
      mlp_clean = clean[iv.Site(l, "mlp_out")][{"seq": suffix}][{"seq": q_cols}]
      if per_position:
        mask = pz.nx.wrap(jnp.eye(num_cols, dtype=bool)).tag("restoration", "seq")[{"seq": q_cols}]
        restored = pz.nx.nmap(jnp.where)(mask, mlp_clean, mlp_out[{"restoration": 0}])
      else:
        restored = mlp_clean[{"restoration": None}]
      x_new = x_mid[{"restoration": 0}] + restored
      x = pz.nx.concatenate([x, iv.broadcast_like(x_new, x, "restoration")], "restoration")
  hidden = model.final_norm(x[{"seq": -1}])
  q_rows = _answer_mass(model, hidden, prob_ids_BxK)
  return q_clean.untag("batch").unwrap(), q_rows.untag("restoration", "sample", "batch").unwrap()


def _frozen_ct(unbound, params, tokens, positions, subject_mask, noise, std, prob_ids, **static):
  return _ct_traced(
      pz.bind_variables(unbound, params), tokens, positions, subject_mask, noise, std, prob_ids, **static
  )


_CT_STATIC = ("start", "per_position", "heads", "mlps")
_jitted_ct = jax.jit(_frozen_ct, static_argnames=_CT_STATIC)


@functools.lru_cache(maxsize=8)
def _sharded_ct(mesh: jax.sharding.Mesh):
  # Per-prompt probabilities are small: replicated outputs, readable on every host.
  return jax.jit(_frozen_ct, static_argnames=_CT_STATIC, out_shardings=sharding.replicated(mesh))


def _ct_chunk(mesh, unbound, params, tokens, positions, subject_mask, noise_SxBxLxD, std, prob_ids, **static):
  """One jitted CT call; on a multi-device mesh, padded and split over "data"."""
  if mesh is None:
    return _jitted_ct(unbound, params, tokens, positions, subject_mask, noise_SxBxLxD, std, prob_ids, **static)
  n = np.shape(tokens)[0]
  size = sharding.padded_size(n, sharding.data_size(mesh))
  rows = sharding.shard_batch([sharding.pad_rows(x, size) for x in (tokens, positions, subject_mask, prob_ids)], mesh)
  noise = sharding.shard_batch(sharding.pad_rows(noise_SxBxLxD, size, axis=1), mesh, axis=1)
  std = sharding.put(std, sharding.replicated(mesh))
  qc, qr = _sharded_ct(mesh)(unbound, params, *rows[:3], noise, std, rows[3], **static)
  return qc[:n], qr[:, :, :n]


def _row_layout(num_layers, num_heads, num_cols, config: CTConfig) -> list[tuple[int, str, int, int]]:
  """(layer, "head"/"mlp", head, column-in-suffix) of rows 1.. of the batched core."""
  rows = []
  cols = range(num_cols) if config.per_position else [-1]
  for l in range(num_layers):
    if config.heads:
      rows += [(l, "head", h, c) for h in range(num_heads) for c in cols]
    if config.mlps:
      rows += [(l, "mlp", -1, c) for c in cols]
  return rows


def _first_subject_column(batch: FactBatch, config: CTConfig) -> int:
  mask = np.asarray(batch.subject_mask_BxL, bool)
  empty = np.flatnonzero(~mask.any(1))
  if empty.size:
    raise ValueError(f"rows {empty.tolist()} have no subject tokens to corrupt")
  return int(mask.any(0).argmax()) if config.reuse_prefix else 0


def _assemble(model, batch, config, std, q_clean, q_corrupt, q_rows_by_row, start) -> CTResult:
  """Builds a CTResult from per-prompt q's. q_rows_by_row: dict row key -> [B]."""
  num_layers = model.config.num_layers
  width = np.shape(batch.tokens_BxL)[1]
  num_heads = int(np.prod(list(_head_shape(model).values())))
  b = batch.size
  pos_shape = (width,) if config.per_position else ()
  trailing = (1,) * len(pos_shape)
  q_mlp = q_heads = None
  if config.mlps:
    q_mlp = np.broadcast_to(q_corrupt.reshape(b, 1, *trailing), (b, num_layers, *pos_shape)).copy()
  if config.heads:
    q_heads = np.broadcast_to(
        q_corrupt.reshape(b, 1, 1, *trailing), (b, num_layers, num_heads, *pos_shape)
    ).copy()
  for (l, kind, h, c), q in q_rows_by_row.items():
    index = (slice(None), l) + ((h,) if kind == "head" else ()) + ((start + c,) if config.per_position else ())
    (q_heads if kind == "head" else q_mlp)[index] = q
  total = q_clean.mean() - q_corrupt.mean()

  def recovery(q):
    return None if q is None else (q.mean(0) - q_corrupt.mean()) / total

  return CTResult(
      mlp=recovery(q_mlp), heads=recovery(q_heads), q_clean_B=q_clean, q_corrupt_B=q_corrupt,
      q_mlp_B=q_mlp, q_heads_B=q_heads, noise_std=std, per_position=config.per_position,
  )


def causal_tracing(model: CausalLM, batch: FactBatch, config: CTConfig = CTConfig()) -> CTResult:
  """Restores every head and MLP of every layer (batched; see the module docstring)."""
  if pz.select(model).at_instances_of(iv.SiteHooks).get_sequence():
    raise ValueError("causal_tracing needs a model without intervention hooks (see remove_hooks)")
  std = noise_std(model, batch, config)
  start = _first_subject_column(batch, config)
  width = np.shape(batch.tokens_BxL)[1]
  num_heads = int(np.prod(list(_head_shape(model).values())))
  layout = _row_layout(model.config.num_layers, num_heads, width - start, config)
  prob_ids = _prob_ids(batch, config, np.asarray(batch.answer_ids_B))
  unbound, params = sharding.unbind_for_jit(model)
  mesh = sharding.mesh_of((unbound, params))
  step = config.prompts_per_call or batch.size
  q_clean, q_rows = [], []
  for lo in range(0, batch.size, step):
    hi = min(lo + step, batch.size)
    part = batch.slice(lo, hi)
    noise = subject_noise(config.seed, np.arange(lo, hi), config.num_samples, width, model.config.embedding_dim)
    qc, qr = _ct_chunk(
        mesh, unbound, params, part.tokens_BxL, part.positions_BxL, part.subject_mask_BxL, noise,
        jnp.float32(std), prob_ids[lo:hi],
        start=start, per_position=config.per_position, heads=config.heads, mlps=config.mlps,
    )
    q_clean.append(np.asarray(qc))
    q_rows.append(np.asarray(qr).mean(1))  # average over noise samples -> [R, b]
  q_clean = np.concatenate(q_clean)
  q_rows = np.concatenate(q_rows, axis=1)
  if q_rows.shape[0] != len(layout) + 1:
    raise AssertionError(f"batched core returned {q_rows.shape[0]} rows, expected {len(layout) + 1}")
  by_row = {key: q_rows[i + 1] for i, key in enumerate(layout)}
  return _assemble(model, batch, config, std, q_clean, q_rows[0], by_row, start)


# ----------------------------------------------------------------------------------
# Unbatched reference implementation (one forward per restoration), for validation.


def _frozen_single(unbound, params, tokens, positions, subject_mask, noise_BxLxD, prob_ids, clean, masks):
  """One corrupted forward; each site in `clean` is restored where masks[site] is true."""
  model = pz.bind_variables(unbound, params)
  embed = iv.Site(0, "embed")
  noise = pz.nx.wrap(noise_BxLxD).tag("batch", "seq", "embedding")
  subject = pz.nx.wrap(jnp.asarray(subject_mask)).tag("batch", "seq")
  hooks = {embed: iv.AddMaskedNoise(embed, noise, subject)}
  for site, value in clean.items():
    axes = (*(a for a in iv.HEAD_AXES if a in value.named_shape), "seq")
    hooks[site] = iv.Patch(site, value, pz.nx.wrap(masks[site]).tag(*axes))
  patched = iv.insert_hooks(model, hooks)
  tok, pos = named_inputs(tokens, positions)
  hidden = patched.residual(tok, token_positions=pos)[{"seq": -1}]
  return _answer_mass(model, hidden, prob_ids).untag("batch").unwrap()


_jitted_single = jax.jit(_frozen_single)


def causal_tracing_unbatched(model: CausalLM, batch: FactBatch, config: CTConfig = CTConfig()) -> CTResult:
  """Same result as `causal_tracing`, one full forward pass per restoration (slow).

  Every restorable site carries a `Patch` layer whose mask is all false except for
  the one component restored in that run (a false mask is an exact no-op), so all
  runs share one compiled function.
  """
  std = noise_std(model, batch, config)
  width = np.shape(batch.tokens_BxL)[1]
  head_shape = _head_shape(model)
  num_heads = int(np.prod(list(head_shape.values())))
  prob_ids = _prob_ids(batch, config, np.asarray(batch.answer_ids_B))
  unbound, params = sharding.unbind_for_jit(model)
  num_layers = model.config.num_layers
  sites = ([iv.Site(l, "head_out") for l in range(num_layers)] if config.heads else []) + (
      [iv.Site(l, "mlp_out") for l in range(num_layers)] if config.mlps else []
  )
  clean = iv.capture(model, sites, batch.tokens_BxL, batch.positions_BxL)
  off = {
      s: np.zeros((*(head_shape.values() if s.kind == "head_out" else ()), width), bool)
      for s in sites
  }
  run = functools.partial(
      _jitted_single, unbound, params, batch.tokens_BxL, batch.positions_BxL,
      batch.subject_mask_BxL,
  )
  q_clean = np.asarray(run(jnp.zeros((batch.size, width, model.config.embedding_dim)), prob_ids, clean, off))
  noise = subject_noise(config.seed, np.arange(batch.size), config.num_samples, width, model.config.embedding_dim) * std
  layout = _row_layout(num_layers, num_heads, width, config)
  heads_1hot = _one_hot_heads(head_shape)
  q_corrupt = np.zeros(batch.size)
  by_row = {key: np.zeros(batch.size) for key in layout}
  for sample in range(config.num_samples):
    q_corrupt += np.asarray(run(noise[sample], prob_ids, clean, off)) / config.num_samples
    for key in layout:
      l, kind, h, c = key
      site = iv.Site(l, "head_out" if kind == "head" else "mlp_out")
      columns = np.arange(width) == c if config.per_position else np.ones(width, bool)
      mask = (heads_1hot[h][..., None] & columns) if kind == "head" else columns
      masks = {**off, site: mask}
      by_row[key] += np.asarray(run(noise[sample], prob_ids, clean, masks)) / config.num_samples
  return _assemble(model, batch, config, std, q_clean, q_corrupt, by_row, 0)
