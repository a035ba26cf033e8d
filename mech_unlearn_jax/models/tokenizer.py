"""Tokenizers that reproduce the Hugging Face Gemma 3 token ids exactly.

Three sources give the same `Tokenizer`:

- `Tokenizer.from_gguf(path)`: rebuilds a SentencePiece model from a GGUF file's
  `tokenizer.ggml.*` metadata (the offline default: the model file is all we have).
- `Tokenizer.from_sentencepiece_file(path)`: a SentencePiece `.model` file.
- `Tokenizer.from_tokenizer_json(path)`: a Hugging Face `tokenizer.json` (through the
  `tokenizers` library).

How the GGUF vocabulary becomes a SentencePiece model. The reference is the tokenizer
that `transformers` builds from the same GGUF (a BPE model whose merges are ranked by
vocabulary position, with the control and user-defined tokens as added tokens); every
rule below is checked against its ids by `tests/test_tokenizer.py`:

- BPE with byte fallback, identity normalizer, spaces escaped to "\u2581", no dummy
  prefix and no whitespace folding (`add_space_prefix` is false for Gemma).
- Scores are copied as they are. SentencePiece's BPE merges the adjacent pair whose
  concatenation has the highest score, leftmost first; Gemma's normal-piece scores
  fall strictly with the id, which is the reference's merge ranking.
- Runs of 2-31 spaces are user-defined pieces, which llama.cpp spells with real spaces.
  The reference does not treat them as added tokens: they are ordinary BPE pieces
  ranked by position, i.e. merged before every other piece, shortest run first. So
  they become NORMAL pieces spelled with "\u2581" and scored above every normal
  piece in file order. This only shows on runs longer than 31 spaces: 32 spaces are
  two 16-space tokens, not 31 + 1 as whole-piece matching would give.
- The other user-defined pieces (runs of newlines and tabs, HTML tags,
  `<start_of_image>`, ...) keep their type: SentencePiece matches them whole, longest
  first, and never merges them with their neighbours, as the reference's added tokens.
- Control tokens (`<bos>`, `<eos>`, `<start_of_turn>`, `<unused0>`, ...) and `<unk>`
  are special tokens of the reference wherever they appear in the text, but
  SentencePiece never matches them inside text. `encode` therefore cuts the text at
  their spellings (longest first) and encodes the pieces in between; `decode` drops
  them (or spells them out with `skip_special_tokens=False`) as the reference does.
- GGUF marks `<unk>` as a control token; SentencePiece needs exactly one piece of type
  UNKNOWN, so the piece at `tokenizer.ggml.unknown_token_id` gets that type.

A literal "\u2581" in the input is the same as a space to both tokenizers, so it
decodes as a space; everything else round-trips through `encode` and `decode`.

The GGUF header is parsed by a small reader here instead of `gguf.GGUFReader`: the
latter builds a numpy view per array element, which takes 10-20 s for a 262k-token
vocabulary, while this reader needs a fraction of a second and never touches the
tensor data. The rebuilt model is cached per file (path, size and modification time),
so later `from_gguf` calls in a process are cheaper still.
"""

from __future__ import annotations

import functools
import json
import mmap
import os
import pathlib
import re
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

_GGUF_MAGIC = b"GGUF"
_SPACE_ESCAPE = "\u2581"

# GGUF metadata value types (the numbering of the GGUF specification / `gguf.GGUFValueType`).
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL = range(8)
_STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = range(8, 13)
_SCALAR_FORMATS = {
    _UINT8: "B", _INT8: "b", _UINT16: "H", _INT16: "h", _UINT32: "I", _INT32: "i",
    _FLOAT32: "f", _BOOL: "?", _UINT64: "Q", _INT64: "q", _FLOAT64: "d",
}

# llama.cpp token types; they use SentencePiece's numbering.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_REQUIRED_TOKENIZER_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")


class TokenizerError(ValueError):
  """A tokenizer file is unreadable or does not describe a supported tokenizer."""


# ----------------------------------------------------------------------------------
# GGUF metadata.


class _GGUFHeaderParser:
  """Reads the key/value section of a GGUF file from a memory map."""

  def __init__(self, buffer, path: pathlib.Path, endian: str):
    self._buffer = buffer
    self._path = path
    self._endian = endian
    self.offset = 0

  def scalar(self, value_type: int):
    fmt = self._endian + _SCALAR_FORMATS[value_type]
    (value,) = struct.unpack_from(fmt, self._buffer, self.offset)
    self.offset += struct.calcsize(fmt)
    return value

  def raw(self, size: int) -> bytes:
    end = self.offset + size
    if end > len(self._buffer):
      raise struct.error("read past the end of the file")
    data = self._buffer[self.offset:end]
    self.offset = end
    return data

  def string(self) -> str:
    return self.raw(self.scalar(_UINT64)).decode("utf-8")

  def value(self, value_type: int) -> Any:
    if value_type == _STRING:
      return self.string()
    if value_type == _ARRAY:
      element_type = self.scalar(_UINT32)
      count = self.scalar(_UINT64)
      if element_type == _STRING:
        return [self.string() for _ in range(count)]
      if element_type in _SCALAR_FORMATS:
        # Numeric arrays (scores, token types) are copied out in one go.
        dtype = np.dtype(self._endian + _SCALAR_FORMATS[element_type])
        return np.frombuffer(self.raw(count * dtype.itemsize), dtype=dtype).astype(dtype.newbyteorder("="))
      return [self.value(element_type) for _ in range(count)]
    if value_type in _SCALAR_FORMATS:
      return self.scalar(value_type)
    raise TokenizerError(f"{self._path}: unknown GGUF value type {value_type} at byte {self.offset}")


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """The key/value metadata of a GGUF file (no tensor data is read).

  Strings come back as `str`, numeric arrays as numpy arrays, string arrays as lists.

  Raises:
    FileNotFoundError: `path` does not exist.
    TokenizerError: the file is not a GGUF file or its header is truncated/corrupt.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"GGUF file not found: {path}")
  with open(path, "rb") as f:
    magic = f.read(4)
    if magic != _GGUF_MAGIC:
      raise TokenizerError(
          f"{path}: not a GGUF file (expected the magic bytes {_GGUF_MAGIC!r} at the start, found {magic!r})"
      )
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
      try:
        # A big-endian file's version reads as a huge number in little-endian order.
        (version,) = struct.unpack_from("<I", buffer, 4)
        endian = "<" if version < 65536 else ">"
        parser = _GGUFHeaderParser(buffer, path, endian)
        parser.offset = 4
        version = parser.scalar(_UINT32)
        if version not in (2, 3):
          raise TokenizerError(f"{path}: unsupported GGUF version {version} (expected 2 or 3)")
        parser.scalar(_UINT64)  # tensor count: not needed here
        kv_count = parser.scalar(_UINT64)
        metadata = {}
        for _ in range(kv_count):
          key = parser.string()
          metadata[key] = parser.value(parser.scalar(_UINT32))
      except (struct.error, UnicodeDecodeError, MemoryError, ValueError) as e:
        raise TokenizerError(f"{path}: truncated or corrupt GGUF metadata ({type(e).__name__}: {e})") from e
  return metadata


# ----------------------------------------------------------------------------------
# SentencePiece model from GGUF metadata.


def sentencepiece_proto_from_gguf_metadata(metadata: dict[str, Any], source: str = "GGUF metadata"):
  """Builds a SentencePiece `ModelProto` from llama.cpp's `tokenizer.ggml.*` metadata.

  Args:
    metadata: as returned by `read_gguf_metadata`.
    source: names the file in error messages.

  Returns:
    A `sentencepiece_model_pb2.ModelProto` (see the module docstring for the rules).
  """
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top

  missing = [key for key in _REQUIRED_TOKENIZER_KEYS if key not in metadata]
  if missing:
    raise TokenizerError(
        f"{source}: no tokenizer metadata (missing {', '.join(missing)}; expected a GGUF written"
        " with its SentencePiece vocabulary, e.g. by llama.cpp's convert_hf_to_gguf.py)"
    )
  model_type = metadata.get("tokenizer.ggml.model", "llama")
  if model_type != "llama":
    raise TokenizerError(
        f"{source}: tokenizer.ggml.model is {model_type!r}; only SentencePiece vocabularies"
        " ('llama') can be rebuilt from GGUF (use Tokenizer.from_tokenizer_json for others)"
    )
  tokens = list(metadata["tokenizer.ggml.tokens"])
  scores = np.asarray(metadata["tokenizer.ggml.scores"], dtype=np.float32)
  token_types = np.asarray(metadata["tokenizer.ggml.token_type"], dtype=np.int64)
  if not len(tokens) == len(scores) == len(token_types):
    raise TokenizerError(
        f"{source}: tokenizer arrays disagree in length (tokens {len(tokens)}, scores"
        f" {len(scores)}, token_type {len(token_types)})"
    )

  def special_id(name: str, default: int | None) -> int | None:
    value = metadata.get(f"tokenizer.ggml.{name}", default)
    if value is not None and not 0 <= int(value) < len(tokens):
      raise TokenizerError(f"{source}: tokenizer.ggml.{name}={value} is outside the vocabulary of {len(tokens)}")
    return None if value is None else int(value)

  unk_id = special_id("unknown_token_id", None)
  if unk_id is None:
    unknown = np.flatnonzero(token_types == _UNKNOWN)
    if len(unknown) != 1:
      raise TokenizerError(f"{source}: no tokenizer.ggml.unknown_token_id and {len(unknown)} tokens of type UNKNOWN")
    unk_id = int(unknown[0])
  bos_id = special_id("bos_token_id", None)
  eos_id = special_id("eos_token_id", None)
  pad_id = special_id("padding_token_id", None)

  # Whitespace-run pieces become ordinary BPE pieces that merge before any other, in
  # file order (see the module docstring); normal scores are all below `top_score`.
  space_runs = [i for i, t in enumerate(tokens) if t and not t.strip(" ") and token_types[i] == _USER_DEFINED]
  normal_scores = scores[token_types == _NORMAL]
  top_score = float(normal_scores.max()) if len(normal_scores) else 0.0
  space_run_scores = {index: top_score + len(space_runs) - rank for rank, index in enumerate(space_runs)}

  existing = set(tokens)
  proto = sentencepiece_model_pb2.ModelProto()
  valid_types = {_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE, _UNKNOWN}
  for index, (token, score, token_type) in enumerate(zip(tokens, scores.tolist(), token_types.tolist())):
    if token_type not in valid_types:
      raise TokenizerError(f"{source}: token {index} ({token!r}) has unknown token_type {token_type}")
    if index == unk_id:
      token_type = _UNKNOWN
    elif token_type == _UNKNOWN:
      token_type = _CONTROL  # SentencePiece allows only one UNKNOWN piece
    if index in space_run_scores:
      token_type, score = _NORMAL, space_run_scores[index]
    if " " in token:
      # The normalizer escapes every input space, so a piece must spell it "\u2581".
      escaped = token.replace(" ", _SPACE_ESCAPE)
      if escaped in existing:
        raise TokenizerError(f"{source}: token {index} {token!r} duplicates token {escaped!r} once spaces are escaped")
      token = escaped
    piece = proto.pieces.add()
    piece.piece = token
    piece.score = score
    piece.type = token_type

  trainer = proto.trainer_spec
  trainer.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
  trainer.vocab_size = len(tokens)
  trainer.byte_fallback = bool(np.any(token_types == _BYTE))
  trainer.unk_id = unk_id
  trainer.unk_piece = proto.pieces[unk_id].piece
  # SentencePieceProcessor.bos_id() etc. look their piece up by name, so the names must
  # be this vocabulary's (the defaults "<s>", "</s>" are ordinary pieces in Gemma).
  for name, token_id in (("bos", bos_id), ("eos", eos_id), ("pad", pad_id)):
    setattr(trainer, f"{name}_id", -1 if token_id is None else token_id)
    if token_id is not None:
      setattr(trainer, f"{name}_piece", proto.pieces[token_id].piece)

  normalizer = proto.normalizer_spec
  normalizer.name = "identity"
  normalizer.add_dummy_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", False))
  normalizer.remove_extra_whitespaces = False
  normalizer.escape_whitespaces = True
  return proto


@functools.lru_cache(maxsize=4)
def _gguf_sentencepiece_bytes(path: str, mtime_ns: int, size: int) -> bytes:
  """The serialized SentencePiece model of a GGUF, cached per file version."""
  del mtime_ns, size  # only part of the cache key
  metadata = read_gguf_metadata(path)
  return sentencepiece_proto_from_gguf_metadata(metadata, source=path).SerializeToString()


# ----------------------------------------------------------------------------------
# Backends: SentencePiece and Hugging Face `tokenizers`.


class _SentencePieceBackend:
  """Encodes with SentencePiece, treating special-token spellings in text as specials.

  The special tokens are the control pieces and the unknown piece, as in the reference.
  """

  def __init__(self, processor):
    self.processor = processor
    self.special_ids = {}
    for i in range(processor.get_piece_size()):
      if processor.is_control(i) or processor.is_unknown(i):
        self.special_ids[processor.id_to_piece(i)] = i
    self._special_id_set = frozenset(self.special_ids.values())
    self._special_pattern = _literal_alternation(self.special_ids)

  @property
  def vocab_size(self) -> int:
    return self.processor.get_piece_size()

  def encode(self, text: str) -> list[int]:
    if self._special_pattern is None:
      return self.processor.encode(text)
    ids: list[int] = []
    start = 0
    for match in self._special_pattern.finditer(text):
      if match.start() > start:
        ids.extend(self.processor.encode(text[start:match.start()]))
      ids.append(self.special_ids[match.group()])
      start = match.end()
    if start < len(text):
      ids.extend(self.processor.encode(text[start:]))
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
    # SentencePiece drops control pieces and writes " \u2047 " for the unknown piece;
    # the reference drops both, or spells both out, so decode the runs in between.
    parts: list[str] = []
    run: list[int] = []
    for i in ids:
      if i in self._special_id_set:
        parts.append(self.processor.decode(run))
        run = []
        if not skip_special_tokens:
          parts.append(self.processor.id_to_piece(i))
      else:
        run.append(i)
    parts.append(self.processor.decode(run))
    return "".join(parts)

  def id_to_piece(self, token_id: int) -> str:
    return self.processor.id_to_piece(token_id)

  def piece_to_id(self, piece: str) -> int | None:
    token_id = self.processor.piece_to_id(piece)
    # SentencePiece answers unk_id for unknown pieces; tell them apart.
    if token_id == self.processor.unk_id() and piece != self.processor.id_to_piece(token_id):
      return None
    return token_id


def _literal_alternation(strings: Iterable[str]) -> re.Pattern | None:
  """A regex matching any of `strings`, longest first (leftmost-longest matching)."""
  ordered = sorted(strings, key=len, reverse=True)
  if not ordered:
    return None
  return re.compile("|".join(re.escape(s) for s in ordered))


class _HuggingFaceBackend:
  """Encodes with a `tokenizers.Tokenizer`; specials come from its added tokens."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    # BOS is added by `Tokenizer.encode`, so the file's post-processor is bypassed.
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
    return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def id_to_piece(self, token_id: int) -> str:
    piece = self.tokenizer.id_to_token(token_id)
    if piece is None:
      raise IndexError(f"token id {token_id} is outside the vocabulary of {self.vocab_size}")
    return piece

  def piece_to_id(self, piece: str) -> int | None:
    return self.tokenizer.token_to_id(piece)


# ----------------------------------------------------------------------------------
# The public tokenizer.


class Tokenizer:
  """Text to token ids and back, with the reference (Hugging Face) ids.

  Build one with `from_gguf`, `from_sentencepiece_file` or `from_tokenizer_json`.
  """

  def __init__(
      self,
      backend,
      *,
      bos_id: int | None,
      eos_id: int | None,
      pad_id: int | None,
      source: str = "",
  ):
    self._backend = backend
    self._bos_id = bos_id
    self._eos_id = eos_id
    self._pad_id = pad_id
    self.source = source

  # Construction. ------------------------------------------------------------------

  @classmethod
  def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
    """Rebuilds the SentencePiece tokenizer stored in a GGUF file's metadata.

    Raises:
      FileNotFoundError: `path` does not exist.
      TokenizerError (a ValueError): not a GGUF file, or no SentencePiece vocabulary in it.
    """
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"GGUF file not found: {path}")
    stat = path.stat()
    model_bytes = _gguf_sentencepiece_bytes(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    return cls._from_sentencepiece_bytes(model_bytes, source=str(path))

  @classmethod
  def from_sentencepiece_file(cls, path: str | os.PathLike) -> Tokenizer:
    """Loads a SentencePiece `.model` file (e.g. a Hugging Face `tokenizer.model`)."""
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"SentencePiece model file not found: {path}")
    return cls._from_sentencepiece_bytes(path.read_bytes(), source=str(path))

  @classmethod
  def _from_sentencepiece_bytes(cls, model_bytes: bytes, *, source: str) -> Tokenizer:
    import sentencepiece  # pylint: disable=g-import-not-at-top

    try:
      processor = sentencepiece.SentencePieceProcessor(model_proto=model_bytes)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError on bad protos.
      raise TokenizerError(f"{source}: not a valid SentencePiece model ({type(e).__name__}: {e})") from e

    def optional(token_id: int) -> int | None:
      return token_id if token_id >= 0 else None

    return cls(
        _SentencePieceBackend(processor),
        bos_id=optional(processor.bos_id()),
        eos_id=optional(processor.eos_id()),
        pad_id=optional(processor.pad_id()),
        source=source,
    )

  @classmethod
  def from_tokenizer_json(
      cls,
      path: str | os.PathLike,
      *,
      bos_token: str | None = None,
      eos_token: str | None = None,
      pad_token: str | None = None,
  ) -> Tokenizer:
    """Loads a Hugging Face `tokenizer.json`.

    Special tokens come from the arguments, else from a `tokenizer_config.json` beside
    the file, else from common spellings (`<bos>`, `<s>`, ...).
    """
    import tokenizers  # pylint: disable=g-import-not-at-top

    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"tokenizer.json not found: {path}")
    try:
      hf_tokenizer = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a generic Exception on bad JSON.
      raise TokenizerError(f"{path}: not a valid Hugging Face tokenizer.json ({type(e).__name__}: {e})") from e

    config: dict[str, Any] = {}
    config_path = path.with_name("tokenizer_config.json")
    if config_path.is_file():
      try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
      except json.JSONDecodeError as e:
        raise TokenizerError(f"{config_path}: not valid JSON ({e})") from e

    def token_id(explicit: str | None, key: str, fallbacks: tuple[str, ...]) -> int | None:
      spelling = explicit if explicit is not None else config.get(key)
      if isinstance(spelling, dict):  # serialized AddedToken
        spelling = spelling.get("content")
      if spelling is not None:
        found = hf_tokenizer.token_to_id(spelling)
        if found is None:
          raise TokenizerError(f"{path}: {key} {spelling!r} is not in the vocabulary")
        return found
      for candidate in fallbacks:
        found = hf_tokenizer.token_to_id(candidate)
        if found is not None:
          return found
      return None

    return cls(
        _HuggingFaceBackend(hf_tokenizer),
        bos_id=token_id(bos_token, "bos_token", ("<bos>", "<s>")),
        eos_id=token_id(eos_token, "eos_token", ("<eos>", "</s>")),
        pad_id=token_id(pad_token, "pad_token", ("<pad>",)),
        source=str(path),
    )

  # Vocabulary. ------------------------------------------------------------------

  @property
  def bos_id(self) -> int | None:
    return self._bos_id

  @property
  def eos_id(self) -> int | None:
    return self._eos_id

  @property
  def pad_id(self) -> int | None:
    return self._pad_id

  @property
  def vocab_size(self) -> int:
    return self._backend.vocab_size

  def id_to_piece(self, token_id: int) -> str:
    """The vocabulary entry of `token_id` ("\u2581" stands for a space)."""
    token_id = int(token_id)
    if not 0 <= token_id < self.vocab_size:
      raise IndexError(f"token id {token_id} is outside the vocabulary of {self.vocab_size}")
    return self._backend.id_to_piece(token_id)

  def piece_to_id(self, piece: str) -> int:
    """The id of a vocabulary entry; raises KeyError when there is none."""
    token_id = self._backend.piece_to_id(piece)
    if token_id is None:
      raise KeyError(f"{piece!r} is not a piece of the vocabulary ({self.source})")
    return token_id

  # Encoding and decoding. -------------------------------------------------------

  def encode(self, text: str, add_bos: bool = True) -> list[int]:
    """Token ids of `text`, preceded by BOS when `add_bos` (and the tokenizer has one).

    Gemma wants BOS first (the GGUF's `add_bos_token` is true), hence the default.
    """
    if not isinstance(text, str):
      raise TypeError(f"encode expects a str, got {type(text).__name__}")
    ids = self._backend.encode(text)
    if add_bos and self._bos_id is not None:
      ids = [self._bos_id] + ids
    return ids

  def encode_batch(self, texts: Iterable[str], add_bos: bool = True) -> list[list[int]]:
    """`encode` for each text (ragged: pad with `pad_id` where a batch needs it)."""
    if isinstance(texts, str):
      raise TypeError("encode_batch expects a sequence of strings, got a single str")
    return [self.encode(text, add_bos=add_bos) for text in texts]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """Text of `ids`; special tokens (BOS, EOS, padding, ...) are dropped unless asked for."""
    # Accepts lists, tuples, generators and (numpy or jax) arrays of any shape.
    ids = np.asarray(ids if hasattr(ids, "__array__") else list(ids), dtype=np.int64).reshape(-1).tolist()
    for i in ids:
      if not 0 <= i < self.vocab_size:
        raise IndexError(f"token id {i} is outside the vocabulary of {self.vocab_size}")
    return self._backend.decode(ids, skip_special_tokens)

  def single_token_id(self, text: str) -> int:
    """The id of `text` when it is exactly one token (no BOS), e.g. " basketball".

    Raises:
      ValueError: `text` encodes to zero or several tokens; the message names them.
    """
    ids = self.encode(text, add_bos=False)
    if len(ids) != 1:
      pieces = [self._backend.id_to_piece(i) for i in ids]
      raise ValueError(
          f"{text!r} is not a single token: it encodes to {len(ids)} tokens {ids} {pieces}"
      )
    return ids[0]

  def __repr__(self) -> str:
    return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id})"
