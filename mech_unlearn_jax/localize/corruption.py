"""Corrupted prompts for attribution patching: the subject's tokens replaced at random.

A corrupted prompt keeps every token of the clean prompt except the subject's, which
are replaced by random tokens (METHOD §2 AP). The replacement is done on token ids in
place, so clean and corrupted batches stay aligned column by column (same padding,
same positions). With a tokenizer, a draw is kept only if the corrupted text
round-trips (decode -> encode) to the same number of tokens, so the corrupted prompt
is one the model could actually be given; otherwise the row is redrawn (seeded).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from mech_unlearn_jax.batch import FactBatch


class RoundTripTokenizer(Protocol):

  def encode(self, text: str, add_bos: bool = True) -> list[int]:
    ...

  def decode(self, ids: Sequence[int]) -> str:
    ...


def random_token_replacement(
    tokens_BxL: np.ndarray,
    mask_BxL: np.ndarray,
    candidate_ids: np.ndarray | int,
    seed: int = 0,
) -> np.ndarray:
  """Replaces the tokens under `mask_BxL` by ids drawn uniformly from `candidate_ids`.

  Args:
    tokens_BxL: token ids.
    mask_BxL: True where a token is replaced (e.g. `FactBatch.subject_mask_BxL`).
    candidate_ids: the ids to draw from, or an int V meaning range(V).
    seed: the draw is a deterministic function of the seed.
  """
  tokens_BxL = np.asarray(tokens_BxL)
  mask_BxL = np.asarray(mask_BxL, dtype=bool)
  if tokens_BxL.shape != mask_BxL.shape:
    raise ValueError(f"tokens {tokens_BxL.shape} and mask {mask_BxL.shape} differ in shape")
  candidates = np.arange(candidate_ids) if np.ndim(candidate_ids) == 0 else np.asarray(candidate_ids)
  if candidates.size == 0:
    raise ValueError("candidate_ids is empty")
  rng = np.random.default_rng(seed)
  draws = candidates[rng.integers(0, candidates.size, size=tokens_BxL.shape)]
  return np.where(mask_BxL, draws, tokens_BxL).astype(tokens_BxL.dtype)


def ascii_token_ids(tokenizer: RoundTripTokenizer, vocab_size: int) -> np.ndarray:
  """Ids whose decoded text is non-blank ASCII (the reference's candidate pool)."""
  keep = []
  for i in range(vocab_size):
    text = tokenizer.decode([i])
    if text and text.isascii() and text.strip():
      keep.append(i)
  return np.asarray(keep, dtype=np.int32)


def corrupt_subjects(
    tokenizer: RoundTripTokenizer,
    batch: FactBatch,
    candidate_ids: np.ndarray,
    seed: int = 0,
    max_tries: int = 100,
) -> np.ndarray:
  """Corrupted `tokens_BxL`: subject tokens replaced, length-preserving round trip.

  Each row is redrawn until decoding its real tokens (after BOS) and re-encoding the
  text gives the same number of tokens. Row r's draws use `seed` and r only, so
  a row's corruption does not depend on the rest of the batch.

  Raises:
    ValueError: a row has no subject tokens, or no draw in `max_tries` round-trips.
  """
  tokens = np.asarray(batch.tokens_BxL)
  positions = np.asarray(batch.positions_BxL)
  subject = np.asarray(batch.subject_mask_BxL, dtype=bool)
  num_bos = len(tokenizer.encode("", add_bos=True))
  out = tokens.copy()
  for row in range(tokens.shape[0]):
    if not subject[row].any():
      raise ValueError(f"row {row} has no subject tokens to corrupt")
    real = positions[row] >= 0
    for attempt in range(max_tries):
      candidate = random_token_replacement(
          tokens[row : row + 1], subject[row : row + 1], candidate_ids,
          seed=np.random.SeedSequence([seed, row, attempt]).generate_state(1)[0],
      )[0]
      ids = candidate[real]
      text = tokenizer.decode(ids[num_bos:].tolist())
      if len(tokenizer.encode(text, add_bos=True)) == len(ids):
        out[row] = candidate
        break
    else:
      raise ValueError(
          f"row {row}: no random subject replacement kept the tokenized length in"
          f" {max_tries} tries; pass a cleaner candidate_ids pool or raise max_tries"
      )
  return out


def corrupted_batch(batch: FactBatch, corrupt_tokens_BxL: np.ndarray) -> FactBatch:
  """`batch` with its tokens replaced (answers, positions and masks unchanged)."""
  corrupt_tokens_BxL = np.asarray(corrupt_tokens_BxL)
  if corrupt_tokens_BxL.shape != np.shape(batch.tokens_BxL):
    raise ValueError(
        f"corrupted tokens have shape {corrupt_tokens_BxL.shape}, the batch"
        f" {np.shape(batch.tokens_BxL)}"
    )
  return FactBatch(
      tokens_BxL=corrupt_tokens_BxL,
      positions_BxL=batch.positions_BxL,
      answer_ids_B=batch.answer_ids_B,
      wrong_ids_BxK=batch.wrong_ids_BxK,
      subject_mask_BxL=batch.subject_mask_BxL,
  )
