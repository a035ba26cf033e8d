"""Next-token predictions for a person at a terminal (used by `launch/predict.py`)."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np

from mech_unlearn_jax.models import forward, loaders

# Tiny random presets mimic Gemma 3 270M, whose GGUF declares a 32k context.
_PRESET_CONTEXT = 32768


class PromptTooLongError(ValueError):
  """The prompt has more tokens than the model's context."""


def context_length(model_spec: str) -> int | None:
  """Tokens the model was trained to attend over, or None when its files do not say.

  GGUF files (the default model included): `<arch>.context_length`; Hugging Face
  directories: `max_position_embeddings` of config.json; tiny presets: 32768.
  """
  from mech_unlearn_jax.models import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

  if model_spec.startswith("tiny-"):
    return _PRESET_CONTEXT
  if model_spec in ("default", "gemma3-270m"):
    path = loaders.default_gguf_path()
  else:
    path = pathlib.Path(model_spec)
  if path.suffix == ".gguf":
    metadata = tokenizer_lib.read_gguf_metadata(path)
    value = metadata.get(f"{metadata.get('general.architecture')}.context_length")
    return None if value is None else int(value)
  config = path / "config.json"
  if config.is_file():
    try:
      value = json.loads(config.read_text()).get("max_position_embeddings")
    except (json.JSONDecodeError, AttributeError):
      return None
    return None if value is None else int(value)
  return None


def top_next_tokens(model_spec: str, prompt: str, top_k: int = 5) -> dict:
  """Top-k next tokens at the last position: ids, log-probabilities and pieces.

  Fewer than `top_k` come back when the vocabulary is smaller.

  Raises:
    PromptTooLongError: the prompt (with BOS) is longer than the model's context.
  """
  if top_k < 1:
    raise ValueError(f"top_k must be >= 1, got {top_k}")
  tiny = model_spec.startswith("tiny-")
  # Tokenize and check the length before the (slow) model load.
  tokenizer = loaders.load_tokenizer("default" if tiny else model_spec)
  ids = tokenizer.encode(prompt, add_bos=True)
  limit = context_length(model_spec)
  if limit is not None and len(ids) > limit:
    raise PromptTooLongError(
        f"the prompt is {len(ids)} tokens (with BOS) but model {model_spec!r} has a context of"
        f" {limit} tokens; shorten it"
    )
  model = loaders.load_model_and_tokenizer(model_spec)[0] if tiny else loaders.load_model(model_spec)
  tokens, positions = forward.left_pad([ids])
  logits = forward.jitted_last_logits(model, tokens, positions)[0]
  logprobs = np.asarray(jax.nn.log_softmax(logits.astype(np.float32)))
  top = np.argsort(-logprobs)[:top_k]
  return {
      "ids": [int(i) for i in ids],
      "top_ids": [int(i) for i in top],
      "top_logprobs": [float(logprobs[i]) for i in top],
      "top_pieces": [tokenizer.id_to_piece(int(i)) for i in top],
  }
