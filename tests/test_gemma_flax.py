"""Gemma (`gemma` library / Kaggle Flax) orbax checkpoints: layout, math, errors."""

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mech_unlearn_jax.models import config as config_lib
from mech_unlearn_jax.models import forward, gemma_flax, loaders, transformer

TINY = config_lib.get_preset("tiny-gemma3")  # 4 query heads in 2 KV groups, window 4
TOKENS = np.array([[2, 17, 301, 45, 9, 77, 123, 5], [2, 400, 8, 8, 250, 3, 64, 511]])


def _random_model(cfg, seed=0):
  """A tiny model whose norm scales are random too (they init to 1)."""
  model = transformer.build_transformer(cfg, jax.random.key(seed))
  tensors = gemma_flax.model_canonical_tensors(model)
  rng = np.random.default_rng(seed)
  for name in tensors:
    if name.endswith("norm"):
      tensors[name] = tensors[name] + rng.normal(0, 0.3, tensors[name].shape).astype(np.float32)
  return loaders.bind_canonical(cfg, tensors, "test")


def _logits(model):
  positions = np.broadcast_to(np.arange(TOKENS.shape[1]), TOKENS.shape)
  return np.asarray(forward.full_logits(model, TOKENS, positions))


def _save(tree, path):
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, tree)
  return str(path)


def _nested(flat):
  """The released flat layout -> the `model.init` nested layout (MLP weights bare)."""
  out = {}
  for path, leaves in flat.items():
    node = out
    *parents, last = path.split("/")[1:]  # drop the 'transformer' root
    for key in parents:
      node = node.setdefault(key, {})
    node[last] = leaves["w"] if parents[-1:] == ["mlp"] else leaves
  return out


# ----------------------------------------------------------------------------------
# An independent forward pass written from the `gemma` library's module code
# (gm/nn/_modules.py, _layers.py, gm/math/_positional_embeddings.py), in float64,
# reading the checkpoint tree directly.


def _rms(x, scale):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * (1 + scale)


def _rope(x, positions, base, scale_factor):
  head_dim = x.shape[-1]
  timescale = base ** (2 * np.arange(head_dim // 2) / head_dim)
  angle = (positions[..., None] / timescale)[..., None, :] / scale_factor
  first, second = np.split(x, 2, axis=-1)
  return np.concatenate(
      [first * np.cos(angle) - second * np.sin(angle), second * np.cos(angle) + first * np.sin(angle)],
      axis=-1,
  )


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _gemma_library_logits(flat, cfg, tokens):
  w = {path: {k: v.astype(np.float64) for k, v in leaves.items()} for path, leaves in flat.items()}
  table = w["transformer/embedder"]["input_embedding"]
  b, t = tokens.shape
  positions = np.broadcast_to(np.arange(t), (b, t)).astype(np.float64)
  x = table[tokens] * np.sqrt(cfg.embedding_dim)
  for i in range(cfg.num_layers):
    layer = f"transformer/layer_{i}"
    h = _rms(x, w[f"{layer}/pre_attention_norm"]["scale"])
    if f"{layer}/attn/qkv_einsum" in w:
      q, k, v = np.einsum("BTD,SNDH->SBTNH", h, w[f"{layer}/attn/qkv_einsum"]["w"])
    else:
      q = np.einsum("BTD,NDH->BTNH", h, w[f"{layer}/attn/q_einsum"]["w"])
      k, v = np.einsum("BSD,CKDH->CBSKH", h, w[f"{layer}/attn/kv_einsum"]["w"])
    q = _rms(q, w[f"{layer}/attn/_query_norm"]["scale"])
    k = _rms(k, w[f"{layer}/attn/_key_norm"]["scale"])
    rope = cfg.rope_for_layer(i)
    q = _rope(q, positions, rope.base, rope.linear_scale) * cfg.query_scale
    k = _rope(k, positions, rope.base, rope.linear_scale)
    groups = cfg.num_heads // cfg.num_kv_heads
    qg = q.reshape(b, t, cfg.num_kv_heads, groups, cfg.head_dim)
    scores = np.einsum("BTKGH,BSKH->BTKGS", qg, k).reshape(b, t, cfg.num_heads, t)
    qpos, kpos = np.arange(t)[:, None], np.arange(t)[None, :]
    mask = kpos <= qpos
    if cfg.layer_types[i] == "local":
      mask &= (kpos > qpos - cfg.sliding_window) & (kpos < qpos + cfg.sliding_window)
    scores = np.where(mask[None, :, None, :], scores, -2.3819763e38)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    probs = probs.reshape(b, t, cfg.num_kv_heads, groups, t)
    enc = np.einsum("BTKGS,BSKH->BTKGH", probs, v).reshape(b, t, cfg.num_heads, cfg.head_dim)
    attn = np.einsum("BTNH,NHD->BTD", enc, w[f"{layer}/attn/attn_vec_einsum"]["w"])
    x = x + _rms(attn, w[f"{layer}/post_attention_norm"]["scale"])
    h = _rms(x, w[f"{layer}/pre_ffw_norm"]["scale"])
    gate = np.einsum("...F,NHF->...NH", h, w[f"{layer}/mlp/gating_einsum"]["w"])
    act = _gelu_tanh(gate[..., 0, :]) * gate[..., 1, :]
    out = np.einsum("...H,HF->...F", act, w[f"{layer}/mlp/linear"]["w"])
    x = x + _rms(out, w[f"{layer}/post_ffw_norm"]["scale"])
  x = _rms(x, w["transformer/final_norm"]["scale"])
  return x @ table.T


# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_round_trip_gives_the_original_logits(tmp_path, layout):
  model = _random_model(TINY)
  flat = gemma_flax.gemma_flax_tree(model)
  path = _save(flat if layout == "flat" else _nested(flat), tmp_path / "ckpt")
  assert gemma_flax.is_gemma_flax_checkpoint(path)
  loaded = loaders.load_model(path)  # the dispatch; the preset is found by shape
  assert loaded.config == TINY
  np.testing.assert_allclose(_logits(loaded), _logits(model), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])  # 4 = 4 heads: the qkv_einsum variant
def test_loaded_model_matches_the_gemma_library_math(tmp_path, kv_heads):
  cfg = TINY.replace(num_kv_heads=kv_heads)
  model = _random_model(cfg, seed=kv_heads)
  flat = gemma_flax.gemma_flax_tree(model)
  assert ("transformer/layer_0/attn/qkv_einsum" in flat) == (kv_heads == 4)
  loaded = gemma_flax.load_gemma_flax(_save(flat, tmp_path / "ckpt"), preset=cfg)
  reference = _gemma_library_logits(flat, cfg, TOKENS)
  # Local layers matter here: 8 tokens, window 4.
  np.testing.assert_allclose(_logits(loaded), reference, atol=2e-4, rtol=1e-4)


def test_bfloat16_checkpoint_loads_as_float32(tmp_path):
  model = _random_model(TINY)
  path = tmp_path / "ckpt"
  gemma_flax.save_gemma_flax(model, path, dtype="bfloat16")
  tree = gemma_flax.read_gemma_flax_tree(path)
  assert tree["layer_0/mlp/linear"].dtype == np.float32
  loaded = loaders.load_model(str(path))
  want = gemma_flax.model_canonical_tensors(model)["0.down"].astype(ml_dtypes.bfloat16)
  got = gemma_flax.model_canonical_tensors(loaded)["0.down"]
  np.testing.assert_array_equal(got, want.astype(np.float32))


def test_gating_einsum_orientation_of_older_checkpoints(tmp_path):
  model = _random_model(TINY)
  flat = gemma_flax.gemma_flax_tree(model)
  for i in range(TINY.num_layers):  # transpose_gating_einsum=False: [2, d, hidden]
    gating = flat[f"transformer/layer_{i}/mlp/gating_einsum"]
    gating["w"] = gating["w"].transpose(0, 2, 1)
  loaded = loaders.load_model(_save(flat, tmp_path / "ckpt"))
  np.testing.assert_allclose(_logits(loaded), _logits(model), atol=1e-5, rtol=1e-5)


def _broken(tmp_path, edit):
  flat = gemma_flax.gemma_flax_tree(_random_model(TINY))
  edit(flat)
  return _save(flat, tmp_path / "ckpt")


def test_missing_parameter_is_named(tmp_path):
  path = _broken(tmp_path, lambda t: t.pop("transformer/layer_1/attn/kv_einsum"))
  with pytest.raises(
      loaders.CheckpointError, match=r"missing parameter 'transformer/layer_1/attn/kv_einsum/w'"
  ):
    loaders.load_model(path)
  path = _broken(tmp_path / "b", lambda t: t.pop("transformer/layer_2/post_ffw_norm"))
  with pytest.raises(loaders.CheckpointError, match=r"'transformer/layer_2/post_ffw_norm/scale'"):
    loaders.load_model(path)


def test_wrong_shape_is_named(tmp_path):
  def shrink(t):
    t["transformer/layer_2/mlp/gating_einsum"]["w"] = np.zeros((2, 63, 32), np.float32)

  with pytest.raises(
      loaders.CheckpointError,
      match=r"'transformer/layer_2/mlp/gating_einsum/w' has shape \(2, 63, 32\), expected \(2, 64, 32\)",
  ):
    loaders.load_model(_broken(tmp_path, shrink))


def test_unexpected_parameter_is_named(tmp_path):
  def extra(t):
    t["transformer/layer_0/attn/extra_einsum"] = {"w": np.zeros((3,), np.float32)}

  with pytest.raises(
      loaders.CheckpointError,
      match=r"unexpected parameters \['transformer/layer_0/attn/extra_einsum/w'\]",
  ):
    loaders.load_model(_broken(tmp_path, extra))


def test_preset_must_match_the_shapes(tmp_path):
  path = _save(gemma_flax.gemma_flax_tree(_random_model(TINY)), tmp_path / "ckpt")
  with pytest.raises(loaders.CheckpointError, match=r"'gemma3-270m'.*num_layers=3 \(preset: 18\)"):
    loaders.load_model(path, preset="gemma3-270m")
  odd_model = _random_model(TINY.replace(mlp_hidden_dim=48))
  odd = _save(gemma_flax.gemma_flax_tree(odd_model), tmp_path / "odd")
  with pytest.raises(loaders.CheckpointError, match=r"no preset matches.*pass preset="):
    loaders.load_model(odd)


def test_vision_parameters_are_skipped_and_other_dirs_are_not_gemma(tmp_path):
  model = _random_model(TINY)
  flat = gemma_flax.gemma_flax_tree(model)
  flat["SigLiPFromPatches_0/siglip_encoder/embedding"] = {"kernel": np.zeros((2, 2), np.float32)}
  flat["transformer/embedder"]["mm_input_projection"] = np.zeros((4, 32), np.float32)
  loaded = loaders.load_model(_save(flat, tmp_path / "ckpt"))
  np.testing.assert_allclose(_logits(loaded), _logits(model), atol=1e-5, rtol=1e-5)
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text("{}")
  assert not gemma_flax.is_gemma_flax_checkpoint(tmp_path / "hf")
  with pytest.raises(loaders.CheckpointError, match="not an orbax checkpoint"):
    gemma_flax.read_gemma_flax_tree(tmp_path / "hf")
  (tmp_path / "damaged").mkdir()
  (tmp_path / "damaged" / "_METADATA").write_text("{not json")
  with pytest.raises(loaders.CheckpointError, match="damaged: cannot read the orbax checkpoint"):
    loaders.load_model(str(tmp_path / "damaged"))
