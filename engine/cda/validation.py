"""Official validation of CDA R2 documents: CDA XSD and CI-SIS schematrons.

The XSD, schematrons and value sets come from :mod:`engine.cda.resources` (packaged with the
engine, or a newer official release named in ``routes.yaml``); nothing is read from beside the
repository. Generated files (stylesheets, the missing value set) go to a cache folder under the
engine's data directory.

* XSD: ``infrastructure/cda/CDA_extended.xsd`` compiled once with lxml.
* Schematron: the ANS ART-DECOR schematrons ("CI-SIS, Modèles de contenus CDA", ISO Schematron,
  ``queryBinding="xslt2"``), turned into XSLT with the ISO skeleton lxml ships and run with
  SaxonC-HE (XSLT 3.0), as the ANS testContenuCDA tool does:

  1. ``iso_dsdl_include.xsl`` then ``iso_abstract_expand.xsl`` on the ``.sch``;
  2. ``queryBinding`` set to ``xslt`` and ``iso_svrl_for_xslt1.xsl`` run on the expanded schema;
  3. the generated stylesheet declared ``version="2.0"`` (the tests use XPath 2 functions);
  4. the value-set lookups ``doc('include/voc-….xml')`` (relative to the top-level schematron's
     folder) rewritten to absolute URIs, since the stylesheet lives in the cache; the value set
     missing from the ANS repository (``voc-1.2.250.1.213.1.1.5.471-DYNAMIC.xml``, JDV_J07
     XdsTypeCode CI-SIS) is generated into the cache from ``jeuxDeValeurs/JDV_J07_XdsTypeCode_CISIS.xml``
     unless the resources folder has it;
  5. SVRL ``failed-assert`` / ``successful-report`` with ``role="error"`` or no role are errors,
     ``role="warning"`` / ``"info"`` are warnings.

  The generated stylesheet is cached on disk, keyed by a hash of every file the profile uses, the
  resources folder and the skeleton; the compiled executable is kept in memory. One validator per
  process: :func:`configure` (engine start, CLI) then :func:`shared_validator`.

Untrusted input: every document is parsed by lxml with ``resolve_entities=False``,
``no_network=True``, ``load_dtd=False`` before Saxon sees it, and only the root element is handed
over (no DOCTYPE, so no entity can be declared).
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lxml import etree

from engine.cda import resources as res
from engine.cda.header import DoctypeNotAllowed, parse_cda, safe_parser

SVRL_NS = "http://purl.oclc.org/dsdl/svrl"
MISSING_VOC = "voc-1.2.250.1.213.1.1.5.471-DYNAMIC.xml"
SVS_NS = "urn:ihe:iti:svs:2008"
#: bump when the stylesheet generation below changes (invalidates cached stylesheets)
GENERATOR = "2"

#: profiles known by name (paths relative to the resources folder)
PROFILES = res.PROFILES


@dataclass
class ValidationReport:
    valid: bool
    xsd_errors: list[dict[str, Any]] = field(default_factory=list)
    schematron_failures: list[dict[str, Any]] = field(default_factory=list)
    schematron_warnings: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "xsd_errors": self.xsd_errors,
            "schematron_failures": self.schematron_failures,
            "schematron_warnings": self.schematron_warnings,
            "timings": self.timings,
        }


def _iso_skeleton_dir() -> Path:
    import lxml.isoschematron as iso

    return Path(iso.__file__).resolve().parent / "resources" / "xsl" / "iso-schematron-xslt1"


def default_cache_dir() -> Path:
    """``<data dir>/cache/cda`` with the CLI's default data directory ($MINIPFI_DATA_DIR or ./data)."""
    return Path(os.environ.get("MINIPFI_DATA_DIR") or "data") / "cache" / "cda"


class CdaValidator:
    """XSD + schematron validator, compiled once; thread-safe for ``validate`` calls."""

    def __init__(self, resources_dir: str | os.PathLike | None = None, *,
                 cache_dir: str | os.PathLike | None = None,
                 profiles: tuple[str, ...] = ("structurationMinimale", "IHE")) -> None:
        self.resources = res.open_resources(resources_dir)
        self.cache_dir = (Path(cache_dir) if cache_dir else default_cache_dir()).resolve()  # URIs in the XSLT
        self.profiles = profiles
        self._schema: etree.XMLSchema | None = None
        self._executables: dict[str, Any] | None = None
        self._proc = None
        self._lock = threading.Lock()
        self.compile_timings: dict[str, float] = {}
        self.skipped_includes: list[str] = []

    # ------------------------------------------------------------------ XSD
    @property
    def schema(self) -> etree.XMLSchema:
        if self._schema is None:
            with self._lock:
                if self._schema is None:
                    t0 = time.perf_counter()
                    doc = etree.parse(str(self.resources.path(res.XSD)), safe_parser())
                    self._schema = etree.XMLSchema(doc)
                    self.compile_timings["xsd_compile_s"] = time.perf_counter() - t0
        return self._schema

    # ----------------------------------------------------------- schematron
    def _missing_value_set(self) -> Path:
        """The JDV_J07 value set in the ART-DECOR form the schematron reads, written to the cache in
        a folder named after its source (two releases sharing a cache never overwrite each other)."""
        source = self.resources.path(res.J07).read_bytes()
        out = self.cache_dir / "include" / hashlib.sha256(source).hexdigest()[:16] / MISSING_VOC
        src = etree.ElementTree(etree.fromstring(source, safe_parser()))
        codes = src.getroot().xpath("//svs:Concept/@code", namespaces={"svs": SVS_NS})
        root = etree.Element("{urn:hl7-org:v3}valueSets", nsmap={None: "urn:hl7-org:v3"})
        vs = etree.SubElement(root, "valueSet", nsmap={None: ""})
        vs.set("id", "1.2.250.1.213.1.1.5.471")
        vs.set("displayName", "JDV_J07_XdsTypeCode_CISIS")
        cl = etree.SubElement(vs, "conceptList")
        for c in codes:
            etree.SubElement(cl, "concept").set("code", c)
        data = etree.tostring(root, xml_declaration=True, encoding="UTF-8")
        if not out.exists() or out.read_bytes() != data:
            _write_atomic(out, data)
        return out

    def _resolved_sch(self, sch: Path, name: str, key: str) -> Path:
        """Copy of the top-level .sch in the cache with absolute include hrefs; includes whose file
        is missing upstream are dropped and listed in ``skipped_includes`` (second upstream defect:
        ``IHE.sch`` includes ``../include/entrees/E_directiveAnticipee_int.sch``, absent from the
        ANS repository; no pattern refers to it)."""
        doc = etree.parse(str(sch), safe_parser())
        for inc in list(doc.getroot().iter("{http://purl.oclc.org/dsdl/schematron}include")):
            target = (sch.parent / inc.get("href", "")).resolve()
            if target.exists():
                inc.set("href", target.as_uri())
            else:
                self.skipped_includes.append(f"{name}: {inc.get('href')}")
                inc.getparent().remove(inc)
        out = self.cache_dir / f"{name}-{key}-resolved.sch"
        _write_atomic(out, etree.tostring(doc, xml_declaration=True, encoding="UTF-8"))
        return out

    def _cache_key(self, name: str) -> str:
        import lxml

        root = self.resources.root
        files, _missing = res.closure(root, {name: PROFILES[name]})
        h = hashlib.sha256(f"{GENERATOR}\0{lxml.__version__}\0{root}\0".encode())
        h.update(res.digest(root, files).encode())
        return h.hexdigest()[:16]

    def _generated_xslt(self, name: str) -> Path:
        sch = self.resources.path(PROFILES[name])
        needs_j07 = not (sch.parent / "include" / MISSING_VOC).exists() and self.resources.path(res.J07).exists()
        missing = self._missing_value_set() if needs_j07 else None
        key = self._cache_key(name)
        out = self.cache_dir / f"{name}-{key}.xsl"
        if out.exists():
            return out
        skel = _iso_skeleton_dir()
        proc = self._processor()
        xp = proc.new_xslt30_processor()
        # the skeleton is XSLT 1; Saxon runs it (libxslt fails on the SVRL step)
        source = self._resolved_sch(sch, name, key)
        step1 = xp.compile_stylesheet(stylesheet_file=str(skel / "iso_dsdl_include.xsl")) \
            .transform_to_string(source_file=str(source))
        step2 = xp.compile_stylesheet(stylesheet_file=str(skel / "iso_abstract_expand.xsl")) \
            .transform_to_string(xdm_node=proc.parse_xml(xml_text=step1))
        expanded = etree.fromstring(step2.encode("utf-8"), safe_parser())
        expanded.set("queryBinding", "xslt")
        exe3 = xp.compile_stylesheet(stylesheet_file=str(skel / "iso_svrl_for_xslt1.xsl"))
        exe3.set_parameter("generate-fired-rule", proc.make_string_value("false"))
        step3 = exe3.transform_to_string(
            xdm_node=proc.parse_xml(xml_text=etree.tostring(expanded, encoding="unicode")))
        gen = etree.fromstring(step3.encode("utf-8"), safe_parser())
        gen.set("version", "2.0")
        self._absolute_value_sets(gen, sch, missing)
        _write_atomic(out, etree.tostring(gen, encoding="utf-8"))
        return out

    @staticmethod
    def _absolute_value_sets(gen: etree._Element, sch: Path, missing: Path | None) -> None:
        """``doc('include/voc-….xml')`` -> ``doc('file:///…')``: the stylesheet lives in the cache,
        the value sets beside the top-level schematron (the generated one in the cache)."""
        def absolute(m) -> str:
            ref = m.group(1)
            if ":" in ref:  # already a URI
                return m.group(0)
            target = (sch.parent / ref).resolve()
            if not target.exists() and missing is not None and Path(ref).name == MISSING_VOC:
                target = missing
            return m.group(0).replace(ref, target.as_uri())

        for el in gen.iter():
            if isinstance(el.tag, str):
                for k, v in el.attrib.items():
                    if "doc" in v:
                        el.set(k, res.DOC_RE.sub(absolute, v))

    def _processor(self):
        if self._proc is None:
            from saxonche import PySaxonProcessor

            self._proc = PySaxonProcessor(license=False)
        return self._proc

    def _compile(self) -> dict[str, Any]:
        if self._executables is None:
            with self._lock:
                if self._executables is None:
                    xp = self._processor().new_xslt30_processor()
                    exes = {}
                    for name in self.profiles:
                        t0 = time.perf_counter()
                        path = self._generated_xslt(name)
                        t1 = time.perf_counter()
                        exes[name] = xp.compile_stylesheet(stylesheet_file=str(path))
                        t2 = time.perf_counter()
                        self.compile_timings[f"{name}_generate_s"] = t1 - t0
                        self.compile_timings[f"{name}_compile_s"] = t2 - t1
                    self._executables = exes
        return self._executables

    def warm_up(self) -> None:
        self.schema
        self._compile()

    # --------------------------------------------------------------- public
    def validate(self, cda_bytes: bytes, *, schematron: bool = True) -> ValidationReport:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        try:
            tree = parse_cda(cda_bytes)
        except etree.XMLSyntaxError as exc:
            return ValidationReport(False, [{"line": exc.lineno, "message": f"not well-formed: {exc.msg}"}],
                                    timings={"parse_ms": (time.perf_counter() - t0) * 1000})
        except DoctypeNotAllowed as exc:
            return ValidationReport(False, [{"line": 1, "message": str(exc)}],
                                    timings={"parse_ms": (time.perf_counter() - t0) * 1000})
        timings["parse_ms"] = (time.perf_counter() - t0) * 1000
        t1 = time.perf_counter()
        schema = self.schema
        try:
            ok = schema.validate(tree)
            xsd_errors = [{"line": e.line, "message": e.message} for e in schema.error_log] if not ok else []
        except etree.XMLSchemaValidateError as exc:  # libxml2 could not validate this tree at all
            ok, xsd_errors = False, [{"line": None, "message": f"XSD validation could not run: {exc}"}]
        timings["xsd_ms"] = (time.perf_counter() - t1) * 1000
        failures: list[dict[str, Any]] = []
        warnings: list[dict[str, Any]] = []
        if schematron:
            exes = self._compile()
            t2 = time.perf_counter()
            xml_text = etree.tostring(tree.getroot(), encoding="unicode")
            with self._lock:  # one Saxon processor; keep transforms serialized
                node = self._proc.parse_xml(xml_text=xml_text)
                outputs = {name: exe.transform_to_string(xdm_node=node) for name, exe in exes.items()}
            for name, svrl in outputs.items():
                f, w = _read_svrl(svrl, name)
                failures += f
                warnings += w
            timings["schematron_ms"] = (time.perf_counter() - t2) * 1000
        return ValidationReport(ok and not failures, xsd_errors, failures, warnings, timings)


def _read_svrl(svrl: str, profile: str) -> tuple[list[dict], list[dict]]:
    failures: list[dict] = []
    warnings: list[dict] = []
    root = etree.fromstring(svrl.encode("utf-8"), safe_parser())
    for el in root.iter(f"{{{SVRL_NS}}}failed-assert", f"{{{SVRL_NS}}}successful-report"):
        text = " ".join("".join(t.itertext()) for t in el.iter(f"{{{SVRL_NS}}}text")).strip()
        item = {"id": el.get("id") or el.get("test", ""), "location": el.get("location", ""),
                "text": " ".join(text.split()), "profile": profile}
        role = (el.get("role") or "error").lower()
        (warnings if role in ("warning", "warn", "info", "information") else failures).append(item)
    return failures, warnings


def _write_atomic(path: Path, data: bytes) -> None:
    """Readers (another engine or CLI sharing the data directory) never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


# ------------------------------------------------------------------ one validator per process
_settings: tuple[str | None, str | None] = (None, None)
_shared: CdaValidator | None = None
_shared_lock = threading.Lock()


def configure(resources_dir: str | os.PathLike | None = None,
              cache_dir: str | os.PathLike | None = None) -> dict:
    """Where the process's validator reads its resources (None: packaged) and caches what it
    generates (None: :func:`default_cache_dir`); checks the folder and returns its version info.
    The validator itself is built (and compiled) on first use."""
    global _settings, _shared
    found = res.open_resources(resources_dir)
    with _shared_lock:
        settings = (str(found.root), str(cache_dir) if cache_dir else None)
        if settings != _settings:
            _settings, _shared = settings, None
    return found.info()


def shared_validator() -> CdaValidator:
    """The validator :func:`configure` describes (packaged resources and the default cache if it
    was never called); compiled once per process (the schematrons take about 12 s)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = CdaValidator(_settings[0], cache_dir=_settings[1])
        return _shared
