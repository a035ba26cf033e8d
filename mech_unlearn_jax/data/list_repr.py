"""Parse numpy/Python-style list reprs of strings without evaluating them.

Some CounterFact tables store list columns as the text numpy prints for an object
array, e.g. ``['a' "b's"\\n 'c']``: string literals separated by whitespace (numpy)
or commas (Python), spread over several lines, with Python escape sequences inside
the literals. `parse_list_repr` reads exactly that grammar; it never calls `eval`, so
a malformed or hostile cell produces a `ValueError` that says where the text went wrong.
"""

from __future__ import annotations

import unicodedata

_SIMPLE_ESCAPES = {
    "\\": "\\",
    "'": "'",
    '"': '"',
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
}
_HEX_ESCAPE_WIDTHS = {"x": 2, "u": 4, "U": 8}
# String prefixes a repr may carry; b/r variants never occur in these tables and are
# refused rather than half-supported.
_ALLOWED_PREFIXES = ("u", "U")


def _context(text: str, position: int) -> str:
  start = max(0, position - 20)
  return repr(text[start : position + 20])


def _error(text: str, position: int, message: str) -> ValueError:
  return ValueError(f"cannot parse list repr at character {position} ({message}) near {_context(text, position)}")


def _read_string_literal(text: str, position: int) -> tuple[str, int]:
  """Decodes the literal whose opening quote is at `position`; returns (value, next position)."""
  quote = text[position]
  position += 1
  pieces: list[str] = []
  while True:
    if position >= len(text):
      raise _error(text, position, "unterminated string literal")
    char = text[position]
    if char == quote:
      return "".join(pieces), position + 1
    if char == "\n":
      # A repr never puts a raw newline inside a literal: the quote was never closed.
      raise _error(text, position, "newline inside a string literal")
    if char != "\\":
      pieces.append(char)
      position += 1
      continue
    if position + 1 >= len(text):
      raise _error(text, position, "dangling backslash")
    escape = text[position + 1]
    position += 2
    if escape in _SIMPLE_ESCAPES:
      pieces.append(_SIMPLE_ESCAPES[escape])
    elif escape == "\n":
      pass  # backslash-newline is a line continuation inside a literal
    elif escape in _HEX_ESCAPE_WIDTHS:
      width = _HEX_ESCAPE_WIDTHS[escape]
      digits = text[position : position + width]
      if len(digits) != width or any(d not in "0123456789abcdefABCDEF" for d in digits):
        raise _error(text, position, f"bad \\{escape} escape")
      code_point = int(digits, 16)
      if code_point > 0x10FFFF:
        raise _error(text, position, f"\\{escape} escape out of range")
      pieces.append(chr(code_point))
      position += width
    elif escape in "01234567":
      digits = escape
      while len(digits) < 3 and position < len(text) and text[position] in "01234567":
        digits += text[position]
        position += 1
      pieces.append(chr(int(digits, 8)))
    elif escape == "N" and position < len(text) and text[position] == "{":
      close = text.find("}", position)
      if close < 0:
        raise _error(text, position, "unterminated \\N{...} escape")
      name = text[position + 1 : close]
      try:
        pieces.append(unicodedata.lookup(name))
      except KeyError:
        raise _error(text, position, f"unknown character name {name!r}") from None
      position = close + 1
    else:
      # Python keeps unrecognised escapes verbatim (backslash included).
      pieces.append("\\" + escape)


def parse_list_repr(text: str) -> list[str]:
  """Parses ``['a' 'b']`` / ``["a's", 'b']`` (any whitespace, newlines) into strings.

  Accepts whitespace- or comma-separated string literals in single or double quotes
  with Python escape sequences, and an empty list ``[]``. Raises ValueError with the
  character position for anything else, including numpy's ``...`` summarization
  (which would silently drop elements).
  """
  if not isinstance(text, str):
    raise TypeError(f"expected a str, got {type(text).__name__}")
  position = 0
  length = len(text)

  def skip_blanks(pos: int) -> int:
    while pos < length and text[pos].isspace():
      pos += 1
    return pos

  position = skip_blanks(position)
  if position >= length or text[position] != "[":
    raise _error(text, position, "expected '['")
  position += 1
  items: list[str] = []
  expecting_item = True  # False right after an item, until a separator is seen
  while True:
    position = skip_blanks(position)
    if position >= length:
      raise _error(text, position, "missing closing ']'")
    char = text[position]
    if char == "]":
      position += 1
      break
    if char == ",":
      if not items or expecting_item:
        raise _error(text, position, "empty element before ','")
      expecting_item = True
      position += 1
      continue
    if text.startswith("...", position):
      raise _error(text, position, "summarized array ('...'): elements are missing")
    if char in _ALLOWED_PREFIXES and position + 1 < length and text[position + 1] in "'\"":
      position += 1
      char = text[position]
    if char not in "'\"":
      raise _error(text, position, f"unexpected character {char!r}")
    value, position = _read_string_literal(text, position)
    items.append(value)
    expecting_item = False
  if skip_blanks(position) != length:
    raise _error(text, position, "text after the closing ']'")
  return items
