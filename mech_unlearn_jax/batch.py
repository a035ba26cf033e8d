"""`FactBatch`: tokenized fact prompts with their answers and subject positions.

The one batch type that scoring, localization and editing share. Arrays are plain
`jax.Array`/`np.ndarray` with positional axes (shape in the field name); batches are
left-padded so the answer is always predicted at column -1 (see `models/forward.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import jax
import numpy as np

from mech_unlearn_jax.models.forward import left_pad


class TokenizerLike(Protocol):

  def encode(self, text: str, add_bos: bool = True) -> list[int]:
    ...


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FactBatch:
  """A left-padded batch of prompts whose next token is a one-token answer.

  Attributes:
    tokens_BxL: token ids (BOS first, padding on the left).
    positions_BxL: 0.. on real tokens, -1 on padding.
    answer_ids_B: the token the metric rewards (true answer, or an edit target).
    wrong_ids_BxK: other candidate answers (for logit differences and normalized
      probabilities); -1 where a row has fewer than K.
    subject_mask_BxL: True on the tokens of the prompt's subject.
    prefix_BxP: None, or the P tokens every row starts with (the same in every row;
      one copy per row so the field splits along the batch axis like the others).
      Then tokens/positions/subject mask hold only the rest of each row, its positions
      continuing from P (`share_prefix`; subject tokens inside the prefix are not
      marked there).
  """

  tokens_BxL: np.ndarray
  positions_BxL: np.ndarray
  answer_ids_B: np.ndarray
  wrong_ids_BxK: np.ndarray
  subject_mask_BxL: np.ndarray
  prefix_BxP: np.ndarray | None = None

  @property
  def size(self) -> int:
    return int(self.tokens_BxL.shape[0])

  def slice(self, start: int, stop: int) -> "FactBatch":
    return jax.tree.map(lambda x: x[start:stop], self)

  @property
  def candidate_ids_BxC(self) -> np.ndarray:
    """Answer first, then the wrong candidates (-1 padded)."""
    return np.concatenate([np.asarray(self.answer_ids_B)[:, None], np.asarray(self.wrong_ids_BxK)], 1)


def subject_token_span(
    tokenizer: TokenizerLike, prompt: str, subject: str
) -> tuple[int, int, list[int]]:
  """Token ids of `prompt` (with BOS) and the [start, stop) token span of `subject`.

  The subject's first occurrence is located in the text; a space right before it is
  counted as part of the subject because Gemma/Llama tokens carry their leading space.
  Raises ValueError if the subject is absent; a boundary inside a token widens the
  span to the tokens that overlap the subject.
  """
  ids = tokenizer.encode(prompt, add_bos=True)
  subject = subject.strip()
  char_start = prompt.find(subject)
  if not subject or char_start < 0:
    raise ValueError(f"subject {subject!r} not found in prompt {prompt!r}")
  char_stop = char_start + len(subject)
  if char_start > 0 and prompt[char_start - 1] == " ":
    char_start -= 1
  before = tokenizer.encode(prompt[:char_start], add_bos=True)
  through = tokenizer.encode(prompt[:char_stop], add_bos=True)
  # Usually both are prefixes of `ids`. When a boundary falls inside a token (e.g.
  # "B.V." + "'s"), the span grows to include every token that overlaps the subject.
  start = _common_prefix(before, ids)
  stop = len(through) if ids[: len(through)] == through else _common_prefix(through, ids) + 1
  if stop <= start:
    raise ValueError(f"subject {subject!r} covers no token of {prompt!r}")
  return start, min(stop, len(ids)), ids


def _common_prefix(a: list[int], b: list[int]) -> int:
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n


def make_fact_batch(
    tokenizer: TokenizerLike,
    prompts: Sequence[str],
    subjects: Sequence[str | None],
    answer_ids: Sequence[int],
    wrong_ids: Sequence[Sequence[int]] = (),
    pad_id: int = 0,
    multiple: int = 8,
    length: int | None = None,
) -> FactBatch:
  """Tokenizes prompts, finds subject tokens and packs a left-padded `FactBatch`.

  A subject of None (e.g. a CounterFact neighborhood prompt about someone else) gives
  an empty subject mask for that row.
  """
  if not (len(prompts) == len(subjects) == len(answer_ids)):
    raise ValueError("prompts, subjects and answer_ids must have the same length")
  spans, sequences = [], []
  for prompt, subject in zip(prompts, subjects):
    if subject is None:
      ids = tokenizer.encode(prompt, add_bos=True)
      start = stop = 0
    else:
      start, stop, ids = subject_token_span(tokenizer, prompt, subject)
    spans.append((start, stop, len(ids)))
    sequences.append(ids)
  tokens, positions = left_pad(sequences, pad_id=pad_id, multiple=multiple, length=length)
  width = tokens.shape[1]
  subject_mask = np.zeros_like(tokens, dtype=bool)
  for row, (start, stop, n) in enumerate(spans):
    offset = width - n
    subject_mask[row, offset + start : offset + stop] = True
  k = max((len(w) for w in wrong_ids), default=0)
  wrong = np.full((len(prompts), max(k, 1)), -1, dtype=np.int32)
  for row, ws in enumerate(wrong_ids):
    wrong[row, : len(ws)] = ws
  return FactBatch(
      tokens_BxL=tokens,
      positions_BxL=positions,
      answer_ids_B=np.asarray(answer_ids, dtype=np.int32),
      wrong_ids_BxK=wrong,
      subject_mask_BxL=subject_mask,
  )


# Prefixes shorter than this are not worth a separate compiled function.
MIN_SHARED_PREFIX = 4


def shared_prefix_length(tokens_BxL: np.ndarray, positions_BxL: np.ndarray) -> int:
  """Leading real tokens all rows have in common, leaving every row >= 1 of its own."""
  tokens_BxL = np.asarray(tokens_BxL)
  lengths = (np.asarray(positions_BxL) >= 0).sum(1)
  limit = int(lengths.min()) - 1
  if limit <= 0:
    return 0
  starts = tokens_BxL.shape[1] - lengths
  aligned = np.stack([tokens_BxL[i, s : s + limit] for i, s in enumerate(starts)])
  differs = np.nonzero((aligned != aligned[:1]).any(0))[0]
  return int(differs[0]) if differs.size else limit


def split_prefix(
    tokens_BxL: np.ndarray, positions_BxL: np.ndarray, prefix_len: int, multiple: int = 8
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(prefix_P, suffix tokens_BxS, suffix positions_BxS): the rows without their common
  first `prefix_len` tokens, left-padded to a multiple of `multiple` columns, with
  positions continuing from `prefix_len` (-1 on padding)."""
  tokens_BxL = np.asarray(tokens_BxL)
  lengths = (np.asarray(positions_BxL) >= 0).sum(1)
  starts = tokens_BxL.shape[1] - lengths
  prefix = np.asarray(tokens_BxL[0, starts[0] : starts[0] + prefix_len], np.int32)
  suffixes = [tokens_BxL[i, s + prefix_len :] for i, s in enumerate(starts)]
  tokens, positions = left_pad(suffixes, multiple=multiple)
  return prefix, tokens, np.where(positions >= 0, positions + prefix_len, -1).astype(np.int32)


def share_prefix(batch: FactBatch, multiple: int = 8) -> FactBatch:
  """`batch` with the tokens all its rows start with moved to `prefix_BxP` (see
  `FactBatch`); unchanged when they share fewer than `MIN_SHARED_PREFIX` tokens or
  already have a prefix."""
  if batch.prefix_BxP is not None:
    return batch
  tokens, positions = np.asarray(batch.tokens_BxL), np.asarray(batch.positions_BxL)
  prefix_len = shared_prefix_length(tokens, positions)
  if prefix_len < MIN_SHARED_PREFIX:
    return batch
  prefix, suffix, suffix_positions = split_prefix(tokens, positions, prefix_len, multiple)
  lengths = (positions >= 0).sum(1)
  subject = np.zeros(suffix.shape, bool)
  for row, n in enumerate(lengths):
    # The row's own tokens, now right-aligned in the narrower suffix array.
    own = n - prefix_len
    subject[row, suffix.shape[1] - own :] = np.asarray(batch.subject_mask_BxL)[row, tokens.shape[1] - own :]
  return dataclasses.replace(
      batch, tokens_BxL=suffix, positions_BxL=suffix_positions, subject_mask_BxL=subject,
      prefix_BxP=np.broadcast_to(prefix, (batch.size, prefix_len)).copy(),
  )
