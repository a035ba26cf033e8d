"""Architecture configs for the llama-like decoder family (Gemma 3, Gemma 2, Llama 3).

One frozen, hashable dataclass describes every supported checkpoint, so it can be a
static argument of jitted functions and a `pytree_node=False` field of the model.
Presets cover the Gemma 3 text sizes and Llama 3 8B; `config_from_gguf_metadata` and
`config_from_hf_config` derive configs from checkpoint metadata.

Facts encoded here (Gemma 3 technical report and the released configs):
- Gemma 3 interleaves 5 local sliding-window layers with 1 global layer; local layers
  use RoPE base 1e4, global layers 1e6 (with linear position scaling 8 for 4B and up).
- Query scaling is `query_pre_attn_scalar ** -0.5`; it equals the head dimension
  except for 27B (168).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

LayerType = Literal["global", "local"]


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary embedding frequencies for one attention type.

  Attributes:
    base: the maximum wavelength (theta).
    linear_scale: positions are divided by this factor (Gemma 3 global layers >= 4B).
    llama3_scaling: optional (factor, low_freq_factor, high_freq_factor,
      original_max_position) of Llama 3.1's frequency-dependent rescaling.
  """

  base: float = 10_000.0
  linear_scale: float = 1.0
  llama3_scaling: tuple[float, float, float, int] | None = None


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyperparameters of a llama-like decoder.

  Attributes:
    family: "gemma3", "gemma2" or "llama" (documents provenance; behaviour is set by
      the fields below, not by this name).
    vocab_size, embedding_dim, num_layers, num_heads, num_kv_heads, head_dim,
    mlp_hidden_dim: sizes.
    mlp_activation: "gelu_tanh" (GeGLU, Gemma) or "silu" (SwiGLU, Llama).
    norm_eps: RMSNorm epsilon.
    qk_norm: RMSNorm over the head dimension of queries and keys (Gemma 3).
    post_attn_norm, post_ffw_norm: Gemma 2/3 "sandwich" norms.
    scale_embeddings: multiply token embeddings by sqrt(embedding_dim) (Gemma).
    tie_embeddings: the unembedding is the transposed embedding table.
    query_scale: multiplier applied to queries after RoPE.
    attn_logit_softcap, final_logit_softcap: tanh soft caps (Gemma 2), or None.
    layer_types: "global" or "local" per layer.
    sliding_window: window of local layers (a key is visible iff q - k < window).
    rope_global, rope_local: RoPE settings per attention type.
    parameter_dtype, activation_dtype: dtype names ("float32", "bfloat16").
  """

  family: str
  vocab_size: int
  embedding_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_hidden_dim: int
  mlp_activation: Literal["gelu_tanh", "silu"] = "gelu_tanh"
  norm_eps: float = 1e-6
  qk_norm: bool = True
  post_attn_norm: bool = True
  post_ffw_norm: bool = True
  scale_embeddings: bool = True
  tie_embeddings: bool = True
  query_scale: float = 256**-0.5
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  layer_types: tuple[LayerType, ...] = ()
  sliding_window: int | None = 512
  rope_global: RopeConfig = RopeConfig(base=1_000_000.0)
  rope_local: RopeConfig = RopeConfig(base=10_000.0)
  parameter_dtype: str = "float32"
  activation_dtype: str = "float32"

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} must be a multiple of"
          f" num_kv_heads={self.num_kv_heads}"
      )
    if len(self.layer_types) != self.num_layers:
      raise ValueError(
          f"layer_types has {len(self.layer_types)} entries, expected"
          f" num_layers={self.num_layers}"
      )
    bad = set(self.layer_types) - {"global", "local"}
    if bad:
      raise ValueError(f"layer_types has unknown entries {sorted(bad)}")
    if "local" in self.layer_types and not self.sliding_window:
      raise ValueError("local layers need a positive sliding_window")

  @property
  def query_heads_per_kv(self) -> int:
    return self.num_heads // self.num_kv_heads

  def replace(self, **changes: Any) -> "TransformerConfig":
    return dataclasses.replace(self, **changes)

  def rope_for_layer(self, layer: int) -> RopeConfig:
    return self.rope_global if self.layer_types[layer] == "global" else self.rope_local

  def num_block_parameters(self) -> int:
    """Parameters in attention + MLP matrices (the editable ones)."""
    d, h = self.embedding_dim, self.head_dim
    attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
    mlp = 3 * d * self.mlp_hidden_dim
    return self.num_layers * (attn + mlp)


def gemma3_layer_types(num_layers: int, pattern: int = 6) -> tuple[LayerType, ...]:
  """Gemma 3: every `pattern`-th layer (1-based) is global, the rest local."""
  return tuple(
      "global" if (i + 1) % pattern == 0 else "local" for i in range(num_layers)
  )


def _gemma3(**kw) -> TransformerConfig:
  num_layers = kw["num_layers"]
  kw.setdefault("layer_types", gemma3_layer_types(num_layers))
  return TransformerConfig(family="gemma3", **kw)


PRESETS: dict[str, TransformerConfig] = {
    "gemma3-270m": _gemma3(
        vocab_size=262_144, embedding_dim=640, num_layers=18, num_heads=4,
        num_kv_heads=1, head_dim=256, mlp_hidden_dim=2048, sliding_window=512,
    ),
    "gemma3-1b": _gemma3(
        vocab_size=262_144, embedding_dim=1152, num_layers=26, num_heads=4,
        num_kv_heads=1, head_dim=256, mlp_hidden_dim=6912, sliding_window=512,
    ),
    "gemma3-4b": _gemma3(
        vocab_size=262_208, embedding_dim=2560, num_layers=34, num_heads=8,
        num_kv_heads=4, head_dim=256, mlp_hidden_dim=10_240, sliding_window=1024,
        rope_global=RopeConfig(base=1_000_000.0, linear_scale=8.0),
    ),
    "gemma3-12b": _gemma3(
        vocab_size=262_208, embedding_dim=3840, num_layers=48, num_heads=16,
        num_kv_heads=8, head_dim=256, mlp_hidden_dim=15_360, sliding_window=1024,
        rope_global=RopeConfig(base=1_000_000.0, linear_scale=8.0),
    ),
    "gemma3-27b": _gemma3(
        vocab_size=262_208, embedding_dim=5376, num_layers=62, num_heads=32,
        num_kv_heads=16, head_dim=128, mlp_hidden_dim=21_504, sliding_window=1024,
        query_scale=168**-0.5,
        rope_global=RopeConfig(base=1_000_000.0, linear_scale=8.0),
    ),
    # Meta-Llama-3-8B (config.json of the release: no RoPE scaling, untied
    # embeddings, RMSNorm eps 1e-5). Llama 3.1 adds `llama3_scaling`
    # (8.0, 1.0, 4.0, 8192); read such checkpoints' own config.json instead.
    "llama3-8b": TransformerConfig(
        family="llama", vocab_size=128_256, embedding_dim=4096, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, mlp_hidden_dim=14_336,
        mlp_activation="silu", norm_eps=1e-5, qk_norm=False, post_attn_norm=False,
        post_ffw_norm=False, scale_embeddings=False, tie_embeddings=False,
        query_scale=128**-0.5, layer_types=("global",) * 32, sliding_window=None,
        rope_global=RopeConfig(base=500_000.0), rope_local=RopeConfig(base=500_000.0),
    ),
    # A tiny random model with every Gemma 3 feature, for fast tests.
    "tiny-gemma3": _gemma3(
        vocab_size=512, embedding_dim=32, num_layers=3, num_heads=4,
        num_kv_heads=2, head_dim=8, mlp_hidden_dim=64, sliding_window=4,
        query_scale=8**-0.5, layer_types=("local", "local", "global"),
    ),
}


def get_preset(name: str) -> TransformerConfig:
  """Returns the named preset, with a clear error listing the known names."""
  try:
    return PRESETS[name]
  except KeyError:
    raise KeyError(
        f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}"
    ) from None


def config_from_gguf_metadata(
    metadata: dict[str, Any], source: str = "<gguf>"
) -> TransformerConfig:
  """Builds a config from GGUF key/values (as read by `gguf.GGUFReader`).

  Only `gemma3` is supported: it is what the default checkpoint ships as.
  """
  arch = metadata.get("general.architecture")
  if arch != "gemma3":
    raise ValueError(
        f"{source}: general.architecture is {arch!r}; only 'gemma3' GGUF files are"
        " supported (use safetensors for Gemma 2 / Llama checkpoints)"
    )

  def need(key):
    full = f"{arch}.{key}"
    if full not in metadata:
      raise ValueError(f"{source}: metadata key {full!r} is missing")
    return metadata[full]

  num_layers = int(need("block_count"))
  num_heads = int(need("attention.head_count"))
  head_dim = int(need("attention.key_length"))
  tokens = metadata.get("tokenizer.ggml.tokens")
  vocab_size = int(metadata.get(f"{arch}.vocab_size", len(tokens) if tokens else 0))
  if not vocab_size:
    raise ValueError(f"{source}: cannot tell the vocabulary size")
  # Gemma 3 scales queries by query_pre_attn_scalar**-0.5 = head_dim**-0.5 for every
  # size except 27B, which llama.cpp recognizes by its shape (62 layers).
  query_scale = 168**-0.5 if num_layers == 62 else head_dim**-0.5
  rope_scale = float(metadata.get(f"{arch}.rope.scaling.factor", 1.0) or 1.0)
  return _gemma3(
      vocab_size=vocab_size,
      embedding_dim=int(need("embedding_length")),
      num_layers=num_layers,
      num_heads=num_heads,
      num_kv_heads=int(need("attention.head_count_kv")),
      head_dim=head_dim,
      mlp_hidden_dim=int(need("feed_forward_length")),
      norm_eps=float(need("attention.layer_norm_rms_epsilon")),
      sliding_window=int(need("attention.sliding_window")),
      query_scale=query_scale,
      rope_global=RopeConfig(
          base=float(need("rope.freq_base")), linear_scale=rope_scale
      ),
      rope_local=RopeConfig(base=10_000.0),
  )


def config_from_hf_config(hf: dict[str, Any], source: str = "config.json") -> TransformerConfig:
  """Builds a config from a Hugging Face `config.json` (Gemma 3 text, Gemma 2, Llama)."""
  if "text_config" in hf:  # Gemma 3 multimodal checkpoints nest the text model.
    hf = {**hf["text_config"], "model_type": hf["text_config"].get("model_type", "gemma3_text")}
  model_type = hf.get("model_type")
  if model_type not in ("gemma3_text", "gemma3", "gemma2", "llama"):
    raise ValueError(
        f"{source}: model_type {model_type!r} is not supported; expected one of"
        " 'gemma3_text', 'gemma3', 'gemma2', 'llama'"
    )

  def need(key):
    if key not in hf:
      raise ValueError(f"{source}: field {key!r} is missing (model_type={model_type!r})")
    return hf[key]

  num_layers = int(need("num_hidden_layers"))
  num_heads = int(need("num_attention_heads"))
  embedding_dim = int(need("hidden_size"))
  head_dim = int(hf.get("head_dim") or embedding_dim // num_heads)
  common = dict(
      vocab_size=int(need("vocab_size")),
      embedding_dim=embedding_dim,
      num_layers=num_layers,
      num_heads=num_heads,
      num_kv_heads=int(hf.get("num_key_value_heads", num_heads)),
      head_dim=head_dim,
      mlp_hidden_dim=int(need("intermediate_size")),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
  )
  if model_type in ("gemma3_text", "gemma3"):
    pattern = int(hf.get("sliding_window_pattern", 6))
    layer_types = hf.get("layer_types")
    if layer_types:
      layer_types = tuple(
          "local" if t == "sliding_attention" else "global" for t in layer_types
      )
    else:
      layer_types = gemma3_layer_types(num_layers, pattern)
    scaling = hf.get("rope_scaling") or {}
    return TransformerConfig(
        family="gemma3",
        **common,
        query_scale=float(hf.get("query_pre_attn_scalar", head_dim)) ** -0.5,
        layer_types=layer_types,
        sliding_window=int(hf.get("sliding_window", 512)),
        rope_global=RopeConfig(
            base=float(hf.get("rope_theta", 1_000_000.0)),
            linear_scale=float(scaling.get("factor", 1.0)),
        ),
        rope_local=RopeConfig(base=float(hf.get("rope_local_base_freq", 10_000.0))),
        attn_logit_softcap=hf.get("attn_logit_softcapping"),
        final_logit_softcap=hf.get("final_logit_softcapping"),
    )
  if model_type == "gemma2":
    return TransformerConfig(
        family="gemma2",
        **common,
        qk_norm=False,
        query_scale=float(hf.get("query_pre_attn_scalar", head_dim)) ** -0.5,
        # Gemma 2 alternates local (even layers) and global (odd layers) attention.
        layer_types=tuple("local" if i % 2 == 0 else "global" for i in range(num_layers)),
        sliding_window=int(hf.get("sliding_window", 4096)),
        rope_global=RopeConfig(base=float(hf.get("rope_theta", 10_000.0))),
        rope_local=RopeConfig(base=float(hf.get("rope_theta", 10_000.0))),
        attn_logit_softcap=hf.get("attn_logit_softcapping"),
        final_logit_softcap=hf.get("final_logit_softcapping"),
    )
  if model_type == "llama":
    scaling = hf.get("rope_scaling") or {}
    llama3 = None
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
      llama3 = (
          float(scaling["factor"]),
          float(scaling["low_freq_factor"]),
          float(scaling["high_freq_factor"]),
          int(scaling["original_max_position_embeddings"]),
      )
    rope = RopeConfig(base=float(hf.get("rope_theta", 10_000.0)), llama3_scaling=llama3)
    return TransformerConfig(
        family="llama",
        **common,
        mlp_activation="silu",
        qk_norm=False,
        post_attn_norm=False,
        post_ffw_norm=False,
        scale_embeddings=False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        query_scale=head_dim**-0.5,
        layer_types=("global",) * num_layers,
        sliding_window=None,
        rope_global=rope,
        rope_local=rope,
    )
  raise ValueError(
      f"{source}: model_type {model_type!r} is not supported; expected one of"
      " 'gemma3_text', 'gemma3', 'gemma2', 'llama'"
  )
