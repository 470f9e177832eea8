"""HL7 escape sequences, including the known decoding bugs listed in the notes (section 5)."""
from __future__ import annotations

import random

import pytest

from engine.hl7 import escape, unescape


@pytest.mark.parametrize("raw, value", [
    ("a\\F\\b", "a|b"),
    ("\\S\\\\T\\\\R\\\\E\\", "^&~\\"),
    ("trailing\\E\\", "trailing\\"),                      # \E\ at the end
    ("\\E\\", "\\"),
    ("x\\X0D0A\\y", "x\r\ny"),                             # Epic's \X0D0A\
    ("\\F\\\\S\\", "|^"),                                  # back-to-back escapes (ruby-hl7 #80)
    ("\\F\\\\F\\\\F\\", "|||"),
    ("\\X414243\\", "ABC"),                                # variable-length hex (deoxxa/hl7 #4)
    ("abc\\X41", "abc\\X41"),                              # unterminated: kept (python-hl7 #84)
    ("abc\\", "abc\\"),
    ("\\X4\\", "\\X4\\"),                                  # odd hex: kept
    ("\\XZZ\\", "\\XZZ\\"),                                # bad hex: kept
    ("\\X\\", "\\X\\"),
    ("\\Zcustom\\", "\\Zcustom\\"),                        # local escape: kept
    ("\\C2D41\\caf\\XE9\\", "\\C2D41\\caf\u00e9"),         # charset switch kept, hex decoded (latin-1)
    ("l1\\.br\\l2", "l1\nl2"),
    ("a\\.sp 2\\b", "a\n\nb"),
    ("\\H\\bold\\N\\", "bold"),
    ("a\\.in +4\\b\\.fi\\c", "abc"),
    ("a\\.unknown\\b", "a\\.unknown\\b"),
    ("pipe \\X7C\\ is data", "pipe | is data"),            # a delimiter from hex is final data (dcm4che #845)
    ("", ""),
    ("plain text", "plain text"),
])
def test_unescape(raw, value):
    assert unescape(raw) == value


def test_hex_uses_given_charset():
    assert unescape("\\XC3A9\\", charset="utf-8") == "\u00e9"
    assert unescape("\\XC3A9\\") == "\u00c3\u00a9"          # default latin-1: one byte per character
    assert unescape("\\X00E0\\", charset="utf-16-be") == "\u00e0"
    assert unescape("\\X00E0\\") == "\x00\u00e0"            # bytes, not a code point
    assert unescape("\\XFF\\", charset="utf-8") == "\ufffd"
    assert unescape("\\XE9\\", charset="no-such-codec") == "\u00e9"


def test_escape():
    assert escape("a|b^c&d~e\\f") == "a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f"
    assert escape("line1\rline2\nline3\r\n") == "line1\\X0D\\line2\\X0A\\line3\\X0D\\\\X0A\\"
    assert escape("nothing special") == "nothing special"
    assert escape("a#b$c*d", "#", "$%*@") == "a*F*b*S*c*E*d"
    assert escape("trunc#", "|", "^~\\&#") == "trunc\\P\\"
    assert unescape("trunc\\P\\", "|", "^~\\&#") == "trunc#"


def test_round_trips():
    canonical = "a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f\\X0D\\g\\X0A\\"
    assert escape(unescape(canonical)) == canonical
    rnd = random.Random(7)
    alphabet = "ab|^~\\&\r\nXé€ "
    for _ in range(2000):
        s = "".join(rnd.choice(alphabet) for _ in range(rnd.randrange(0, 20)))
        e = escape(s)
        assert "|" not in e and "\r" not in e and "\n" not in e and "^" not in e
        assert unescape(e) == s
        assert escape(unescape(e)) == e
    for fs, enc in (("#", "$%*@"), ("|", "^~\\&#")):
        for _ in range(300):
            s = "".join(rnd.choice("ab#$%*@|^~\\&\r") for _ in range(rnd.randrange(0, 15)))
            assert unescape(escape(s, fs, enc), fs, enc) == s


def test_unescape_linear_on_many_escape_chars():
    s = "\\" * 200_000
    assert unescape(s) == s  # empty escapes are kept verbatim; completes quickly
    assert unescape("\\F\\" * 100_000) == "|" * 100_000


# Cases where the three former decoders disagreed (PAM France reader: five special characters only,
# rescanning inside unknown sequences; CI-SIS report reader: bytes, \.br\ as CRLF, \H\ \N\ \.sp\
# kept, \X..\ as raw bytes). The one unescape wins with the reading of HL7 v2.5 §2.7 given here.
@pytest.mark.parametrize("raw, value", [
    # hexadecimal data is data: decoded (the PAM France reader kept "\X41\" in names)
    ("NOM\\X41\\", "NOMA"),
    # an escape sequence is one unit and sequences never nest: "\Z1\" is kept whole and "F\" after
    # it is plain text (the PAM France reader decoded "\F\" out of "\Z1\F\" -> "\Z1|")
    ("\\Z1\\F\\", "\\Z1\\F\\"),
    ("\\C2842\\A\\F\\", "\\C2842\\A|"),                     # \Cxxyy\ kept whole, then \F\ decoded
    ("\\M2442\\", "\\M2442\\"),                            # multi-byte switch kept (one charset, MSH-18)
    # \.br\ begins a new output line: one "\n" (the CI-SIS reader wrote CRLF, a second line ending
    # style in the same engine)
    ("l1\\.br\\l2", "l1\nl2"),
    ("a\\.sp\\b", "a\nb"),                                 # kept by the CI-SIS reader
    ("a\\.sk 3\\b", "a   b"),                              # skip n spaces to the right
    ("\\H\\urgent\\N\\", "urgent"),                        # presentation only (kept by both readers)
    # agreements worth keeping: escaped escape, then literal text
    ("\\E\\X41\\E\\", "\\X41\\"),
    ("a\\", "a\\"),
])
def test_unescape_where_former_decoders_differed(raw, value):
    assert unescape(raw) == value


def test_hex_is_text_in_the_message_charset():
    # the CI-SIS reader returned the bytes of \XC3A9\; text decoded with the message codec gives the
    # same bytes back once encoded, and a valid character when read as text
    assert unescape("caf\\XC3A9\\", charset="utf-8").encode("utf-8") == b"caf\xc3\xa9"
    assert unescape("caf\\XE9\\", charset="iso-8859-15") == "caf\u00e9"


def test_repeat_count_in_a_non_ascii_digit_is_kept_verbatim():
    # found by fuzzing: "²" is a digit to str.isdigit but not to int()
    assert unescape("a\\.sk²\\b") == "a\\.sk²\\b"
