"""The export layout, shared by ``minipfi export`` and the retention archive (docs/export.md).

One folder: JSON Lines files (one object per row, UTF-8), the raw bytes of messages, sent
payloads and responses as files, the documents of report submissions (CDA XML, and the PDF of a
CDA N1 ``nonXMLBody``) as files, ``manifest.json`` (format, counts, SHA-256 and size of every
file) and ``README.txt``. Bytes never go into JSON: a row names its file instead.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import shutil
import tarfile
import time
from collections import Counter
from datetime import date, datetime, timezone
from pathlib import Path

from engine import __version__

FORMAT = "minipfi-export/1"
EXTENSIONS = {"text/xml": "xml", "application/xml": "xml", "application/pdf": "pdf", "text/plain": "txt"}
JSONL = ("messages", "entries", "submissions", "mail_receipts", "events", "identities",
         "identity_identifiers", "identity_history")

README = """mini-PFI data export ({kind}), format {format}

Written by mini-PFI {version} on {created}. Field-by-field description: docs/export.md of
mini-PFI. Every *.jsonl file holds one JSON object per line (UTF-8); times are seconds since
1970-01-01 UTC (plus an *_iso copy for messages), bytes are never inlined: a row names the file
holding them.

  manifest.json              format, time range, counts, SHA-256 and size of every file
  messages.jsonl             stored messages (metadata, ACK returned, raw_file)
  raw/<message id>.hl7       the bytes received, untouched
  entries.jsonl              delivery entries per destination and target (state, attempts,
                             last error, payload_file, response_file)
  payloads/<entry id>.bin    what was sent (after transforms), when stored
  responses/<entry id>.bin   what the receiver answered (ACK, HTTP, SMTP)
  events.jsonl               delivery and processing history (sent, retry, error, replay...)
  submissions.jsonl          canonical report submissions (documents name their files)
  wrapped/<message id>.hl7   PACS reports: the CI-SIS message built around the CDA N1
  documents/<message id>-<n>.xml|pdf   CDA documents, and the PDF of a CDA N1
  mail_receipts.jsonl        receipts (DSN, MDN) of sent mails
  identities.jsonl, identity_identifiers.jsonl, identity_history.jsonl
                             the identity registry (IHE PAM France feed) and its history

These files hold patient data: keep them under the same protection as the engine's database.
"""


def _json_value(v):
    if isinstance(v, (bytes, memoryview)):
        return base64.b64encode(bytes(v)).decode("ascii")
    if isinstance(v, (datetime, date)):
        return v.isoformat()
    return v


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat()


def embedded_pdf(cda: bytes) -> bytes | None:
    """The PDF of a CDA N1 (``nonXMLBody/text``, representation B64), else None."""
    from engine.cda.header import parse_cda

    try:
        root = parse_cda(cda).getroot()
    except Exception:  # noqa: BLE001 - not a CDA: no PDF to extract
        return None
    ns = "{urn:hl7-org:v3}"
    txt = root.find(f"{ns}component/{ns}nonXMLBody/{ns}text")
    if txt is None or (txt.get("mediaType") or "") != "application/pdf":
        return None
    try:
        return base64.b64decode("".join(txt.itertext()), validate=False)
    except (binascii.Error, ValueError):
        return None


class DirSink:
    """Files written into a folder (the export)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def file(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def stream(self, rel: str):
        return open(self.root / rel, "wb")

    def close(self, streams: list[str]) -> None:
        pass


class TarSink:
    """Files written straight into one ``.tar.gz`` (the archive); JSON Lines are spooled to
    temporary files and added at the end; ``close`` fsyncs the file and its folder before
    giving it its final name."""

    def __init__(self, target: Path):
        self.target = Path(target)
        self.part = self.target.with_name(self.target.name + ".part")
        self.spool = self.target.with_name("." + self.target.name + ".spool")
        self.spool.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.part, "wb")
        # ustar headers and a fast gzip level: writing the archive must not be the run's cost
        self.tar = tarfile.open(fileobj=self.fh, mode="w:gz", format=tarfile.USTAR_FORMAT,
                                compresslevel=3)
        self.mtime = int(time.time())

    def file(self, rel: str, data: bytes) -> None:
        info = tarfile.TarInfo(rel)
        info.size, info.mtime, info.mode = len(data), self.mtime, 0o600
        self.tar.addfile(info, io.BytesIO(data))

    def stream(self, rel: str):
        return open(self.spool / rel, "wb")

    def close(self, streams: list[str]) -> None:
        for rel in streams:
            self.tar.add(self.spool / rel, arcname=rel)
        self.tar.close()
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.part, self.target)
        dfd = os.open(self.target.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        shutil.rmtree(self.spool, ignore_errors=True)

    def abandon(self) -> None:
        try:
            self.tar.close()
            self.fh.close()
        finally:
            self.part.unlink(missing_ok=True)
            shutil.rmtree(self.spool, ignore_errors=True)


class Bundle:
    """Writes one export (a folder, or with ``archive`` a ``.tar.gz``); ``close`` adds the
    manifest and README."""

    def __init__(self, root: Path, *, kind: str, time_range: dict | None = None, archive: bool = False):
        self.sink = TarSink(root) if archive else DirSink(root)
        self.kind = kind
        self.range = time_range or {}
        self.counts: Counter = Counter()
        self._files: dict[str, dict] = {}
        self._open: dict[str, tuple] = {}

    # -- low level ----------------------------------------------------------------------------
    def _file(self, rel: str, data: bytes) -> str:
        self.sink.file(rel, data)
        self._files[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        self.counts["files." + rel.split("/", 1)[0]] += 1
        return rel

    def line(self, name: str, obj: dict) -> None:
        if name not in self._open:
            self._open[name] = (self.sink.stream(f"{name}.jsonl"), hashlib.sha256(), [0])
        fh, h, size = self._open[name]
        data = (json.dumps({k: _json_value(v) for k, v in obj.items()}, ensure_ascii=False,
                           sort_keys=False) + "\n").encode("utf-8")
        fh.write(data)
        h.update(data)
        size[0] += len(data)
        self.counts[name] += 1

    # -- rows -------------------------------------------------------------------------------------
    def message(self, row: dict) -> None:
        r = dict(row)
        raw, ack = r.pop("raw"), r.pop("ack")
        r["raw_file"] = self._file(f"raw/{r['id']}.hl7", raw) if raw else None
        r["ack"] = ack.decode("utf-8", "replace")
        r["received_at_iso"] = _iso(r["received_at"])
        self.line("messages", r)

    def entry(self, row: dict) -> None:
        r = dict(row)
        payload, response = r.pop("payload", None), r.pop("response", None)
        r["payload_file"] = self._file(f"payloads/{r['id']}.bin", payload) if payload else None
        r["response_file"] = self._file(f"responses/{r['id']}.bin", response) if response else None
        self.line("entries", r)

    def submission(self, row: dict) -> None:
        r = dict(row)
        mid = r["message_id"]
        wrapped = r.pop("wrapped", None)
        r["wrapped_file"] = self._file(f"wrapped/{mid}.hl7", wrapped) if wrapped else None
        for col in ("submission", "validation", "cda_header"):
            if r.get(col):
                try:
                    r[col] = json.loads(r[col])
                except ValueError:
                    pass
        docs = []
        sub = r.get("submission")
        if isinstance(sub, dict):
            for n, doc in enumerate(sub.get("documents") or [], 1):
                b64 = doc.pop("raw_bytes_b64", None) if isinstance(doc, dict) else None
                if b64:
                    docs.append((n, doc.get("media_type") or "", base64.b64decode(b64)))
                    doc["file"] = None
        if wrapped and not docs:
            cda = cda_of_wrapped(wrapped)
            if cda is not None:
                docs.append((1, "text/xml", cda))
        files = []
        for n, media, data in docs:
            ext = EXTENSIONS.get(media.split(";")[0].strip().lower(), "bin")
            rel = self._file(f"documents/{mid}-{n}.{ext}", data)
            item = {"n": n, "media_type": media, "file": rel, "pdf_file": None}
            if ext == "xml":
                pdf = embedded_pdf(data)
                if pdf is not None:
                    item["pdf_file"] = self._file(f"documents/{mid}-{n}.pdf", pdf)
            files.append(item)
            if isinstance(sub, dict) and len(sub.get("documents") or []) >= n:
                sub["documents"][n - 1]["file"] = rel
        r["document_files"] = files
        self.line("submissions", r)

    # -- end --------------------------------------------------------------------------------------
    def close(self, *, extra: dict | None = None) -> dict:
        for name in JSONL:  # every file of the layout exists, empty when there is nothing
            if name not in self._open:
                self._open[name] = (self.sink.stream(f"{name}.jsonl"), hashlib.sha256(), [0])
        streams = []
        for name, (fh, h, size) in self._open.items():
            fh.close()
            streams.append(f"{name}.jsonl")
            self._files[f"{name}.jsonl"] = {"sha256": h.hexdigest(), "size": size[0]}
        self._open = {}
        created = datetime.now(timezone.utc).isoformat()
        # README.txt is listed (hash and size) like every file but the manifest itself
        readme = README.format(kind=self.kind, format=FORMAT, version=__version__, created=created).encode()
        self.sink.file("README.txt", readme)
        self._files["README.txt"] = {"sha256": hashlib.sha256(readme).hexdigest(), "size": len(readme)}
        manifest = {"format": FORMAT, "kind": self.kind, "engine_version": __version__,
                    "created_at": created, "range": self.range,
                    "counts": {k: self.counts.get(k, 0) for k in JSONL} | {
                        k: v for k, v in sorted(self.counts.items()) if k.startswith("files.")},
                    "files": dict(sorted(self._files.items()))}
        if extra:
            manifest.update(extra)
        self.sink.file("manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
        self.sink.close(streams)
        return manifest

    def abandon(self) -> None:
        for fh, _h, _s in self._open.values():
            fh.close()
        self._open = {}
        if isinstance(self.sink, TarSink):
            self.sink.abandon()


def cda_of_wrapped(wrapped: bytes) -> bytes | None:
    """The CDA carried Base64 in OBX-5 (ED: ...^Base64^data) of a CI-SIS ORU built here."""
    for seg in wrapped.replace(b"\n", b"\r").split(b"\r"):
        if not seg.startswith(b"OBX"):
            continue
        fields = seg.split(seg[3:4])
        if len(fields) > 5 and b"Base64" in fields[5]:
            comps = fields[5].split(b"^")
            try:
                data = base64.b64decode(comps[-1], validate=False)
            except (binascii.Error, ValueError):
                continue
            if data.lstrip().startswith(b"<"):
                return data
    return None


def archive_name(folder: Path, now: float | None = None) -> str:
    """``prune-<UTC time to the millisecond>-<pid>[-n].tar.gz``, not yet in ``folder``."""
    now = time.time() if now is None else now
    stem = time.strftime("prune-%Y%m%dT%H%M%S", time.gmtime(now)) + f"{now % 1:.3f}"[1:] + f"Z-{os.getpid()}"
    name, n = f"{stem}.tar.gz", 1
    while (Path(folder) / name).exists():
        n += 1
        name = f"{stem}-{n}.tar.gz"
    return name
