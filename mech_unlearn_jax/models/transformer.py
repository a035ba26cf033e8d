"""A llama-like decoder (Gemma 3, Gemma 2, Llama 3) as an immutable penzai pytree.

Built from penzai's parts (`pz.nn.Linear`, `RMSLayerNorm`, `Attention`, the GLU
feedforward of `llamalike_common`) plus what Gemma 3 adds: RMSNorm on queries and
keys, a local sliding-window / global attention pattern with its own RoPE settings,
pre- and post-norms around both sublayers, scaled input embeddings and a tied
unembedding.

Named axes (penzai's vocabulary, used everywhere in this library):
  "batch", "seq" (query position), "kv_seq" (key position), "embedding" (residual
  stream), "projection" (head dimension), "neurons" (MLP hidden), "vocabulary",
  and the head axes of `penzai.models.transformer.variants.llamalike_common`:
  "query_heads" only (one KV head), "heads" (no grouping) or "head_groups" x
  "query_heads" (grouped-query attention).
  This library adds "selected" (positions whose logits are computed).

Execution: the blocks sit in a `BlockStack`, which calls adjacent blocks of one
structure under a single `jax.lax.scan` (local and global Gemma 3 layers included), so
a jitted function traces one block rather than all of them; `with_block_scan(model,
False)` runs them one by one.

Padding convention: batches are LEFT-padded and carry a `token_positions` side input
that is -1 at padding and 0, 1, ... on real tokens. Penzai's attention masks already
hide keys with negative positions, so padded and unpadded prompts give identical
logits, and the last real token of every row sits at column -1.

Parameter labels follow penzai: `transformer/block_{i}/attention/{query,key,value,
output}.weights`, `transformer/block_{i}/mlp/{gating_linear,value_linear,
out_linear}.weights`, norms `.../{name}/scale.weights` (full scale: Gemma's "1 + w" is
folded in when loading), `transformer/embedder.embeddings`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from penzai.models.transformer import model_parts
from penzai.models.transformer.variants import llamalike_common

from mech_unlearn_jax.models.config import RopeConfig, TransformerConfig

# Gemma's reference code masks with this value; any large finite negative works and
# keeps fully-masked padding rows finite.
_MASKED_OUT = -2.3819763e38


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
  """Inverse wavelengths of the split-half RoPE used by Gemma and Llama."""
  inv_freq = 1.0 / (rope.base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  inv_freq = inv_freq / rope.linear_scale
  if rope.llama3_scaling is not None:
    factor, low_ff, high_ff, old_len = rope.llama3_scaling
    wavelen = 2 * np.pi / inv_freq
    low_wavelen, high_wavelen = old_len / low_ff, old_len / high_ff
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    scaled = np.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    inv_freq = scaled
  return inv_freq.astype(np.float32)


def _apply_rope(
    inputs: pz.nx.NamedArray, positions: pz.nx.NamedArray, inverse_frequencies, axis: str
) -> pz.nx.NamedArray:
  """Rotates the halves of `inputs`' `axis` by position * inverse frequency."""

  def rotate(x, position):
    angles = position.astype(jnp.float32) * inverse_frequencies
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    first, second = jnp.split(x.astype(jnp.float32), 2)
    out = jnp.concatenate([first * cos - second * sin, second * cos + first * sin])
    return out.astype(x.dtype)

  return pz.nx.nmap(rotate)(inputs.untag(axis), positions).tag(axis)


@pz.pytree_dataclass
class RotaryEmbedding(pz.nn.Layer):
  """Split-half rotary position embedding with configurable frequencies.

  Unlike `pz.nn.ApplyRoPE` it supports linear position scaling (Gemma 3 >= 4B) and
  Llama 3.1's frequency rescaling, both fixed at build time. `head_dim` (the size of
  `embedding_axis`) is optional; with it `BlockStack` can turn the layer into
  `RotaryWithFrequencies` before it sees an input.
  """

  rope: RopeConfig = dataclasses.field(metadata={"pytree_node": False})
  embedding_axis: str = dataclasses.field(default="projection", metadata={"pytree_node": False})
  positions_input_name: str = dataclasses.field(
      default="token_positions", metadata={"pytree_node": False}
  )
  head_dim: int | None = dataclasses.field(default=None, metadata={"pytree_node": False})

  def __call__(self, inputs: pz.nx.NamedArray, **side_inputs) -> pz.nx.NamedArray:
    head_dim = inputs.named_shape[self.embedding_axis]
    if self.head_dim is not None and head_dim != self.head_dim:
      raise ValueError(
          f"RotaryEmbedding built for {self.embedding_axis}={self.head_dim} got an input with {head_dim}"
      )
    inv_freq = jnp.asarray(rope_inverse_frequencies(self.rope, head_dim))
    return _apply_rope(inputs, side_inputs[self.positions_input_name], inv_freq, self.embedding_axis)

  def with_frequencies_as_data(self) -> "RotaryWithFrequencies":
    """The same rotation with its frequencies as an array (needs `head_dim`)."""
    if self.head_dim is None:
      raise ValueError("RotaryEmbedding.with_frequencies_as_data needs head_dim")
    return RotaryWithFrequencies(
        inverse_frequencies=rope_inverse_frequencies(self.rope, self.head_dim),
        embedding_axis=self.embedding_axis,
        positions_input_name=self.positions_input_name,
    )


@pz.pytree_dataclass
class RotaryWithFrequencies(pz.nn.Layer):
  """`RotaryEmbedding` whose inverse frequencies are data, not static config.

  Local and global Gemma 3 layers differ only in RoPE base (static in
  `RotaryEmbedding`); with the frequencies as data their blocks have one structure,
  so `BlockStack` can scan over them.
  """

  inverse_frequencies: Any
  embedding_axis: str = dataclasses.field(default="projection", metadata={"pytree_node": False})
  positions_input_name: str = dataclasses.field(
      default="token_positions", metadata={"pytree_node": False}
  )

  def __call__(self, inputs: pz.nx.NamedArray, **side_inputs) -> pz.nx.NamedArray:
    return _apply_rope(
        inputs, side_inputs[self.positions_input_name], self.inverse_frequencies, self.embedding_axis
    )


@pz.pytree_dataclass(has_implicitly_inherited_fields=True)  # pytype: disable=wrong-keyword-args
class TokenEmbeddingLookup(pz.nn.EmbeddingLookup):
  """`pz.nn.EmbeddingLookup` computed as a plain row gather (same values).

  Penzai's lookup maps over the table's "embedding" axis, which makes XLA transpose
  and copy the whole [vocabulary, embedding] table (671 MB for Gemma 3 270M) on every
  call. Gathering rows of the positional table, vectorized over the token axes only,
  avoids the copy. A subclass, so selectors for `pz.nn.EmbeddingLookup` still match.
  """

  def __call__(self, token_index: pz.nx.NamedArray, **_unused_side_inputs) -> pz.nx.NamedArray:
    table = self.table.embeddings.value
    vocab = self.table.vocabulary_axis
    others = [name for name in table.named_shape if name != vocab]
    rows = table.untag(vocab, *others)
    return pz.nx.nmap(lambda t, i: t[i])(rows, token_index).tag(*others)


# The window that makes a sliding-window mask a plain causal one (q - k < 2^31 - 1).
_UNBOUNDED_WINDOW = np.iinfo(np.int32).max


@functools.lru_cache(maxsize=None)
def _shared_partial(func, args, keywords) -> functools.partial:
  return functools.partial(func, *args, **dict(keywords))


def _same_partial_for_equal_ones(layer: pz.nn.Elementwise) -> pz.nn.Elementwise:
  # penzai's MLP builder makes a new `functools.partial(gelu, approximate=True)` per
  # block, and partials compare by identity: one shared object per distinct partial
  # lets equal blocks have equal structure.
  fn = layer.fn
  if isinstance(fn, functools.partial):
    fn = _shared_partial(fn.func, fn.args, tuple(sorted(fn.keywords.items())))
  return dataclasses.replace(layer, fn=fn)


class _ScanForm(NamedTuple):
  treedef: Any
  leaves: list[Any]
  key: tuple[Any, ...]  # equal for blocks that can share one scan


def _scan_form(block: Any) -> _ScanForm | None:
  """A block in a form that adjacent equal blocks can share, or None.

  The form computes exactly what `block` computes, but with everything that differs
  between layers as data: parameter labels dropped (frozen values only), RoPE
  frequencies as an array, the global causal mask as a sliding one with an unbounded
  window. Blocks holding mutable state (a `Capture` hook's `StateVariable`) or
  anything else that cannot be stacked have no such form and run unscanned.
  """
  frozen = pz.freeze_params(block)
  _, leftover = pz.unbind_variables(frozen)
  if leftover:
    return None
  if pz.select(frozen).at_instances_of(RotaryEmbedding).where(lambda r: r.head_dim is None).count():
    return None
  form = (
      pz.select(frozen)
      .at_instances_of(pz.ParameterValue)
      .apply(lambda p: pz.ParameterValue(value=p.value, label="stacked"))
  )
  form = pz.select(form).at_instances_of(RotaryEmbedding).apply(lambda r: r.with_frequencies_as_data())
  form = pz.select(form).at_instances_of(pz.nn.Elementwise).apply(_same_partial_for_equal_ones)
  form = (
      pz.select(form)
      .at_instances_of(pz.nn.ApplyCausalAttentionMask)
      .where(lambda m: type(m) is pz.nn.ApplyCausalAttentionMask)
      .apply(
          lambda m: pz.nn.ApplyCausalSlidingWindowAttentionMask(
              masked_out_value=m.masked_out_value,
              sliding_window_size=_UNBOUNDED_WINDOW,
              query_positions_input_name=m.query_positions_input_name,
              kv_positions_input_name=m.kv_positions_input_name,
              seq_axis=m.seq_axis,
              kv_seq_axis=m.kv_seq_axis,
          )
      )
  )
  leaves, treedef = jax.tree.flatten(form)
  try:
    signature = tuple((np.shape(x), jnp.result_type(x)) for x in leaves)
  except TypeError:
    return None
  return _ScanForm(treedef, leaves, (treedef, signature))


@pz.pytree_dataclass
class BlockStack(pz.nn.Layer):
  """The transformer blocks, called in order; identical neighbours share one scan.

  Mathematically a `pz.nn.Sequential` of the blocks. A run of two or more adjacent
  blocks with the same scan form (see `_scan_form`: same structure once parameter
  labels and per-layer RoPE / mask settings are data) runs as one `jax.lax.scan` over
  their stacked weights, so JAX traces one block instead of every block: tracing the
  named-axis model block by block was most of a training stage's first minutes
  (docs/performance.md). Hooks inserted at some layers only, or holding state, split
  the runs there; those blocks run as written. Parameter labels, masks and selectors
  see the blocks exactly as before (`sublayers`).

  By default the scan is unrolled when lowered (as penzai's `LayerStack` does): XLA
  gets the same program as block by block (same FLOPs and buffers for the 270M edit
  step), so only the Python tracing is saved, and a gradient for one layer's weight
  still costs that layer only. `unroll=False` lowers a real loop instead: compile time
  no longer grows with depth, but the loop cannot skip work per layer, so a gradient
  with respect to one layer's weight is computed for that weight in every layer of the
  run (XLA's temporary buffers for the 270M edit step at `costs.EditWorkload()`: 23.3
  GB unrolled, 33.8 GB as a loop).

  Attributes:
    sublayers: the blocks, in order.
    scan: False runs every block unscanned (the reference execution).
    unroll: whether scans are unrolled when lowered (see above).
  """

  sublayers: list[Any]
  scan: bool = dataclasses.field(default=True, metadata={"pytree_node": False})
  unroll: bool = dataclasses.field(default=True, metadata={"pytree_node": False})

  def __call__(self, x: pz.nx.NamedArray, **side_inputs) -> pz.nx.NamedArray:
    if not self.scan:
      for block in self.sublayers:
        x = block(x, **side_inputs)
      return x
    for run in self._runs():
      if len(run) == 1:
        x = run[0][0](x, **side_inputs)
        continue
      treedef = run[0][1].treedef
      stacked = [jnp.stack(column) for column in zip(*(form.leaves for _, form in run))]

      def body(carry, leaves, treedef=treedef):
        out = jax.tree.unflatten(treedef, leaves)(carry, **side_inputs)
        return pz.nx.order_like(out, carry), None

      x, _ = jax.lax.scan(body, x, stacked, unroll=self.unroll)
    return x

  def _runs(self) -> list[list[tuple[Any, _ScanForm | None]]]:
    """Maximal runs of adjacent blocks with one scan form: [(block, form), ...]."""
    runs: list[list[tuple[Any, _ScanForm | None]]] = []
    for block in self.sublayers:
      form = _scan_form(block)
      last = runs[-1][-1][1] if runs else None
      if form is not None and last is not None and form.key == last.key:
        runs[-1].append((block, form))
      else:
        runs.append([(block, form)])
    return runs


@pz.pytree_dataclass
class CausalLM(pz.nn.Layer):
  """Decoder-only language model: embed -> blocks -> final norm -> unembed.

  The stages are separate fields so that logits can be computed at selected
  positions only: for a short prompt the 262k-way unembedding at every position
  costs more than the whole transformer body.

  Attributes:
    embed: tokens -> residual stream (lookup, optional sqrt(d) scaling).
    blocks: the transformer blocks (`model_parts.TransformerBlock` each) in a
      `BlockStack`, which scans over runs of identical blocks.
    final_norm: RMSNorm before the unembedding.
    unembed: residual stream -> vocabulary logits (with optional soft cap).
    config: the architecture (static).
  """

  embed: pz.nn.Layer
  blocks: BlockStack
  final_norm: pz.nn.Layer
  unembed: pz.nn.Layer
  config: TransformerConfig = dataclasses.field(metadata={"pytree_node": False})

  @property
  def metadata(self) -> model_parts.TransformerMetadata:
    common, _, query_only, _ = llamalike_common._head_info(_llamalike_config(self.config))
    return model_parts.TransformerMetadata(
        common_head_axes=common,
        query_only_head_axes=query_only,
        embedding_dim=self.config.embedding_dim,
        projection_dim=self.config.head_dim,
        mlp_hidden_dim=self.config.mlp_hidden_dim,
        vocab_size=self.config.vocab_size,
        activation_dtype=jnp.dtype(self.config.activation_dtype),
    )

  def residual(
      self, tokens: pz.nx.NamedArray, *, token_positions: pz.nx.NamedArray, **side_inputs
  ) -> pz.nx.NamedArray:
    """Final-normed residual stream, axes (..., "seq", "embedding")."""
    side_inputs = dict(side_inputs, token_positions=token_positions)
    x = self.embed(tokens, **side_inputs)
    x = self.blocks(x, **side_inputs)
    return self.final_norm(x, **side_inputs)

  def __call__(
      self,
      tokens: pz.nx.NamedArray,
      *,
      token_positions: pz.nx.NamedArray | None = None,
      selected_positions: pz.nx.NamedArray | None = None,
      **side_inputs,
  ) -> pz.nx.NamedArray:
    """Logits for `tokens` (named axes including "seq").

    Args:
      tokens: integer token ids with a "seq" axis and any batch axes.
      token_positions: positions (-1 at padding); default 0..L-1.
      selected_positions: optional integer array of column indices along "seq"
        (e.g. axes {"batch", "selected"} or just {"batch"}); logits are computed only
        there, and the result has the axes of `selected_positions` plus "vocabulary".
      **side_inputs: forwarded to every layer (interventions read them).
    """
    if token_positions is None:
      token_positions = pz.nx.arange("seq", tokens.named_shape["seq"])
    hidden = self.residual(tokens, token_positions=token_positions, **side_inputs)
    if selected_positions is not None:
      hidden = pz.nx.nmap(lambda h, i: h[i])(hidden.untag("seq"), selected_positions)
    return self.unembed(hidden, token_positions=token_positions, **side_inputs)


def with_block_scan(model: CausalLM, scan: bool) -> CausalLM:
  """A copy of `model` whose blocks scan runs of identical blocks (True, the default
  of built models) or run one by one (False: the reference execution; results agree
  to float rounding, ~1e-6 of the logits)."""
  return dataclasses.replace(model, blocks=dataclasses.replace(model.blocks, scan=scan))


def _llamalike_config(config: TransformerConfig) -> llamalike_common.LlamalikeTransformerConfig:
  """The penzai config whose helpers (MLP builder, head axes) we reuse."""
  return llamalike_common.LlamalikeTransformerConfig(
      num_kv_heads=config.num_kv_heads,
      query_head_multiplier=config.query_heads_per_kv,
      embedding_dim=config.embedding_dim,
      projection_dim=config.head_dim,
      mlp_hidden_dim=config.mlp_hidden_dim,
      num_decoder_blocks=config.num_layers,
      vocab_size=config.vocab_size,
      mlp_variant="geglu_approx" if config.mlp_activation == "gelu_tanh" else "swiglu",
      tie_embedder_and_logits=config.tie_embeddings,
      rms_norm_eps=config.norm_eps,
      parameter_dtype=jnp.dtype(config.parameter_dtype),
      activation_dtype=jnp.dtype(config.activation_dtype),
  )


def _rms_norm(name, rng, axes, config: TransformerConfig) -> pz.nn.RMSLayerNorm:
  norm = pz.nn.RMSLayerNorm.from_config(
      name=name,
      init_base_rng=rng,
      across_axes=axes,
      dtype=jnp.dtype(config.parameter_dtype),
      epsilon=config.norm_eps,
  )
  return norm


def _build_attention(name: str, rng, config: TransformerConfig, layer: int) -> pz.nn.Attention:
  """Attention with optional QK-norm, per-layer RoPE and local/global masking."""
  common, qkv_einsum, query_only, q_einsum = llamalike_common._head_info(
      _llamalike_config(config)
  )
  dtype = jnp.dtype(config.parameter_dtype)
  act_dtype = jnp.dtype(config.activation_dtype)
  rope = config.rope_for_layer(layer)
  d, p = config.embedding_dim, config.head_dim

  def projection(which, out_axes):
    layers = [
        pz.nn.Linear.from_config(
            name=f"{name}/{which}", init_base_rng=rng,
            input_axes={"embedding": d}, output_axes={**out_axes, "projection": p},
            dtype=dtype,
        )
    ]
    if config.qk_norm and which in ("query", "key"):
      layers.append(_rms_norm(f"{name}/{which}_norm", rng, {"projection": p}, config))
    if which in ("query", "key"):
      layers.append(RotaryEmbedding(rope=rope, head_dim=p))
    if which == "query":
      layers.append(pz.nn.ConstantRescale(by=jnp.array(config.query_scale, dtype=act_dtype)))
    return pz.nn.Sequential(layers)

  if config.layer_types[layer] == "local":
    masker = pz.nn.ApplyCausalSlidingWindowAttentionMask(
        sliding_window_size=config.sliding_window,
        masked_out_value=jnp.array(_MASKED_OUT, dtype=act_dtype),
    )
  else:
    masker = pz.nn.ApplyCausalAttentionMask(
        masked_out_value=jnp.array(_MASKED_OUT, dtype=act_dtype)
    )
  scores = [
      pz.nn.NamedEinsum(
          (
              {"seq": "tq", **qkv_einsum, **q_einsum, "projection": "p"},
              {"seq": "tkv", **qkv_einsum, "projection": "p"},
          ),
          {"seq": "tq", **qkv_einsum, **q_einsum, "kv_seq": "tkv"},
      )
  ]
  if config.attn_logit_softcap:
    scores.append(
        pz.nn.TanhSoftCap(soft_cap=jnp.array(config.attn_logit_softcap, dtype=act_dtype))
    )
  scores += [masker, pz.nn.Softmax("kv_seq")]
  return pz.nn.Attention(
      input_to_query=projection("query", {**common, **query_only}),
      input_to_key=projection("key", common),
      input_to_value=projection("value", common),
      query_key_to_attn=pz.nn.Sequential(scores),
      attn_value_to_output=pz.nn.Sequential([
          pz.nn.NamedEinsum(
              (
                  {"seq": "tq", **qkv_einsum, **q_einsum, "kv_seq": "tkv"},
                  {"seq": "tkv", **qkv_einsum, "projection": "p"},
              ),
              {"seq": "tq", **qkv_einsum, **q_einsum, "projection": "p"},
          ),
          pz.nn.Linear.from_config(
              name=f"{name}/output", init_base_rng=rng,
              input_axes={**common, **query_only, "projection": p},
              output_axes={"embedding": d}, dtype=dtype,
          ),
      ]),
  )


def _build_block(name: str, rng, config: TransformerConfig, layer: int) -> model_parts.TransformerBlock:
  d = {"embedding": config.embedding_dim}
  attn = [
      _rms_norm(f"{name}/pre_attention_norm", rng, d, config),
      _build_attention(f"{name}/attention", rng, config, layer),
  ]
  if config.post_attn_norm:
    attn.append(_rms_norm(f"{name}/post_attention_norm", rng, d, config))
  ffw = [
      _rms_norm(f"{name}/pre_ffw_norm", rng, d, config),
      llamalike_common.build_llamalike_feedforward(f"{name}/mlp", rng, _llamalike_config(config)),
  ]
  if config.post_ffw_norm:
    ffw.append(_rms_norm(f"{name}/post_ffw_norm", rng, d, config))
  return model_parts.TransformerBlock(
      sublayers=[pz.nn.Residual(pz.nn.Sequential(attn)), pz.nn.Residual(pz.nn.Sequential(ffw))]
  )


def build_transformer(
    config: TransformerConfig, init_rng: jax.Array | None = None, name: str = "transformer"
) -> CausalLM:
  """Builds the model; random weights from `init_rng`, or parameter slots if None.

  With `init_rng=None` the parameters are `pz.ParameterSlot`s to be filled by a
  loader (`pz.bind_variables`), so no memory is allocated.
  """
  dtype = jnp.dtype(config.parameter_dtype)
  act_dtype = jnp.dtype(config.activation_dtype)
  table = pz.nn.EmbeddingTable.from_config(
      name=f"{name}/embedder", init_base_rng=init_rng, vocab_size=config.vocab_size,
      embedding_axes={"embedding": config.embedding_dim}, dtype=dtype,
  )
  embed = [TokenEmbeddingLookup(table)]
  if act_dtype != dtype:
    embed.append(pz.nn.CastToDType(act_dtype))
  if config.scale_embeddings:
    # Gemma multiplies by sqrt(d) rounded to the activation dtype.
    embed.append(pz.nn.ConstantRescale(by=jnp.sqrt(config.embedding_dim).astype(act_dtype)))
  if config.tie_embeddings:
    unembed = [pz.nn.EmbeddingDecode(table)]
  else:
    unembed = [
        pz.nn.Linear.from_config(
            name=f"{name}/lm_head", init_base_rng=init_rng,
            input_axes={"embedding": config.embedding_dim},
            output_axes={"vocabulary": config.vocab_size}, dtype=dtype,
        )
    ]
  if config.final_logit_softcap:
    unembed.append(
        pz.nn.TanhSoftCap(soft_cap=jnp.array(config.final_logit_softcap, dtype=act_dtype))
    )
  blocks = [
      _build_block(f"{name}/block_{i}", init_rng, config, i) for i in range(config.num_layers)
  ]
  return CausalLM(
      embed=pz.nn.Sequential(embed),
      blocks=BlockStack(blocks),
      final_norm=_rms_norm(f"{name}/final_norm", init_rng, {"embedding": config.embedding_dim}, config),
      unembed=pz.nn.Sequential(unembed),
      config=config,
  )


def parameter_shapes(config: TransformerConfig) -> dict[str, dict[str, int]]:
  """Label -> named shape of every parameter, computed without allocating weights."""
  _, params = jax.eval_shape(
      lambda: pz.unbind_params(build_transformer(config, jax.random.key(0)), freeze=True)
  )
  return {p.label: dict(p.value.named_shape) for p in params}


def parameters_by_label(model: Any) -> dict[str, pz.Parameter]:
  """All `pz.Parameter`s of a (bound) model, keyed by label."""
  return {p.label: p for p in pz.select(model).at_instances_of(pz.Parameter).get_sequence()}
