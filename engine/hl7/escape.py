"""HL7 v2 escape sequences: the one decoder and encoder of the engine (HL7 v2.5 §2.7).

Policy: keep raw field text as received; unescape only at the point of use; escape on output.
Text is the representation: callers holding bytes decode the message first (the reading layer,
:mod:`engine.hl7.message`, does it once) and pass the message codec as ``charset``.

``escape`` maps the delimiters to ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` (``\\P\\`` for the v2.7 truncation
character when MSH-2 has 5 characters) and CR/LF to ``\\X0D\\``/``\\X0A\\`` so that data can never
add a field, component or segment.

``unescape`` decodes, in one left-to-right pass (so back-to-back escapes work); an escape
sequence is the escape character, a code, optional data and the escape character again, and
sequences never nest (HL7 v2.5 §2.7, "Use of escape sequences in text fields"):

* special characters ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` (and ``\\P\\`` with a truncation character) to the
  delimiters;
* hexadecimal data ``\\Xhh..\\`` (pairs of hex digits) to those bytes, decoded with ``charset`` (a
  Python codec, default ``latin-1``: one byte = one character, lossless). Pass the message codec
  (for instance ``"utf-8"``) to read multi-byte sequences; bytes invalid in that codec become
  U+FFFD;
* formatted text (FT): ``\\.br\\`` to one ``"\\n"``, ``\\.sp\\``/``\\.sp n\\`` to n line feeds, ``\\.sk n\\``
  to n spaces, ``\\.ce\\`` to ``"\\n"``; ``.fi .nf .in .ti`` and highlighting ``\\H\\ \\N\\`` are dropped
  (they change presentation, not content);
* anything else is kept verbatim, as one unit: local escapes ``\\Z..\\``, the character-set
  switches ``\\Cxxyy\\`` and ``\\Mxxyyzz\\`` (this engine reads one charset per message, MSH-18),
  bad hex, unknown codes, and an unterminated escape.

The result is a final data value, so a delimiter produced by ``\\X7C\\`` is simply data.

This one behaviour replaced three decoders that disagreed (the PAM France reader decoded the five
special characters only and rescanned inside unknown sequences; the CI-SIS report reader wrote
``\\.br\\`` as CRLF, kept ``\\H\\``/``\\N\\`` and ``\\.sp\\``, and returned ``\\X..\\`` as raw bytes):
``tests/test_hl7_escape.py`` pins each of those cases.
"""
from __future__ import annotations

from functools import lru_cache

__all__ = ["escape", "unescape"]

_HEX = frozenset("0123456789abcdefABCDEF")


@lru_cache(maxsize=64)
def _escape_table(field_sep: str, enc: str) -> tuple[dict[int, str], str]:
    e = enc[2]
    table = {
        ord(e): f"{e}E{e}",
        ord(field_sep): f"{e}F{e}",
        ord(enc[0]): f"{e}S{e}",
        ord(enc[1]): f"{e}R{e}",
        ord(enc[3]): f"{e}T{e}",
        13: f"{e}X0D{e}",
        10: f"{e}X0A{e}",
    }
    if len(enc) > 4:
        table[ord(enc[4])] = f"{e}P{e}"
    specials = "".join(chr(k) for k in table)
    return table, specials


def escape(text: str, field_sep: str = "|", enc: str = "^~\\&") -> str:
    """Escape ``text`` for use as HL7 field/component content."""
    table, specials = _escape_table(field_sep, enc)
    for ch in specials:
        if ch in text:
            return text.translate(table)
    return text


def _hex_decode(body: str, charset: str) -> str | None:
    if not body or len(body) % 2 or not _HEX.issuperset(body):
        return None
    try:
        return bytes.fromhex(body).decode(charset, "replace")
    except LookupError:
        return bytes.fromhex(body).decode("latin-1")


def _repeat_count(arg: str) -> int:
    arg = arg.strip()
    if not arg:
        return 1
    if arg.isascii() and arg.isdigit():  # "²" is a digit to str.isdigit, not to int()
        return min(int(arg), 100)
    return -1


def unescape(text: str, field_sep: str = "|", enc: str = "^~\\&", charset: str = "latin-1") -> str:
    """Decode the escape sequences of ``text`` (see module docstring for the exact rules)."""
    e = enc[2]
    i = text.find(e)
    if i < 0:
        return text
    simple = {"F": field_sep, "S": enc[0], "R": enc[1], "E": e, "T": enc[3], "H": "", "N": ""}
    if len(enc) > 4:
        simple["P"] = enc[4]
    out: list[str] = []
    pos = 0
    n = len(text)
    while i >= 0:
        j = text.find(e, i + 1)
        if j < 0:
            break  # unterminated: keep the rest verbatim
        body = text[i + 1:j]
        rep = simple.get(body)
        if rep is None and body:
            c = body[0]
            if c == "X" or c == "x":
                rep = _hex_decode(body[1:], charset)
            elif c == ".":
                cmd, arg = body[1:3], body[3:]
                if cmd == "br" and not arg:
                    rep = "\n"
                elif cmd == "sp" or cmd == "sk":
                    k = _repeat_count(arg)
                    if k >= 0:
                        rep = "\n" * k if cmd == "sp" else " " * k
                elif cmd == "ce" and not arg:
                    rep = "\n"
                elif cmd in ("fi", "nf") and not arg:
                    rep = ""
                elif cmd in ("in", "ti"):
                    a = arg.strip()
                    if a.lstrip("+-").isdigit():
                        rep = ""
        if rep is None:
            rep = text[i:j + 1]  # unknown or malformed escape: kept verbatim, as one unit
        out.append(text[pos:i])
        out.append(rep)
        pos = j + 1
        i = text.find(e, pos)
    out.append(text[pos:n])
    return "".join(out)
