"""Next-token predictions for a person at a terminal (used by `launch/predict.py`)."""

from __future__ import annotations

import jax
import numpy as np

from mech_unlearn_jax.models import forward, loaders


def top_next_tokens(model_spec: str, prompt: str, top_k: int = 5) -> dict:
  """Top-k next tokens at the last position: ids, log-probabilities and pieces."""
  tokenizer = loaders.load_tokenizer(model_spec)
  model = loaders.load_model(model_spec)
  ids = tokenizer.encode(prompt, add_bos=True)
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
