"""IHE XDM media over e-mail: the ``IHE_XDM.zip`` attached to an MSSanté mail.

IHE ITI TF-1 §16 and ITI TF-3 §4.2 (« XDM »: ITI-32 Distribute Document Set on Media): a ZIP
holding ``README.TXT`` and ``INDEX.HTM`` at its root and, under ``IHE_XDM/<subset>/``, the
``METADATA.XML`` of the subset (an ebRS 3.0 ``lcm:SubmitObjectsRequest``) and the documents. Each
DocumentEntry names its file with the ``URI`` slot (relative to the subset folder), and its
``hash`` (SHA-1) and ``size`` slots describe the exact bytes of that file.

The metadata is the one the DMP connector sends (:func:`engine.xds.metadata.build_submission_metadata`:
CI-SIS "Transmission de documents CDA-R2 en HL7 v2", mapping.md « Mapping XDS »); this module adds
only the ``URI`` slots and writes the package. Unlike the ANS DRIMbox example package
(« JeuxDeDonnees/exemples/XDM »), METADATA.XML is the SubmitObjectsRequest itself (not a SOAP
envelope), and every hash and size is checked against the file written (:func:`check_package`).

Pure: no I/O besides bytes in memory. The package holds PHI (the document, the INS).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import io
import zipfile
from dataclasses import dataclass
from typing import Any

from lxml import etree

from engine.xds.metadata import build_submission_metadata
# the schemas module's validation: one compiled XMLSchema shared by every thread, behind its lock
from engine.xds.schemas import RIM_NS, _schema_errors
from engine.xds.settings import XdsSettings

_R = f"{{{RIM_NS}}}"
SUBSET = "SUBSET01"
ZIP_NAME = "IHE_XDM.zip"


class XdmError(ValueError):
    """The package cannot be built or does not check (text without patient data)."""


@dataclass(frozen=True)
class XdmSender:
    """What README.TXT and INDEX.HTM say about the sender (ITI TF-1 §16.1.1: the README names
    the sending organisation and application)."""

    organisation: str
    application: str = "mini-PFI"
    version: str = ""
    vendor: str = ""


def _slot(name: str, value: str) -> etree._Element:
    slot = etree.Element(f"{_R}Slot", name=name)
    etree.SubElement(etree.SubElement(slot, f"{_R}ValueList"), f"{_R}Value").text = value
    return slot


def _add_uri(entry: etree._Element, uri: str) -> None:
    """The ``URI`` slot, placed among the other slots (rim:RegistryObjectType: Slot* first)."""
    slots = entry.findall(f"{_R}Slot")
    position = entry.index(slots[-1]) + 1 if slots else 0
    entry.insert(position, _slot("URI", uri))


def _readme(sender: XdmSender, files: list[str]) -> str:
    tree = f"          {SUBSET}\n" + "\n".join(f"               {name}" for name in files)
    return ("Emetteur :\n=============\n"
            f"    . Organisme : {sender.organisation}\n\n"
            "Application de l'emetteur :\n=========================\n"
            f"    . Nom : {sender.application}\n"
            + (f"    . Version : {sender.version}\n" if sender.version else "")
            + (f"    . Editeur : {sender.vendor}\n" if sender.vendor else "")
            + "\nInstructions :\n=============\n"
            ". Consultez les fichiers recus par messagerie securisee de sante dans votre logiciel "
            "de professionnel de sante.\n\n"
            "Arborescence :\n============\n     README.TXT\n     INDEX.HTM\n     IHE_XDM\n"
            f"{tree}\n").replace("\n", "\r\n")


def _index(sender: XdmSender, files: list[str]) -> str:
    from html import escape

    links = "".join(f'<li><a href="IHE_XDM/{SUBSET}/{escape(n)}">{escape(n)}</a></li>' for n in files)
    return ('<?xml version="1.0" encoding="UTF-8"?>\r\n<html xmlns="http://www.w3.org/1999/xhtml">'
            f"<head><title>IHE XDM</title></head><body><p>Emetteur : {escape(sender.organisation)}</p>"
            f'<p>Voir le fichier <a href="README.TXT">README.TXT</a></p><ul>{links}</ul></body></html>\r\n')


def build_xdm(submission: Any, settings: XdsSettings, sender: XdmSender, *, now: dt.datetime,
              uuid_factory=None) -> bytes:
    """The ``IHE_XDM.zip`` of a report (action ``initial`` or ``replace``): one subset with the
    METADATA.XML and the documents ``DOC0001.XML``, ... Raises :class:`XdmError` (or
    :class:`engine.xds.metadata.MetadataError`) when the metadata cannot be built."""
    kwargs = {"uuid_factory": uuid_factory} if uuid_factory is not None else {}
    meta = build_submission_metadata(submission, settings, None, now=now, **kwargs)
    blobs = dict(meta.attachments)
    names: list[str] = []
    files: dict[str, bytes] = {}
    for n, entry in enumerate(meta.documents, start=1):
        name = f"DOC{n:04d}.XML"
        node = meta.request.find(f".//{_R}ExtrinsicObject[@id='{entry.entry_uuid}']")
        if node is None:
            raise XdmError(f"no DocumentEntry for document {n} in the metadata")
        _add_uri(node, name)
        names.append(name)
        files[name] = blobs[entry.entry_uuid]
    metadata = etree.tostring(meta.request, xml_declaration=True, encoding="UTF-8")
    listing = ["METADATA.XML", *names]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("README.TXT", _readme(sender, listing).encode("utf-8"))
        z.writestr("INDEX.HTM", _index(sender, listing).encode("utf-8"))
        z.writestr(f"IHE_XDM/{SUBSET}/METADATA.XML", metadata)
        for name in names:
            z.writestr(f"IHE_XDM/{SUBSET}/{name}", files[name])
    package = out.getvalue()
    problems = check_package(package)
    if problems:
        raise XdmError("; ".join(problems))
    return package


def check_package(package: bytes, *, validate_schema: bool = True) -> list[str]:
    """What is wrong with an XDM zip (empty when nothing): the required files, METADATA.XML
    valid against the XDS.b schemas, each DocumentEntry's URI present with the SHA-1 and size of
    that file. Used on every package built and by the tests' mail server."""
    problems: list[str] = []
    try:
        z = zipfile.ZipFile(io.BytesIO(package))
    except zipfile.BadZipFile:
        return ["not a ZIP file"]
    names = set(z.namelist())
    for required in ("README.TXT", "INDEX.HTM"):
        if required not in names:
            problems.append(f"{required} missing")
    subsets = sorted({n.split("/")[1] for n in names if n.startswith("IHE_XDM/") and n.count("/") >= 2})
    if not subsets:
        return problems + ["no IHE_XDM/<subset>/ folder"]
    for subset in subsets:
        meta_name = f"IHE_XDM/{subset}/METADATA.XML"
        if meta_name not in names:
            problems.append(f"{meta_name} missing")
            continue
        parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
        try:
            root = etree.fromstring(z.read(meta_name), parser)
        except etree.XMLSyntaxError as exc:
            problems.append(f"{meta_name}: not well-formed ({exc.msg})")
            continue
        if validate_schema:
            problems.extend(f"{meta_name} {e}" for e in _schema_errors(root))
        entries = root.findall(f".//{_R}ExtrinsicObject")
        if not entries:
            problems.append(f"{meta_name}: no DocumentEntry")
        for eo in entries:
            slots = {s.get("name"): [v.text for v in s.iter(f"{_R}Value")] for s in eo.findall(f"{_R}Slot")}
            uri = (slots.get("URI") or [None])[0]
            if not uri:
                problems.append(f"{meta_name}: DocumentEntry without a URI slot")
                continue
            path = f"IHE_XDM/{subset}/{uri}"
            if path not in names:
                problems.append(f"{path} named by METADATA.XML is missing")
                continue
            data = z.read(path)
            if (slots.get("hash") or [None])[0] != hashlib.sha1(data).hexdigest():
                problems.append(f"{path}: hash slot does not match the file")
            if (slots.get("size") or [None])[0] != str(len(data)):
                problems.append(f"{path}: size slot does not match the file")
    return problems
