"""Bad input over real MLLP, one engine per store (SQLite, PostgreSQL) and many messages: for each
case the exact ACK code and ERR, whether and how the message is stored, the same answer when it is
resent (byte for byte when the duplicate rule applies: a message whose MSH was read is stored with
its ACK, and a resend with the same MSH-3/4/10 gets that ACK back), and no exception in the log.
"""
from __future__ import annotations

import base64
import hashlib
import re

import pytest
import sqlalchemy as sa

from mllp.blocking import BlockingMLLPClient
from tests.conftest import pg_schema_url
from tests.enginectl import EngineProcess, free_port
from tests.peers import Receiver
from tests.test_bad_input_e2e import MDM
from tests.test_reports_e2e import PACS_ORU, PACS_REPORTS, _qualified_a28


def config(port, status_port, dest_port):
    return f"""
        engine:
          status: {{bind: 127.0.0.1, port: {status_port}}}
        channels:
          mllp-in:
            type: mllp
            port: {port}
            accept: {{message_types: ["ADT^*", "ORU^R01", "MDM^*", "ORM^O01"]}}
            identity_feed: {{enabled: true}}
            reports: {{enabled: true}}
{PACS_REPORTS}        routes:
          - {{name: all, from: mllp-in, to: [out]}}
        destinations:
          out: {{type: mllp, host: 127.0.0.1, port: {dest_port}, ack_timeout: 2s}}
    """


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def eng(request, tmp_path_factory):
    receiver = Receiver()
    tmp = tmp_path_factory.mktemp(f"bad-input-{request.param}")
    port, status_port = free_port(), free_port()
    with pg_schema_url() if request.param == "postgresql" else _no_url() as url:
        e = EngineProcess(tmp, config(port, status_port, receiver.port), db_url=url, status_port=status_port)
        e.port = port
        e.url = url or f"sqlite:///{e.data_dir / 'minipfi.db'}"
        e.start()
        with BlockingMLLPClient("127.0.0.1", port, timeout=30) as c:  # the patient of the PACS reports
            assert segments(c.send(_qualified_a28()), b"MSA")[0][1] == b"AA"
        yield e
        rc = e.stop()
        receiver.close()
        log = e.log_text()
        assert rc == 0, e.log_tail()
        assert "message.store_failed" not in log and "Traceback" not in log and "Unhandled" not in log, log[-3000:]


class _no_url:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def stored(eng, message: bytes) -> list[tuple[str, str, str]]:
    """(status, ACK code, error code) of the stored copies of ``message`` (found by their SHA-256)."""
    db = sa.create_engine(eng.url)
    try:
        with db.connect() as c:
            rows = c.execute(sa.text("SELECT status, ack_code, error_code FROM messages WHERE sha256 = :h "
                                     "ORDER BY id"), {"h": hashlib.sha256(message).hexdigest()}).all()
    finally:
        db.dispose()
    return [tuple(r) for r in rows]


def _adt(ctl: str, *, trigger="A28", pid5=b"ZZTEST^ALEX^ALEX^^^^L", sep=b"\r", msh18=b"UNICODE UTF-8", extra=b"",
         version=b"2.5") -> bytes:
    segs = [b"MSH|^~\\&|GAM|CHU-X|DPI|CHU-X|20240101||ADT^" + trigger.encode() + b"^ADT_A05|" + ctl.encode()
            + b"|P|" + version + b"||||||" + msh18,
            b"EVN||20240101",
            b"PID|1||" + ctl.encode() + b"^^^CHU-X&000897406&N^PI||" + pid5 + b"||19800101|M"]
    return sep.join(segs) + sep + extra


def _mdm(ctl: str, cda: bytes | None = None, b64: bytes | None = None) -> bytes:
    text = MDM.replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    text = re.sub(rb"(MSH(?:\|[^|\r]*){8}\|)[^|\r]*", lambda m: m.group(1) + ctl.encode(), text, count=1)
    start = text.index(b"^text^XML^Base64^") + len(b"^text^XML^Base64^")
    end = text.index(b"|", start)
    if b64 is None and cda is None:
        return text
    body = b64 if b64 is not None else base64.b64encode(cda)
    return text[:start] + body + text[end:]


def _mdm_cda() -> bytes:
    text = MDM.replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    start = text.index(b"^text^XML^Base64^") + len(b"^text^XML^Base64^")
    return base64.b64decode(text[start:text.index(b"|", start)])


def _cda_with_dtd() -> bytes:
    cda = _mdm_cda()
    root = cda.index(b"<ClinicalDocument")
    cda = cda[:root] + b'<!DOCTYPE ClinicalDocument [<!ENTITY e "x">]>\n' + cda[root:]
    return cda.replace(b"<title>", b"<title>&e;", 1)


def _pacs(ctl: str, accession: bytes) -> bytes:
    return (PACS_ORU.read_bytes().replace(b"PACS0001", ctl.encode(), 1)
            .replace(b"105234751||||2", accession + b"||||2").replace(b"IPC|105234751", b"IPC|" + accession))


def _msh(ctl: str, msh2: bytes = b"^~\\&", fs: bytes = b"|", rest: bytes = b"") -> bytes:
    f = [msh2, b"GAM", b"CHU-X", b"DPI", b"CHU-X", b"20240101", b"", b"ORM^O01^ORM_O01", ctl.encode(), b"P", b"2.5"]
    return b"MSH" + fs + fs.join(f) + b"\r" + rest


#: The two ways a message is kept. REFUSED: refused before routing (MSH unreadable, or not what the
#: channel accepts): stored as rejected each time it comes, not a duplicate (no trusted MSH-3/4/10),
#: so a resend is answered the same but with a fresh ACK MSH-7/MSH-10. STORED: stored once with its
#: ACK (routed, or rejected by a processing step); a resend is a duplicate and gets that ACK back.
REFUSED, STORED = "refused", "stored"
_AE_MSH = ("AE", REFUSED, "rejected")
_AR_MSH = ("AR", REFUSED, "rejected")
_AA = ("AA", STORED, "routed")
_AE_STEP = ("AE", STORED, "rejected")

#: name: (message, (MSA-1, how kept, status), [ERR-3.1 or ERR-3.1+ERR-5.1 of each ERR], ERR-2 of the first)
CASES = {
    "empty message": (b"", _AE_MSH, ["100"], "MSH^1"),
    "blank lines only": (b"\r\r\n", _AE_MSH, ["100"], "MSH^1"),
    "not an HL7 message": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", _AE_MSH, ["100"], "MSH^1"),
    "MSH only, ADT": (_adt("MSHONLY-ADT")[: _adt("MSHONLY-ADT").index(b"\r") + 1], _AE_STEP, ["100"], "PID^1"),
    "MSH only, ORM": (_msh("MSHONLY-ORM"), _AA, [], None),
    "MSH-1 missing": (b"MSH", _AE_MSH, ["101"], "MSH^1^1"),
    "MSH-2 empty": (_msh("ENC-EMPTY", b""), _AE_MSH, ["101"], "MSH^1^2"),
    "MSH-2 three characters": (_msh("ENC-3", b"^~\\"), _AE_MSH, ["102"], "MSH^1^2"),
    "MSH-2 six characters": (_msh("ENC-6", b"^~\\&#$"), _AE_MSH, ["102"], "MSH^1^2"),
    "MSH-2 repeated character": (_msh("ENC-REP", b"^^\\&"), _AE_MSH, ["102"], "MSH^1^2"),
    "MSH-2 alphanumeric": (_msh("ENC-ALNUM", b"^~\\A"), _AE_MSH, ["102"], "MSH^1^2"),
    "MSH-2 space": (_msh("ENC-SPACE", b"^~ &"), _AE_MSH, ["102"], "MSH^1^2"),
    "MSH-2 control character": (_msh("ENC-CTRL", b"^~\\\x01"), _AE_MSH, ["102"], "MSH^1^2"),
    "MSH-2 non-ASCII": (_msh("ENC-8BIT", b"^~\xb4&"), _AE_MSH, ["102"], "MSH^1^2"),
    "MSH-2 NUL": (_msh("ENC-NUL", b"^~\\\x00"), _AE_MSH, ["102"], "MSH^1"),
    "MSH-2 with truncation character": (_msh("ENC-5", b"^~\\&#"), _AA, [], None),
    "field separator #": (_msh("FS-HASH", fs=b"#"), _AA, [], None),
    "field separator alphanumeric": (_msh("FS-ALNUM", fs=b"A"), _AE_MSH, ["102"], "MSH^1^1"),
    "field separator space": (_msh("FS-SPACE", fs=b" "), _AE_MSH, ["102"], "MSH^1^1"),
    "field separator tab": (_msh("FS-TAB", fs=b"\t"), _AE_MSH, ["102"], "MSH^1^1"),
    "field separator non-ASCII": (_msh("FS-8BIT", fs=b"\xa6"), _AE_MSH, ["102"], "MSH^1^1"),
    "unknown version": (_adt("VER-99", version=b"9.9"), _AR_MSH, ["203"], "MSH^1^12"),
    "unknown message type": (_msh("TYPE-ZZZ").replace(b"ORM^O01^ORM_O01", b"ZZZ^Z01"), _AR_MSH, ["200"],
                             "MSH^1^9^1^1"),
    "unknown event": (_msh("EVENT-O99").replace(b"ORM^O01^ORM_O01", b"ORM^O99"), _AR_MSH, ["201"], "MSH^1^9^1^2"),
    "ADT event the feed passes through": (_adt("ADT-A24", trigger="A24"), _AA, [], None),
    "LF segment separators": (_adt("SEP-LF", sep=b"\n"), _AA, [], None),
    "CRLF segment separators": (_adt("SEP-CRLF", sep=b"\r\n"), _AA, [], None),
    "Latin-1 with MSH-18 8859/1": (_adt("L1-18", pid5=b"ZZ\xc9TIENNE^ALEX^^^^^L", msh18=b"8859/1"), _AA, [], None),
    # not UTF-8, the default: read as windows-1252 and flagged (encoding.cp1252_fallback)
    "Latin-1 without MSH-18": (_adt("L1-NO18", pid5=b"ZZ\xc9TIENNE^ALEX^^^^^L", msh18=b""), _AA, [], None),
    "invalid UTF-8 under UNICODE UTF-8": (_adt("BAD-UTF8", pid5=b"ZZ\xff\xfe^ALEX^^^^^L"), _AA, [], None),
    "unknown MSH-18": (_adt("MSH18-BOGUS", msh18=b"KLINGON"), _AE_MSH, ["103"], "MSH^1^18"),
    "huge segment count": (_adt("HUGE-SEGS", extra=b"NTE|1||x\r" * 100_000), _AA, [], None),
    "ACK sent to the listener": (b"MSH|^~\\&|RIS|CHU|PFI|CHU|20240101||ACK^A01^ACK|ACK-IN|P|2.5\rMSA|AA|X1\r",
                                 _AR_MSH, ["200"], "MSH^1^9"),
    # the defects found by the outside probe that a message can show
    "ADT without PID": (_adt("NOPIDSEG")[: _adt("NOPIDSEG").index(b"\rPID|") + 1], _AE_STEP, ["100"], "PID^1"),
    "A40 without MRG": (_adt("A40-NOMRG", trigger="A40"), _AE_STEP, ["100"], "MRG^1"),
    "NUL in MSH-18": (_adt("NUL-MSH18", msh18=b"UNICODE\x00UTF-8"), _AE_MSH, ["102"], "MSH^1"),
    "non-ASCII MSH-10": (_adt("CTL-\u00e9"), _AA, [], None),
    "BOM before MSH": (b"\xef\xbb\xbf" + _adt("BOM-1"), _AA, [], None),
    "CI-SIS report, corrupted Base64": (_mdm("B64-BAD", b64=b"PD94bWwg!!!*not base64*"), _AE_STEP, ["102+906"],
                                        "OBX^1^1"),
    "CI-SIS report, non-XML CDA": (_mdm("CDA-NOTXML", cda=b"%PDF-1.4 this is no XML"), _AE_STEP, ["207+906"],
                                   "OBX^1^1"),
    "CI-SIS report, CDA with a DTD": (_mdm("CDA-DTD", cda=_cda_with_dtd()), _AE_STEP, ["207+906"], "OBX^1^1"),
    # found by fuzzing: the identity feed's reader raised, the message was not stored (AR 207)
    "EVN-2 with an offset of 61 hours": (_adt("TS-OFFSET").replace(b"EVN||20240101", b"EVN||202403-6111"), _AA,
                                         [], None),
    "escape with a non-ASCII repeat count": (_adt("ESC-SK", pid5=b"ZZ\\.sk\xc2\xb2\\TEST^ALEX^^^^^L"), _AA, [],
                                             None),
    # a NUL reaches no text column of the store: the field is named, the message stored
    "NUL in PID-5": (_adt("NUL-PID5", pid5=b"ZZ\x00TEST^ALEX^ALEX^^^^L"), _AE_STEP, ["102"], "PID^1^5^1"),
    "escaped NUL in PID-5": (_adt("NULX-PID5", pid5=b"ZZ\\X00\\TEST^ALEX^ALEX^^^^L"), _AE_STEP, ["102"],
                             "PID^1^5^1"),
    "CI-SIS report, NUL in PID-1": (_mdm("CISIS-NUL").replace(b"\rPID|", b"\rPID|\x00", 1), _AE_STEP,
                                    ["102+906"], "PID^1^1"),
    "CI-SIS report, NUL in the CDA": (_mdm("CDA-NUL", cda=_mdm_cda().replace(b"<title>", b"<title>\x00", 1)),
                                      _AE_STEP, ["207+906"], "OBX^1^1"),
    "PACS report, NUL in the accession number": (_pacs("PACS-NUL", b"1052\x0034751"), _AE_STEP, ["207+906"],
                                                 "OBR^1^18"),
    "PACS report, escaped NUL in the accession number": (_pacs("PACS-NULX", b"1052\\X00\\34751"), _AE_STEP,
                                                         ["207+906"], "OBR^1^18"),
}


def segments(ack: bytes, name: bytes) -> list[list[bytes]]:
    """The ``name`` segments of an ACK, split on the ACK's own field separator."""
    fs = ack[3:4]
    return [s.split(fs) for s in ack.split(b"\r") if s.startswith(name)]


def _masked(ack: bytes) -> bytes:
    """The ACK without its own MSH-7 and MSH-10 (fresh for an answer that is not a stored ACK)."""
    head, _, rest = ack.partition(b"\r")
    fs = head[3:4]
    f = head.split(fs)
    f[6:7], f[9:10] = [b"T"], [b"ID"]
    return fs.join(f) + b"\r" + rest


def _err_code(err: list[bytes]) -> str:
    code = err[3].split(b"^")[0].decode()
    app = err[5].split(b"^")[0].decode() if len(err) > 5 and err[5] else ""
    return f"{code}+{app}" if app else code


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(eng, name):
    message, (code, kept, status), err_codes, location = CASES[name]
    with BlockingMLLPClient("127.0.0.1", eng.port, timeout=60) as c:
        first = c.send(message)
        again = c.send(message)
    assert segments(first, b"MSA")[0][1].decode() == code, first[:600]
    # the errors (ERR-4 E); warnings (ERR-4 W) of the report rules are the rules tests' business
    found = [e for e in segments(first, b"ERR") if not (len(e) > 4 and e[4] == b"W")]
    assert [_err_code(e) for e in found] == err_codes, first[:600]
    if location is not None:
        assert found[0][2].decode() == location, found[0]
    for e in found:  # a clear answer: ERR-8 says what is wrong, and never quotes a NUL
        assert len(e) > 8 and e[8] and b"\x00" not in e[8], e
    rows = stored(eng, message)
    assert {r[:2] for r in rows} == {(status, code)}, rows
    if kept == STORED:
        assert len(rows) == 1 and again == first  # the duplicate gets the stored ACK, byte for byte
    else:
        assert len(rows) == 2 and _masked(again) == _masked(first)
    first_code = err_codes[0].split("+")[-1] if err_codes else None
    assert rows[0][2] == first_code, rows
