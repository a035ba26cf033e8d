"""Interventions as data: small penzai layers inserted at named sites of a model copy.

A *site* names one activation of a `CausalLM` (`Site(layer, kind)`); the kinds are
documented once, in `SITE_KINDS`. `insert_at_sites` returns a COPY of the model with
hook layers inserted there (the original is never changed; hooks at one site run in
insertion order, inside a `SiteHooks` container), e.g.

    hooked = insert_at_sites(model, [Site(3, "mlp_out")], lambda s: AddDelta(s, delta))

Hooks provided here:
  * `Capture`: records the activation (a `pz.StateVariable`; see `capture`).
  * `AddDelta`: adds a fixed delta (zero delta + `jax.grad` = attribution patching).
  * `Patch`: replaces the activation with a cached value where a mask is true.
  * `PatchFromBatch`: replaces it with the activation of another batch element.
  * `AddMaskedNoise`: adds `noise * mask` (causal tracing's subject-embedding noise).
And `with_prefix` (`PrefixedAttention`): run only the suffix columns of a batch
against cached keys/values of its prefix columns (for runs that share a prefix);
`with_kv_cache`: a decoding copy whose attention caches keys and values.

Named axes of activations (penzai's vocabulary, see `models/transformer.py`):
"batch", "seq", "embedding", "projection", "neurons" and the head axes "heads",
"head_groups", "query_heads" (`HEAD_AXES`). Masks, deltas and cached values broadcast
by axis name, so a hook may carry extra axes (e.g. a "restoration" axis) that then
flow through the rest of the model as batch axes. (Introduce such an axis no later
than the attention inputs: penzai's attention einsums reject a batch axis that only
the keys or values carry, so e.g. add it at "resid_pre" rather than at "k".)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from penzai import pz
from penzai.models.transformer import model_parts

from mech_unlearn_jax import sharding
from mech_unlearn_jax.models import forward as forward_lib
from mech_unlearn_jax.models.forward import named_inputs
from mech_unlearn_jax.models.transformer import CausalLM

# Every site kind, with where exactly it sits. Activation axes are listed without
# "batch" and "seq", which every site has.
SITE_KINDS: dict[str, str] = {
    "embed": (
        "token embeddings straight out of the embedding table, before any scaling"
        " (Gemma's sqrt(d)); axes embedding. Only layer 0."
    ),
    "resid_pre": "residual stream entering block `layer`; axes embedding.",
    "resid_post": "residual stream leaving block `layer`; axes embedding.",
    "q": (
        "query projection output (before QK-norm, RoPE and query scaling); axes"
        " head axes, projection."
    ),
    "k": "key projection output (before QK-norm and RoPE); axes KV head axes, projection.",
    "v": "value projection output; axes KV head axes, projection.",
    "head_out": (
        "per-head attention output (attention-weighted values) before the output"
        " projection; axes query head axes, projection."
    ),
    "attn_out": (
        "attention sublayer output (after the post-attention norm) before the"
        " residual add; axes embedding."
    ),
    "mlp_in": "MLP input (after pre_ffw_norm); axes embedding.",
    "gate": "gating_linear output, before the activation function; axes neurons.",
    "up": "value_linear ('up') output; axes neurons.",
    "mlp_hidden": (
        "MLP hidden activations act(gate) * up, the input of out_linear ('down');"
        " axes neurons."
    ),
    "mlp_out": "MLP output (after post_ffw_norm) before the residual add; axes embedding.",
}

HEAD_AXES = ("heads", "head_groups", "query_heads")
ATTENTION_KINDS = ("q", "k", "v", "head_out")


@dataclasses.dataclass(frozen=True, order=True)
class Site:
  """One named activation of the model: `kind` (see `SITE_KINDS`) of block `layer`."""

  layer: int
  kind: str

  def __post_init__(self):
    if self.kind not in SITE_KINDS:
      raise ValueError(f"unknown site kind {self.kind!r}; expected one of {sorted(SITE_KINDS)}")
    if self.layer < 0:
      raise ValueError(f"site layer must be >= 0, got {self.layer}")
    if self.kind == "embed" and self.layer != 0:
      raise ValueError(f"'embed' sites exist only at layer 0, got layer {self.layer}")

  def __str__(self) -> str:
    return f"{self.kind}{self.layer}"


def all_sites(num_layers: int, kinds: Iterable[str]) -> list[Site]:
  """Sites of the given kinds in every layer, layer-major ('embed' only once)."""
  kinds = tuple(kinds)
  sites = [Site(0, "embed")] if "embed" in kinds else []
  return sites + [Site(l, k) for l in range(num_layers) for k in kinds if k != "embed"]


# ----------------------------------------------------------------------------------
# Hook layers.


@pz.pytree_dataclass
class Capture(pz.nn.Layer):
  """Records the activation passing through into `saved` and returns it unchanged."""

  site: Site = dataclasses.field(metadata={"pytree_node": False})
  saved: pz.StateVariable = dataclasses.field(
      default_factory=lambda: pz.StateVariable(None)
  )

  def __call__(self, value: pz.nx.NamedArray, **_unused_side_inputs) -> pz.nx.NamedArray:
    self.saved.value = value
    return value


@pz.pytree_dataclass
class AddDelta(pz.nn.Layer):
  """Adds `delta` (broadcast by axis name) to the activation."""

  site: Site = dataclasses.field(metadata={"pytree_node": False})
  delta: pz.nx.NamedArray

  def __call__(self, value: pz.nx.NamedArray, **_unused_side_inputs) -> pz.nx.NamedArray:
    return value + self.delta.astype(value.dtype)


def _where(mask, new, old):
  return pz.nx.nmap(jnp.where)(mask, new.astype(old.dtype), old)


@pz.pytree_dataclass
class Patch(pz.nn.Layer):
  """Replaces the activation by `value` where `mask` is true (everywhere if None).

  `value` and `mask` broadcast by axis name: e.g. a mask with axes {"query_heads"}
  patches one head at every position, one with {"seq"} patches some positions.
  """

  site: Site = dataclasses.field(metadata={"pytree_node": False})
  value: pz.nx.NamedArray
  mask: pz.nx.NamedArray | None = None

  def __call__(self, value: pz.nx.NamedArray, **_unused_side_inputs) -> pz.nx.NamedArray:
    mask = pz.nx.wrap(jnp.bool_(True)) if self.mask is None else self.mask
    return _where(mask, self.value, value)


@pz.pytree_dataclass
class PatchFromBatch(pz.nn.Layer):
  """Replaces batch element b's activation by that of element `source_index[b]`.

  `source_index` is an int named array with axis "batch" (e.g. clean and corrupted
  prompts in one batch, each corrupted row reading its clean twin); `mask` (optional,
  broadcast by name) restricts where the copy happens.
  """

  site: Site = dataclasses.field(metadata={"pytree_node": False})
  source_index: pz.nx.NamedArray
  mask: pz.nx.NamedArray | None = None

  def __call__(self, value: pz.nx.NamedArray, **_unused_side_inputs) -> pz.nx.NamedArray:
    source = pz.nx.nmap(lambda a, i: a[i])(value.untag("batch"), self.source_index)
    mask = pz.nx.wrap(jnp.bool_(True)) if self.mask is None else self.mask
    return _where(mask, source, value)


@pz.pytree_dataclass
class AddMaskedNoise(pz.nn.Layer):
  """Adds `noise * mask`: e.g. Gaussian noise on the subject tokens' embeddings."""

  site: Site = dataclasses.field(metadata={"pytree_node": False})
  noise: pz.nx.NamedArray
  mask: pz.nx.NamedArray

  def __call__(self, value: pz.nx.NamedArray, **_unused_side_inputs) -> pz.nx.NamedArray:
    return value + (self.noise * self.mask.astype(self.noise.dtype)).astype(value.dtype)


HOOK_TYPES = (Capture, AddDelta, Patch, PatchFromBatch, AddMaskedNoise)


# ----------------------------------------------------------------------------------
# Running only the suffix columns of a batch.
#
# When two runs (clean / corrupted) share their first `start` columns, every
# activation there is identical (causal attention), so a method comparing them only
# needs the columns from `start` on; attention then reads the shared prefix's keys
# and values. Padding columns (position -1) are never attended to, so they may sit in
# either part.

KV_POSITIONS = "kv_token_positions"
_CAUSAL_MASKS = (pz.nn.ApplyCausalAttentionMask, pz.nn.ApplyCausalSlidingWindowAttentionMask)


def broadcast_like(x: pz.nx.NamedArray, ref: pz.nx.NamedArray, skip: str) -> pz.nx.NamedArray:
  """Adds the axes `ref` has and `x` lacks (except `skip`) by broadcasting."""
  extra = {a: n for a, n in ref.named_shape.items() if a not in x.named_shape and a != skip}
  return x + pz.nx.zeros(extra, dtype=x.dtype) if extra else x


@pz.pytree_dataclass
class PrefixedAttention(pz.nn.Layer):
  """Attention for suffix columns, given the keys and values of the prefix columns.

  The queries, keys and values of the input (suffix) columns come from `attention`'s
  own sublayers; keys and values are then prepended with `prefix_keys` /
  `prefix_values` along "seq". Side inputs: "token_positions" = positions of the
  input columns, `KV_POSITIONS` = positions of prefix + input columns (the causal
  mask of `attention` reads them; see `with_prefix`).
  """

  attention: pz.nn.Attention
  prefix_keys: pz.nx.NamedArray
  prefix_values: pz.nx.NamedArray

  def __call__(self, x: pz.nx.NamedArray, **side_inputs) -> pz.nx.NamedArray:
    attn = self.attention
    query = attn.input_to_query(x, **side_inputs)
    key = attn.input_to_key(x, **side_inputs)
    value = attn.input_to_value(x, **side_inputs)
    key = pz.nx.concatenate([broadcast_like(self.prefix_keys, key, "seq"), key], "seq")
    value = pz.nx.concatenate([broadcast_like(self.prefix_values, value, "seq"), value], "seq")
    weights = attn.query_key_to_attn((query, key), **side_inputs)
    return attn.attn_value_to_output((weights, value), **side_inputs)


def reading_kv_positions(attention: pz.nn.Attention, layer: int) -> pz.nn.Attention:
  """A copy of `attention` whose causal mask reads key positions from `KV_POSITIONS`."""
  masks = pz.select(attention.query_key_to_attn).at_instances_of(_CAUSAL_MASKS)
  if masks.count() != 1:
    raise ValueError(f"layer {layer}: expected one causal (sliding-window) attention mask")
  return dataclasses.replace(
      attention,
      query_key_to_attn=masks.apply(
          lambda m: dataclasses.replace(m, kv_positions_input_name=KV_POSITIONS)
      ),
  )


def _map_attention(model: CausalLM, fn: Callable[[pz.nn.Attention, int], pz.nn.Layer]) -> CausalLM:
  """Replaces block i's (single) Attention by fn(attention, i)."""
  blocks = []
  for i, block in enumerate(model.blocks.sublayers):
    found = pz.select(block).at_instances_of(pz.nn.Attention)
    if found.count() != 1:
      raise ValueError(f"layer {i}: expected one Attention, found {found.count()}")
    blocks.append(found.apply(lambda attn: fn(attn, i)))
  return dataclasses.replace(model, blocks=dataclasses.replace(model.blocks, sublayers=blocks))


def prefix_key_values(
    model: CausalLM, tokens_BxP, positions_BxP
) -> list[tuple[pz.nx.NamedArray, pz.nx.NamedArray]]:
  """Per layer, the attention keys and values (after norm and RoPE) of a prefix run."""
  num_layers = model.config.num_layers
  keys = [pz.StateVariable(None) for _ in range(num_layers)]
  values = [pz.StateVariable(None) for _ in range(num_layers)]

  def saving(attn, i):
    return dataclasses.replace(
        attn,
        input_to_key=pz.nn.Sequential([attn.input_to_key, Capture(Site(i, "k"), keys[i])]),
        input_to_value=pz.nn.Sequential([attn.input_to_value, Capture(Site(i, "v"), values[i])]),
    )

  saver = _map_attention(model, saving)
  tokens, positions = named_inputs(tokens_BxP, positions_BxP)
  saver.residual(tokens, token_positions=positions)
  return [(k.value, v.value) for k, v in zip(keys, values)]


def with_prefix(
    model: CausalLM, prefix_kv: Sequence[tuple[pz.nx.NamedArray, pz.nx.NamedArray]]
) -> CausalLM:
  """A copy of `model` that runs suffix columns against a fixed prefix (see above).

  Call it with the suffix tokens, `token_positions` = their positions and
  `kv_token_positions` = the positions of all columns. Hooks may be inserted before
  or after.
  """
  if len(prefix_kv) != model.config.num_layers:
    raise ValueError(f"prefix_kv has {len(prefix_kv)} layers, the model {model.config.num_layers}")
  return _map_attention(
      model, lambda attn, i: PrefixedAttention(reading_kv_positions(attn, i), *prefix_kv[i])
  )


def shares_prefixes(model: Any) -> bool:
  """Whether `last_logits_with_prefix` can run `model`: a plain `CausalLM`, or a
  subclass that names the model running the columns after the prefix
  (`suffix_model()`, e.g. a soft-prompted model whose prompt sits inside the prefix)."""
  return type(model) is CausalLM or callable(getattr(type(model), "suffix_model", None))


def last_logits_with_prefix(model: CausalLM, prefix_P, tokens_BxS, positions_BxS) -> jax.Array:
  """Last-column logits [B, V] of rows that all start with the tokens `prefix_P`.

  `tokens_BxS` / `positions_BxS` hold the rest of each row (left-padded, positions
  continuing from P). The prefix runs once, on one row; its keys and values (which
  depend on the model's weights, so gradients flow through them) serve every row.
  Equal to the logits of the whole rows up to float rounding.

  A model that inserts columns into the prefix run (a soft prompt after BOS) gives
  more keys than prefix tokens; the rows' positions then shift by that many, and
  its `suffix_model()` runs them (see `shares_prefixes`).
  """
  if not shares_prefixes(model):
    raise ValueError(
        f"a {type(model).__name__} cannot run rows against a shared prefix: it is not a plain"
        " CausalLM and has no suffix_model()"
    )
  prefix_P = jnp.asarray(prefix_P, jnp.int32)
  prefix_len = prefix_P.shape[0]
  kv = prefix_key_values(model, prefix_P[None], jnp.arange(prefix_len, dtype=jnp.int32)[None])
  run_len = kv[0][0].named_shape["seq"]
  # Columns the model itself inserted into the prefix run (0 for a plain model).
  inserted = run_len - prefix_len
  suffix_model = model if type(model) is CausalLM else model.suffix_model()
  # One row of keys/values without a batch axis: PrefixedAttention broadcasts it.
  body = with_prefix(suffix_model, [(k[{"batch": 0}], v[{"batch": 0}]) for k, v in kv])
  positions_BxS = jnp.asarray(positions_BxS)
  if inserted:
    positions_BxS = jnp.where(positions_BxS >= 0, positions_BxS + inserted, -1).astype(positions_BxS.dtype)
  kv_positions = jnp.concatenate(
      [jnp.broadcast_to(jnp.arange(run_len, dtype=jnp.int32), (positions_BxS.shape[0], run_len)), positions_BxS],
      1,
  )
  return forward_lib.last_logits(
      body, tokens_BxS, positions_BxS, **{KV_POSITIONS: pz.nx.wrap(kv_positions).tag("batch", "seq")}
  )


CACHE_END_INDEX = "cache_end_index"


def with_kv_cache(model: CausalLM, batch_size: int, cache_len: int) -> CausalLM:
  """A copy of `model` for one-token-at-a-time decoding with a key/value cache.

  Every block's attention becomes penzai's `pz.nn.KVCachingAttention` (its cache a
  `pz.StateVariable` of `cache_len` columns). Call the copy with the new column(s)
  only: "batch"/"seq" tokens, `token_positions` = their positions,
  `kv_token_positions` = positions of all `cache_len` cache columns (-1 where not
  yet written) and `cache_end_index` = the column the new tokens are written to.
  """
  metadata = model.metadata
  cached_axes = {"batch": batch_size, **metadata.common_head_axes, "projection": metadata.projection_dim}
  return _map_attention(
      model,
      lambda attn, i: pz.nn.KVCachingAttention.from_uncached(
          reading_kv_positions(attn, i), sequence_axis="seq", cache_len=cache_len,
          cached_axes=cached_axes, cache_end_index_key=CACHE_END_INDEX,
          cache_dtype=metadata.activation_dtype, cache_label=f"kv_cache/{i}",
      ),
  )


# ----------------------------------------------------------------------------------
# Insertion.
#
# The first time a layer (or the embedding) is hooked, an empty `SiteHooks` container
# is inserted at every site of it; hooks are then appended to the containers. So the
# model's structure changes once, later insertions never have to re-find sites in a
# modified tree, and hooks at one site run in insertion order (a hook inserted later
# sees what earlier hooks at the same site produced).

HookLike = pz.nn.Layer | Sequence[pz.nn.Layer]


@pz.pytree_dataclass(has_implicitly_inherited_fields=True)  # pytype: disable=wrong-keyword-args
class SiteHooks(pz.nn.Sequential):
  """The hooks at one site, run in order (empty: the identity)."""

  site: Site = dataclasses.field(metadata={"pytree_node": False})

  def treescope_color(self) -> str:
    return "oklch(0.8 0.12 300)"


def _as_list(hooks: HookLike) -> list[pz.nn.Layer]:
  return [hooks] if isinstance(hooks, pz.nn.Layer) else list(hooks)


def _only(tree: Any, cls: type, what: str) -> Any:
  found = pz.select(tree).at_instances_of(cls).get_sequence()
  if len(found) != 1:
    raise ValueError(f"expected exactly one {cls.__name__} in {what}, found {len(found)}")
  return found[0]


def _after_first(seq: pz.nn.Layer, hook: SiteHooks, what: str) -> pz.nn.Layer:
  """Puts `hook` right after the first (Linear) sublayer of a projection."""
  if isinstance(seq, pz.nn.Linear):
    return pz.nn.Sequential([seq, hook])
  sublayers = getattr(seq, "sublayers", None)
  if not sublayers or not isinstance(sublayers[0], pz.nn.Linear):
    raise ValueError(f"{what}: expected a Linear or a Sequential starting with a Linear")
  return dataclasses.replace(seq, sublayers=[sublayers[0], hook, *sublayers[1:]])


def _prepare_attention(attn: pz.nn.Attention, layer: int) -> pz.nn.Attention:
  out = attn.attn_value_to_output
  if not isinstance(out, pz.nn.Sequential) or not isinstance(out.sublayers[-1], pz.nn.Linear):
    raise ValueError(
        f"layer {layer}: attn_value_to_output must be a Sequential ending with the"
        " output projection (Linear)"
    )
  hook = lambda kind: SiteHooks([], site=Site(layer, kind))
  return dataclasses.replace(
      attn,
      input_to_query=_after_first(attn.input_to_query, hook("q"), f"layer {layer} query"),
      input_to_key=_after_first(attn.input_to_key, hook("k"), f"layer {layer} key"),
      input_to_value=_after_first(attn.input_to_value, hook("v"), f"layer {layer} value"),
      attn_value_to_output=dataclasses.replace(
          out, sublayers=[*out.sublayers[:-1], hook("head_out"), out.sublayers[-1]]
      ),
  )


def _prepare_feedforward(ffw: pz.nn.Sequential, layer: int) -> pz.nn.Layer:
  glu = ffw.sublayers[0]
  if not isinstance(glu, pz.nn.BranchAndMultiplyTogether) or len(glu.branches) != 2:
    raise ValueError(f"layer {layer}: the MLP must start with BranchAndMultiplyTogether(gate, up)")
  gate, up = glu.branches
  if not isinstance(gate, pz.nn.NamedGroup | pz.nn.Sequential):
    raise ValueError(f"layer {layer}: the gate branch must be [Linear, activation]")
  hook = lambda kind: SiteHooks([], site=Site(layer, kind))
  gate = _after_first(gate, hook("gate"), f"layer {layer} gate")
  up = pz.nn.Sequential([up, hook("up")])
  glu = pz.nn.Sequential([dataclasses.replace(glu, branches=[gate, up]), hook("mlp_hidden")])
  ffw = dataclasses.replace(ffw, sublayers=[glu, *ffw.sublayers[1:]])
  return pz.nn.Sequential([hook("mlp_in"), ffw])


def _prepare_block(block: Any, layer: int) -> model_parts.TransformerBlock:
  """A copy of one transformer block with an empty `SiteHooks` at each of its sites."""
  if not isinstance(block, model_parts.TransformerBlock) or len(block.sublayers) != 2:
    raise ValueError(
        f"layer {layer}: expected a TransformerBlock of [attention residual, MLP"
        f" residual], got {type(block).__name__}"
    )
  attn_res, mlp_res = block.sublayers
  if not (isinstance(attn_res, pz.nn.Residual) and isinstance(mlp_res, pz.nn.Residual)):
    raise ValueError(f"layer {layer}: both sublayers of a block must be Residual")
  _only(attn_res, pz.nn.Attention, f"layer {layer}'s attention residual")
  _only(mlp_res, model_parts.TransformerFeedForward, f"layer {layer}'s MLP residual")
  attn_delta = (
      pz.select(attn_res.delta)
      .at_instances_of(pz.nn.Attention)
      .apply(lambda a: _prepare_attention(a, layer))
  )
  mlp_delta = (
      pz.select(mlp_res.delta)
      .at_instances_of(model_parts.TransformerFeedForward)
      .apply(lambda f: _prepare_feedforward(f, layer))
  )
  hook = lambda kind: SiteHooks([], site=Site(layer, kind))
  return dataclasses.replace(
      block,
      sublayers=[
          hook("resid_pre"),
          pz.nn.Residual(pz.nn.Sequential([attn_delta, hook("attn_out")])),
          pz.nn.Residual(pz.nn.Sequential([mlp_delta, hook("mlp_out")])),
          hook("resid_post"),
      ],
  )


def _has_site_hooks(tree: Any) -> bool:
  return bool(pz.select(tree).at_instances_of(SiteHooks).get_sequence())


def insert_hooks(model: CausalLM, hooks: Mapping[Site, HookLike]) -> CausalLM:
  """A copy of `model` with the given hook layer(s) appended at each site.

  Several hooks at one site run in order, after any hooks already there. Raises
  ValueError for a site outside the model or a model whose structure differs from
  `build_transformer`'s.
  """
  num_layers = model.config.num_layers
  by_site: dict[Site, list[pz.nn.Layer]] = {}
  for site, layers in hooks.items():
    if not isinstance(site, Site):
      raise TypeError(f"hook keys must be Site, got {site!r}")
    if site.layer >= num_layers:
      raise ValueError(f"site {site} is outside the model's {num_layers} layers")
    by_site.setdefault(site, []).extend(_as_list(layers))

  blocks = list(model.blocks.sublayers)
  for layer in sorted({s.layer for s in by_site if s.kind != "embed"}):
    if not _has_site_hooks(blocks[layer]):
      blocks[layer] = _prepare_block(blocks[layer], layer)
  embed = model.embed
  if Site(0, "embed") in by_site and not _has_site_hooks(embed):
    embed = (
        pz.select(embed)
        .at_instances_of(pz.nn.EmbeddingLookup)
        .apply(lambda lookup: pz.nn.Sequential([lookup, SiteHooks([], site=Site(0, "embed"))]))
    )
  prepared = dataclasses.replace(
      model, embed=embed, blocks=dataclasses.replace(model.blocks, sublayers=blocks)
  )
  return (
      pz.select(prepared)
      .at_instances_of(SiteHooks)
      .apply(lambda h: dataclasses.replace(h, sublayers=[*h.sublayers, *by_site.get(h.site, [])]))
  )


def insert_at_sites(
    model: CausalLM, sites: Iterable[Site], layer_factory: Callable[[Site], HookLike]
) -> CausalLM:
  """A copy of `model` with `layer_factory(site)` (a layer or a list) at each site."""
  unique = list(dict.fromkeys(sites))
  return insert_hooks(model, {site: layer_factory(site) for site in unique})


def remove_hooks(model: Any) -> Any:
  """Empties every `SiteHooks` container (the model computes what it did unhooked)."""
  return pz.select(model).at_instances_of(SiteHooks).apply(
      lambda h: dataclasses.replace(h, sublayers=[])
  )


# ----------------------------------------------------------------------------------
# Capturing activations.


def captured_values(hooked: Any) -> dict[Site, pz.nx.NamedArray]:
  """Activations recorded by the `Capture` layers of a model that has just run."""
  out = {}
  for layer in pz.select(hooked).at_instances_of(Capture).get_sequence():
    if layer.saved.value is None:
      raise ValueError(f"the Capture layer at {layer.site} did not run")
    out[layer.site] = layer.saved.value
  return out


def with_captures(model: CausalLM, sites: Iterable[Site]) -> CausalLM:
  """A copy of `model` with a fresh `Capture` layer at every site."""
  return insert_at_sites(model, sites, lambda s: Capture(s, pz.StateVariable(None)))


def capture_traced(
    model: CausalLM, sites: Sequence[Site], tokens_BxL, positions_BxL, **side_inputs
) -> dict[Site, pz.nx.NamedArray]:
  """Runs the model body (no unembedding) and returns the activations at `sites`.

  Traceable (no jit of its own): use inside other jitted/differentiated functions.
  """
  hooked = with_captures(model, sites)
  tokens, positions = named_inputs(tokens_BxL, positions_BxL)
  hooked.residual(tokens, token_positions=positions, **side_inputs)
  return captured_values(hooked)


def _frozen_capture(unbound, params, tokens_BxL, positions_BxL, sites):
  return capture_traced(pz.bind_variables(unbound, params), sites, tokens_BxL, positions_BxL)


_jitted_capture = jax.jit(_frozen_capture, static_argnames="sites")


def capture(
    model: CausalLM, sites: Iterable[Site], tokens_BxL, positions_BxL
) -> dict[Site, pz.nx.NamedArray]:
  """Activations at `sites` for a left-padded batch, through one cached jit.

  Returns named arrays with axes "batch", "seq" and the site's own axes (see
  `SITE_KINDS`).
  """
  unbound, params = sharding.unbind_for_jit(model)
  return _jitted_capture(unbound, params, tokens_BxL, positions_BxL, tuple(dict.fromkeys(sites)))
