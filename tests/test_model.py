"""Model logic on tiny random models: padding, selected positions, presets, loaders."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

from mech_unlearn_jax.models import config as config_lib
from mech_unlearn_jax.models import forward, loaders, transformer

TINY = config_lib.get_preset("tiny-gemma3")


@pytest.fixture(scope="module")
def tiny_model():
  return transformer.build_transformer(TINY, jax.random.key(0))


def test_left_padding_does_not_change_logits(tiny_model):
  seqs = [[2, 5, 6, 7, 8, 9, 10, 11, 12], [2, 30, 31]]
  tokens, positions = forward.left_pad(seqs, multiple=8)
  assert tokens.shape == (2, 16)
  batched = forward.last_logits(tiny_model, tokens, positions)
  for row, seq in enumerate(seqs):
    alone = forward.full_logits(tiny_model, np.array([seq]), np.arange(len(seq))[None])
    np.testing.assert_allclose(batched[row], alone[0, -1], atol=1e-5)


def test_selected_positions_match_full_logits(tiny_model):
  tokens, positions = forward.left_pad([[2, 5, 6, 7, 8, 9], [2, 40, 41, 42]])
  full = forward.full_logits(tiny_model, tokens, positions)
  columns = np.array([[5, 3], [4, 5]])
  picked = forward.logits_at(tiny_model, tokens, positions, columns)
  np.testing.assert_allclose(picked[0, 0], full[0, 5], atol=1e-5)
  np.testing.assert_allclose(picked[1, 0], full[1, 4], atol=1e-5)
  np.testing.assert_allclose(forward.jitted_last_logits(tiny_model, tokens, positions), full[:, -1], atol=1e-5)


def test_sliding_window_limits_what_local_layers_see():
  # One local layer with window 2: the last token's output must not depend on a
  # token 3 positions back, but must in a global-only model.
  local = TINY.replace(num_layers=1, layer_types=("local",), sliding_window=2)
  glob = TINY.replace(num_layers=1, layer_types=("global",))
  base = [2, 5, 6, 7, 8]
  changed = [2, 99, 6, 7, 8]  # differs 3 positions before the last token
  for cfg, should_differ in ((local, False), (glob, True)):
    model = transformer.build_transformer(cfg, jax.random.key(1))
    a = forward.full_logits(model, np.array([base]), np.arange(5)[None])[0, -1]
    b = forward.full_logits(model, np.array([changed]), np.arange(5)[None])[0, -1]
    assert (float(jnp.abs(a - b).max()) > 1e-4) == should_differ


@pytest.mark.parametrize("name", sorted(config_lib.PRESETS))
def test_presets_shape_check(name):
  cfg = config_lib.get_preset(name)
  shapes = transformer.parameter_shapes(cfg)
  total = sum(int(np.prod(list(s.values()))) for s in shapes.values())
  # 7 matrices + 2 pre-norms per layer, plus the optional QK and post norms; embedding,
  # final norm, and an untied unembedding.
  per_layer = 9 + 2 * cfg.qk_norm + cfg.post_attn_norm + cfg.post_ffw_norm
  assert len(shapes) == 2 + (not cfg.tie_embeddings) + per_layer * cfg.num_layers
  if name == "gemma3-270m":
    assert total == 268_098_176  # the tensor count and sizes of the released GGUF


def test_unknown_preset_names_choices():
  with pytest.raises(KeyError, match="gemma3-270m"):
    config_lib.get_preset("gemma3-9000b")


def test_rope_linear_scale_changes_global_layers_only():
  cfg = TINY.replace(rope_global=config_lib.RopeConfig(base=1e6, linear_scale=8.0))
  inv = transformer.rope_inverse_frequencies(cfg.rope_global, 8)
  ref = transformer.rope_inverse_frequencies(config_lib.RopeConfig(base=1e6), 8)
  np.testing.assert_allclose(inv * 8, ref, rtol=1e-6)
  assert cfg.rope_for_layer(0) == cfg.rope_local


def _write_hf_checkpoint(tmp_path, model_type, rng):
  """A tiny random checkpoint in the real Hugging Face file format and naming."""
  from safetensors.numpy import save_file

  d, heads, kv, hd, f, vocab, layers = 16, 4, 2, 8, 32, 64, 2
  hf = {
      "model_type": model_type, "hidden_size": d, "num_attention_heads": heads,
      "num_key_value_heads": kv, "head_dim": hd, "intermediate_size": f,
      "vocab_size": vocab, "num_hidden_layers": layers, "rms_norm_eps": 1e-6,
      "rope_theta": 10000.0, "sliding_window": 4, "query_pre_attn_scalar": hd,
  }
  if model_type == "gemma3_text":
    hf["sliding_window_pattern"] = 2  # layer 0 local, layer 1 global
  if model_type == "gemma2":
    hf.update(attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
  if model_type == "llama":
    hf["tie_word_embeddings"] = False
  w = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.1
  t = {"model.embed_tokens.weight": w(vocab, d), "model.norm.weight": w(d)}
  if model_type == "llama":
    t["lm_head.weight"] = w(vocab, d)
  for i in range(layers):
    p = f"model.layers.{i}."
    t.update({
        p + "self_attn.q_proj.weight": w(heads * hd, d),
        p + "self_attn.k_proj.weight": w(kv * hd, d),
        p + "self_attn.v_proj.weight": w(kv * hd, d),
        p + "self_attn.o_proj.weight": w(d, heads * hd),
        p + "mlp.gate_proj.weight": w(f, d),
        p + "mlp.up_proj.weight": w(f, d),
        p + "mlp.down_proj.weight": w(d, f),
        p + "input_layernorm.weight": w(d),
        p + "post_attention_layernorm.weight": w(d),
    })
    if model_type != "llama":
      t[p + "pre_feedforward_layernorm.weight"] = w(d)
      t[p + "post_feedforward_layernorm.weight"] = w(d)
    if model_type == "gemma3_text":
      t[p + "self_attn.q_norm.weight"] = w(hd)
      t[p + "self_attn.k_norm.weight"] = w(hd)
  (tmp_path / "config.json").write_text(json.dumps(hf))
  names = sorted(t)
  save_file({k: t[k] for k in names[: len(names) // 2]}, str(tmp_path / "model-00001-of-00002.safetensors"))
  save_file({k: t[k] for k in names[len(names) // 2 :]}, str(tmp_path / "model-00002-of-00002.safetensors"))
  return t


def _numpy_reference_logits(t, model_type, tokens):
  """An independent numpy forward pass for the tiny checkpoints (no padding)."""
  gemma = model_type != "llama"
  d, heads, kv, hd = 16, 4, 2, 8
  def norm(x, w):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * ((1 + w) if gemma else w)
  def rope(x, pos):
    inv = 1.0 / (10000.0 ** (np.arange(0, hd, 2) / hd))
    ang = pos[:, None] * inv
    a, b = x[..., : hd // 2], x[..., hd // 2 :]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)
  gelu = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
  silu = lambda x: x / (1 + np.exp(-x))
  n = len(tokens)
  x = t["model.embed_tokens.weight"][tokens] * (np.sqrt(d).astype(np.float32) if gemma else 1)
  pos = np.arange(n)
  for i in range(2):
    p = f"model.layers.{i}."
    h = norm(x, t[p + "input_layernorm.weight"])
    q = (h @ t[p + "self_attn.q_proj.weight"].T).reshape(n, heads, hd)
    k = (h @ t[p + "self_attn.k_proj.weight"].T).reshape(n, kv, hd)
    v = (h @ t[p + "self_attn.v_proj.weight"].T).reshape(n, kv, hd)
    if model_type == "gemma3_text":
      q, k = norm(q, t[p + "self_attn.q_norm.weight"]), norm(k, t[p + "self_attn.k_norm.weight"])
    q, k = rope(q, pos) * hd**-0.5, rope(k, pos)
    k, v = np.repeat(k, heads // kv, 1), np.repeat(v, heads // kv, 1)
    s = np.einsum("qhd,khd->hqk", q, k)
    if model_type == "gemma2":
      s = 50.0 * np.tanh(s / 50.0)
    local = (model_type == "gemma3_text" and i == 0) or (model_type == "gemma2" and i % 2 == 0)
    allowed = pos[:, None] >= pos[None]
    if local:
      allowed &= (pos[:, None] - pos[None]) < 4
    s = np.where(allowed, s, -1e30)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("hqk,khd->qhd", a, v).reshape(n, heads * hd) @ t[p + "self_attn.o_proj.weight"].T
    if gemma:
      o = norm(o, t[p + "post_attention_layernorm.weight"])
    x = x + o
    h = norm(x, t[p + ("pre_feedforward_layernorm.weight" if gemma else "post_attention_layernorm.weight")])
    act = gelu if gemma else silu
    m = (act(h @ t[p + "mlp.gate_proj.weight"].T) * (h @ t[p + "mlp.up_proj.weight"].T)) @ t[p + "mlp.down_proj.weight"].T
    if gemma:
      m = norm(m, t[p + "post_feedforward_layernorm.weight"])
    x = x + m
  x = norm(x, t["model.norm.weight"])
  logits = x @ (t["lm_head.weight"] if model_type == "llama" else t["model.embed_tokens.weight"]).T
  if model_type == "gemma2":
    logits = 30.0 * np.tanh(logits / 30.0)
  return logits


@pytest.mark.parametrize("model_type", ["gemma3_text", "gemma2", "llama"])
def test_safetensors_loader_matches_numpy_reference(tmp_path, model_type):
  tensors = _write_hf_checkpoint(tmp_path, model_type, np.random.default_rng(0))
  model = loaders.load_model(str(tmp_path))
  # Local layers need a sequence longer than the window (4) to matter.
  tokens = np.array([2, 7, 9, 11, 13, 17, 19, 23, 29, 31])
  ours = forward.full_logits(model, tokens[None], np.arange(len(tokens))[None])[0]
  ref = _numpy_reference_logits(tensors, model_type, tokens)
  np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-4, rtol=1e-4)


def test_orbax_roundtrip(tmp_path, tiny_model):
  loaders.save_converted(tiny_model, tmp_path / "ckpt")
  restored = loaders.restore_converted(tmp_path / "ckpt")
  assert restored.config == tiny_model.config
  tokens, positions = forward.left_pad([[2, 5, 6, 7]])
  np.testing.assert_array_equal(
      forward.last_logits(tiny_model, tokens, positions),
      forward.last_logits(restored, tokens, positions),
  )


def test_bad_inputs_have_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.gguf"):
    loaders.load_gguf(tmp_path / "nope.gguf")
  bad = tmp_path / "corrupt.gguf"
  bad.write_bytes(b"this is not a gguf file at all" * 10)
  with pytest.raises(loaders.CheckpointError, match="corrupt.gguf"):
    loaders.load_gguf(bad, use_cache=False)
  with pytest.raises(ValueError, match="general.architecture is 'llama'"):
    config_lib.config_from_gguf_metadata({"general.architecture": "llama"}, "x.gguf")
  with pytest.raises(ValueError, match="block_count"):
    config_lib.config_from_gguf_metadata({"general.architecture": "gemma3"}, "x.gguf")
  with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
    config_lib.config_from_hf_config({"model_type": "gpt2"})
  # A checkpoint whose tensor shape disagrees with its config.
  tensors = _write_hf_checkpoint(tmp_path, "llama", np.random.default_rng(0))
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg["intermediate_size"] = 48
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(loaders.CheckpointError, match=r"'0.gate' has shape \(32, 16\), expected \(48, 16\)"):
    loaders.load_model(str(tmp_path))
  assert tensors
  with pytest.raises(FileNotFoundError, match="model spec"):
    loaders.load_model(str(tmp_path / "missing"))


def test_eval_shape_builds_without_memory():
  cfg = config_lib.get_preset("gemma3-27b")
  unbound, params = jax.eval_shape(
      lambda: pz.unbind_params(transformer.build_transformer(cfg, jax.random.key(0)), freeze=True)
  )
  sizes = {p.label: p.value.named_shape for p in params}
  assert sizes["transformer/block_0/attention/query.weights"]["projection"] == 128


def test_token_embedding_lookup_matches_penzai(tiny_model):
  lookup = tiny_model.embed.sublayers[0]
  assert isinstance(lookup, pz.nn.EmbeddingLookup)  # selectors for penzai's class still match
  tokens = pz.nx.wrap(jnp.array([[2, 5, 9], [7, 1, 0]])).tag("batch", "seq")
  ours = lookup(tokens).untag("batch", "seq", "embedding").unwrap()
  theirs = pz.nn.EmbeddingLookup(lookup.table)(tokens).untag("batch", "seq", "embedding").unwrap()
  np.testing.assert_array_equal(ours, theirs)


def _scan_run_lengths(model):
  return [len(run) for run in model.blocks._runs()]


def test_block_scan_matches_block_by_block_and_scans_identical_blocks(tiny_model):
  # tiny-gemma3 mixes local and global layers (other RoPE base, other mask); as data
  # they share one scan.
  assert set(TINY.layer_types) == {"local", "global"}
  assert _scan_run_lengths(tiny_model) == [TINY.num_layers]
  tokens, positions = forward.left_pad([[2, 5, 6, 7, 8, 9, 10, 11, 12], [2, 30, 31]], multiple=8)
  reference = transformer.with_block_scan(tiny_model, False)
  np.testing.assert_allclose(
      forward.full_logits(tiny_model, tokens, positions),
      forward.full_logits(reference, tokens, positions), atol=2e-5,
  )
  def jaxpr(model):
    return str(jax.make_jaxpr(lambda: forward.last_logits(model, tokens, positions))())

  assert "scan[" in jaxpr(tiny_model)
  assert "scan[" not in jaxpr(reference)

  # Gradients with respect to every weight agree too (the training steps' path).
  def loss(model):
    return forward.last_logits(model, tokens, positions).sum()

  unbound, params = pz.unbind_params(tiny_model, freeze=True)
  grad_fn = lambda scan: jax.grad(lambda p: loss(transformer.with_block_scan(pz.bind_variables(unbound, p), scan)))
  scanned, unrolled = grad_fn(True)(params), grad_fn(False)(params)
  assert len(scanned) == len(unrolled) > 10
  for a, b in zip(scanned, unrolled):
    axes = tuple(a.value.named_shape)
    np.testing.assert_allclose(a.value.unwrap(*axes), b.value.unwrap(*axes), atol=1e-4, rtol=1e-4)


def test_block_scan_splits_at_hooks_and_state():
  from mech_unlearn_jax import interventions as iv  # pylint: disable=g-import-not-at-top

  config = TINY.replace(num_layers=6, layer_types=("local", "local", "global") * 2)
  model = transformer.build_transformer(config, jax.random.key(3))
  assert _scan_run_lengths(model) == [6]
  tokens, positions = forward.left_pad([[2, 5, 6, 7, 8], [2, 30, 31]])
  delta = pz.nx.wrap(jnp.full((config.embedding_dim,), 0.1)).tag("embedding")
  hooked = iv.insert_at_sites(model, [iv.Site(2, "mlp_out")], lambda s: iv.AddDelta(s, delta))
  assert _scan_run_lengths(hooked) == [2, 1, 3]
  np.testing.assert_allclose(
      forward.last_logits(hooked, tokens, positions),
      forward.last_logits(transformer.with_block_scan(hooked, False), tokens, positions), atol=2e-5,
  )
  # A hook holding state (a capture) never runs inside a scan: its block runs alone,
  # and what it records is the activation of that layer.
  acts = iv.capture(model, [iv.Site(4, "resid_post")], tokens, positions)
  reference = iv.capture(transformer.with_block_scan(model, False), [iv.Site(4, "resid_post")], tokens, positions)
  np.testing.assert_allclose(
      acts[iv.Site(4, "resid_post")].unwrap("batch", "seq", "embedding"),
      reference[iv.Site(4, "resid_post")].unwrap("batch", "seq", "embedding"), atol=2e-5,
  )
