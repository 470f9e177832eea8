"""The files CDA validation needs at run time: CDA XSD, CI-SIS schematrons, value sets.

They ship with the package (``engine/cda/resources/``, a subset of the ANS repository of the
CI-SIS schematrons, "CI-SIS, Modèles de contenus CDA"; source, version and licence in its
``README.md``), or come from a folder named in ``routes.yaml`` (``engine.cda_resources``) holding
a newer official release with the same layout: ``infrastructure/cda/``, ``schematrons/``,
``jeuxDeValeurs/``.

:func:`closure` lists the files actually used, by following ``xs:include``/``xs:import`` from the
XSD, ``sch:include`` from the profiles and the literal ``doc('…')`` value-set lookups (resolved,
as in the ANS tool, against the folder of the top-level schematron). It chose the packaged subset
(:func:`copy_subset`) and keys the compiled-stylesheet cache.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from engine.cda.header import safe_parser as _parser

PACKAGED = Path(__file__).resolve().parent / "resources"
VERSION_FILE = "version.json"
XSD = "infrastructure/cda/CDA_extended.xsd"
#: profiles run on every document, by name
PROFILES = {
    "structurationMinimale": "schematrons/profils/structurationMinimale/ASIP-STRUCT-MIN-StrucMin.sch",
    "IHE": "schematrons/profils/IHE.sch",
}
#: JDV_J07 XdsTypeCode CI-SIS (SVS), source of the value set the structurationMinimale profile
#: reads but the ANS repository lacks (see engine.cda.validation)
J07 = "jeuxDeValeurs/JDV_J07_XdsTypeCode_CISIS.xml"
_J07_OID = "1.2.250.1.213.1.1.5.471"

_XS = "{http://www.w3.org/2001/XMLSchema}"
_SCH = "{http://purl.oclc.org/dsdl/schematron}"
DOC_RE = re.compile(r"\bdoc(?:ument)?\(\s*'([^']+)'\s*\)")


class ResourcesError(ValueError):
    """The folder does not hold the files validation needs."""


@dataclass(frozen=True)
class Resources:
    root: Path
    packaged: bool

    def path(self, rel: str) -> Path:
        return self.root / rel

    def info(self) -> dict:
        """``{"version": …, "source": "packaged" | folder}`` for ``/status`` and ``minipfi version``."""
        try:
            version = json.loads((self.root / VERSION_FILE).read_text(encoding="utf-8")).get("version")
        except (OSError, ValueError):
            version = None
        return {"version": version or "unknown", "source": "packaged" if self.packaged else str(self.root)}


def open_resources(folder: str | Path | None = None) -> Resources:
    """The packaged resources (``folder`` None) or ``folder``; raises :class:`ResourcesError` when
    the XSD or a profile is missing."""
    root = Path(folder).resolve() if folder else PACKAGED
    res = Resources(root, packaged=root == PACKAGED)
    missing = [rel for rel in (XSD, *PROFILES.values()) if not res.path(rel).is_file()]
    if missing:
        raise ResourcesError(f"{root}: not a CDA validation resources folder (missing {', '.join(missing)})")
    return res


def configured_folder(setting: str | None, routes_file: str | Path) -> Path | None:
    """``engine.cda_resources`` as written in ``routes.yaml``, relative to that file; None: packaged."""
    return Path(routes_file).parent / setting if setting else None


def closure(root: Path, profiles: dict[str, str] = PROFILES) -> tuple[list[str], list[str]]:
    """``(files, missing)``: relative paths of the files the XSD and ``profiles`` use, and the
    references to files absent from ``root``."""
    root = root.resolve()
    seen: set[Path] = set()
    missing: list[str] = []

    def rel(p: Path) -> str:
        return p.relative_to(root).as_posix()

    def xsd(p: Path) -> None:
        if p in seen:
            return
        seen.add(p)
        for el in etree.parse(str(p), _parser()).getroot().iter(_XS + "include", _XS + "import", _XS + "redefine"):
            loc = el.get("schemaLocation")
            if loc and "://" not in loc:
                target = (p.parent / loc).resolve()
                xsd(target) if target.is_file() else missing.append(f"{rel(p)}: {loc}")

    def sch(p: Path, top: Path) -> None:
        if p in seen:
            return
        seen.add(p)
        doc = etree.parse(str(p), _parser())
        for inc in doc.getroot().iter(_SCH + "include"):
            target = (p.parent / inc.get("href", "")).resolve()
            sch(target, top) if target.is_file() else missing.append(f"{rel(p)}: {inc.get('href')}")
        for el in doc.getroot().iter():
            for value in el.attrib.values() if isinstance(el.tag, str) else ():
                for ref in DOC_RE.findall(value):
                    target = (top.parent / ref).resolve()
                    if target.is_file():
                        seen.add(target)
                    elif ref.endswith(f"{_J07_OID}-DYNAMIC.xml"):
                        seen.add((root / J07).resolve())  # generated from JDV_J07
                    else:
                        missing.append(f"{rel(p)}: doc('{ref}')")

    xsd((root / XSD).resolve())
    for path in profiles.values():
        top = (root / path).resolve()
        sch(top, top)
    return sorted(rel(p) for p in seen), sorted(set(missing))


def digest(root: Path, files: list[str]) -> str:
    """sha256 over the relative paths and bytes of ``files``."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.encode() + b"\0")
        h.update((root / f).read_bytes())
    return h.hexdigest()


def copy_subset(src: Path, dest: Path) -> list[str]:
    """Copy the :func:`closure` of an ANS release folder ``src`` into ``dest`` (how the packaged
    subset was made); returns the copied paths."""
    files, _missing = closure(src)
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / f, dest / f)
    return files


def manifest(root: Path, files: list[str]) -> str:
    """``sha256sum`` format (``sha256sum -c MANIFEST`` checks it)."""
    return "".join(f"{hashlib.sha256((root / f).read_bytes()).hexdigest()}  {f}\n" for f in files)
