"""Interventions: site insertion, capture shapes, no-op hooks, patching semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import treescope
from penzai import pz

from mech_unlearn_jax import interventions as iv
from mech_unlearn_jax.models import transformer
from mech_unlearn_jax.models.config import get_preset
from mech_unlearn_jax.models.forward import last_logits, left_pad

CONFIG = get_preset("tiny-gemma3")


@pytest.fixture(scope="module")
def model():
  from mech_unlearn_jax.models.transformer import build_transformer

  return build_transformer(CONFIG, jax.random.key(0))


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  return left_pad([rng.integers(3, CONFIG.vocab_size, n).tolist() for n in (5, 9, 7)])


def unwrap(x, axes=("batch", "seq", "embedding")):
  return np.asarray(x.untag(*axes).unwrap())


def expected_axes(kind: str) -> dict[str, int]:
  heads = {"head_groups": CONFIG.num_kv_heads, "query_heads": CONFIG.query_heads_per_kv}
  p, d, f = CONFIG.head_dim, CONFIG.embedding_dim, CONFIG.mlp_hidden_dim
  return {
      "embed": {"embedding": d}, "resid_pre": {"embedding": d}, "resid_post": {"embedding": d},
      "q": {**heads, "projection": p},
      "k": {"head_groups": CONFIG.num_kv_heads, "projection": p},
      "v": {"head_groups": CONFIG.num_kv_heads, "projection": p},
      "head_out": {**heads, "projection": p},
      "attn_out": {"embedding": d}, "mlp_in": {"embedding": d}, "mlp_out": {"embedding": d},
      "gate": {"neurons": f}, "up": {"neurons": f}, "mlp_hidden": {"neurons": f},
  }[kind]


def test_capture_returns_every_site_with_its_axes(model, inputs):
  tokens, positions = inputs
  sites = iv.all_sites(CONFIG.num_layers, iv.SITE_KINDS)
  acts = iv.capture(model, sites, tokens, positions)
  assert set(acts) == set(sites)
  assert len(sites) == 1 + CONFIG.num_layers * (len(iv.SITE_KINDS) - 1)
  for site, act in acts.items():
    assert dict(act.named_shape) == {"batch": 3, "seq": tokens.shape[1], **expected_axes(site.kind)}, site


def test_captured_values_match_the_model(model, inputs):
  tokens, positions = inputs
  last = iv.Site(CONFIG.num_layers - 1, "resid_post")
  first = iv.Site(0, "resid_pre")
  acts = iv.capture(model, [first, last, iv.Site(0, "embed")], tokens, positions)
  toks = pz.nx.wrap(jnp.asarray(tokens)).tag("batch", "seq")
  pos = pz.nx.wrap(jnp.asarray(positions)).tag("batch", "seq")
  embedded = model.embed(toks, token_positions=pos)
  np.testing.assert_allclose(unwrap(acts[first]), unwrap(embedded), rtol=1e-6)
  # Gemma scales the raw table lookup by sqrt(d) after the "embed" site.
  np.testing.assert_allclose(
      unwrap(acts[iv.Site(0, "embed")]) * np.sqrt(CONFIG.embedding_dim), unwrap(embedded), rtol=1e-5)
  final = unwrap(model.final_norm(acts[last]))
  direct = unwrap(model.residual(toks, token_positions=pos))
  np.testing.assert_allclose(final, direct, rtol=1e-5, atol=1e-6)


def test_zero_delta_everywhere_leaves_logits_unchanged(model, inputs):
  tokens, positions = inputs
  sites = iv.all_sites(CONFIG.num_layers, iv.SITE_KINDS)
  acts = iv.capture(model, sites, tokens, positions)
  hooked = iv.insert_at_sites(
      model, sites, lambda s: iv.AddDelta(s, jax.tree.map(jnp.zeros_like, acts[s]))
  )
  assert len(pz.select(hooked).at_instances_of(iv.AddDelta).get_sequence()) == len(sites)
  # Bitwise: both run block by block (a scanned run differs by float rounding only).
  unscanned = transformer.with_block_scan
  np.testing.assert_array_equal(
      last_logits(unscanned(hooked, False), tokens, positions),
      last_logits(unscanned(model, False), tokens, positions),
  )


def test_nonzero_delta_changes_logits_and_original_is_untouched(model, inputs):
  tokens, positions = inputs
  site = iv.Site(1, "mlp_hidden")
  delta = pz.nx.wrap(jnp.ones((CONFIG.mlp_hidden_dim,))).tag("neurons")
  hooked = iv.insert_at_sites(model, [site], lambda s: iv.AddDelta(s, delta))
  assert not np.allclose(last_logits(hooked, tokens, positions), last_logits(model, tokens, positions))
  assert not pz.select(model).at_instances_of(iv.SiteHooks).get_sequence()
  # Hooking the hooked copy again appends; the original layer count is unchanged.
  twice = iv.insert_at_sites(hooked, [site], lambda s: iv.AddDelta(s, delta))
  assert len(pz.select(twice).at_instances_of(iv.AddDelta).get_sequence()) == 2
  unhooked = transformer.with_block_scan(iv.remove_hooks(hooked), False)
  np.testing.assert_allclose(
      last_logits(unhooked, tokens, positions),
      last_logits(transformer.with_block_scan(model, False), tokens, positions), rtol=1e-6,
  )


def test_patch_from_cache_and_from_batch(model, inputs):
  tokens, positions = inputs
  other = np.where(positions >= 0, (tokens * 7 + 3) % CONFIG.vocab_size, 0)
  site = iv.Site(0, "resid_pre")
  other_acts = iv.capture(model, [site], other, positions)[site]
  patched = iv.insert_at_sites(model, [site], lambda s: iv.Patch(s, other_acts))
  np.testing.assert_allclose(
      last_logits(patched, tokens, positions), last_logits(model, other, positions), rtol=1e-5, atol=1e-5)

  # Row 1 reads row 0's embeddings (same padding needed: use two copies of row 0's layout).
  pair_tokens = np.stack([tokens[1], other[1]])
  pair_positions = np.stack([positions[1], positions[1]])
  source = pz.nx.wrap(jnp.array([0, 0])).tag("batch")
  copied = iv.insert_at_sites(model, [site], lambda s: iv.PatchFromBatch(s, source))
  out = last_logits(copied, pair_tokens, pair_positions)
  np.testing.assert_allclose(out[1], out[0], rtol=1e-5, atol=1e-5)

  # A mask restricted to one head changes only what that head writes.
  head_site = iv.Site(2, "head_out")
  clean = iv.capture(model, [head_site], tokens, positions)[head_site]
  mask = pz.nx.wrap(jnp.zeros((2, 2), bool).at[1, 0].set(True)).tag("head_groups", "query_heads")
  # Hooks inserted later at the same site run after earlier ones: Capture sees the patch.
  zeroed = iv.insert_at_sites(model, [head_site], lambda s: iv.Patch(s, clean * 0, mask))
  zeroed = iv.with_captures(zeroed, [head_site])
  toks, pos = pz.nx.wrap(jnp.asarray(tokens)).tag("batch", "seq"), pz.nx.wrap(jnp.asarray(positions)).tag("batch", "seq")
  zeroed.residual(toks, token_positions=pos)
  axes = ("batch", "seq", "projection", "head_groups", "query_heads")
  seen = unwrap(iv.captured_values(zeroed)[head_site], axes)
  expected = unwrap(clean, axes)
  np.testing.assert_array_equal(seen[..., 1, 0], 0)
  np.testing.assert_allclose(seen[..., 0, 0], expected[..., 0, 0], rtol=1e-5, atol=1e-5)


def test_masked_noise_only_affects_masked_and_later_positions(model, inputs):
  tokens, positions = inputs
  site = iv.Site(0, "embed")
  noise = pz.nx.wrap(jax.random.normal(jax.random.key(1), tokens.shape + (CONFIG.embedding_dim,))).tag(
      "batch", "seq", "embedding")
  column = tokens.shape[1] - 3
  mask = pz.nx.wrap(jnp.arange(tokens.shape[1]) == column).tag("seq")
  probe = iv.Site(CONFIG.num_layers - 1, "resid_post")
  noisy = iv.insert_hooks(model, {site: iv.AddMaskedNoise(site, noise, mask)})
  before = unwrap(iv.capture(model, [probe], tokens, positions)[probe])
  after = unwrap(iv.capture(noisy, [probe], tokens, positions)[probe])
  # Padding columns (position -1) attend to everything, so compare real tokens only.
  real = positions >= 0
  earlier = real & (np.arange(tokens.shape[1]) < column)
  np.testing.assert_allclose(after[earlier], before[earlier], rtol=1e-5, atol=1e-5)
  assert np.abs(after[:, column:] - before[:, column:]).min(axis=-1).min() > 0
  silent = iv.insert_hooks(model, {site: iv.AddMaskedNoise(site, noise, mask & False)})
  np.testing.assert_array_equal(last_logits(silent, tokens, positions), last_logits(model, tokens, positions))


def test_site_validation_and_rendering(model):
  with pytest.raises(ValueError, match="unknown site kind"):
    iv.Site(0, "mlp")
  with pytest.raises(ValueError, match="only at layer 0"):
    iv.Site(1, "embed")
  with pytest.raises(ValueError, match="outside the model"):
    iv.insert_at_sites(model, [iv.Site(CONFIG.num_layers, "mlp_out")], iv.Capture)
  with pytest.raises(TypeError, match="must be Site"):
    iv.insert_hooks(model, {(0, "mlp_out"): iv.Capture(iv.Site(0, "mlp_out"))})
  text = treescope.render_to_text(iv.with_captures(model, [iv.Site(1, "gate")]))
  assert "Capture(site=Site(layer=1, kind='gate')" in text


def test_suffix_run_against_prefix_matches_full_run(model, inputs):
  tokens, positions = inputs
  start = 5  # includes padding of the short rows and real tokens of the long one
  prefix = iv.prefix_key_values(model, tokens[:, :start], positions[:, :start])
  assert len(prefix) == CONFIG.num_layers
  assert dict(prefix[0][0].named_shape) == {"batch": 3, "seq": start, "head_groups": 2, "projection": 8}
  suffix_model = iv.with_prefix(model, prefix)
  kv_positions = pz.nx.wrap(jnp.asarray(positions)).tag("batch", "seq")
  full = last_logits(model, tokens, positions)
  suffix = last_logits(suffix_model, tokens[:, start:], positions[:, start:], kv_token_positions=kv_positions)
  np.testing.assert_allclose(suffix, full, rtol=1e-4, atol=1e-4)
  # Hooks work inside the suffix model and see only the suffix columns.
  site = iv.Site(1, "k")
  acts = iv.capture_traced(suffix_model, [site], tokens[:, start:], positions[:, start:], kv_token_positions=kv_positions)
  full_acts = iv.capture(model, [site], tokens, positions)[site]
  np.testing.assert_allclose(
      unwrap(acts[site], ("batch", "seq", "head_groups", "projection")),
      unwrap(full_acts, ("batch", "seq", "head_groups", "projection"))[:, start:], rtol=1e-4, atol=1e-5)
