"""CDA validation resources packaged with the engine: what ships, its version, and that an engine
installed away from ../shared validates CI-SIS documents with them.

The corpus (and the ANS release the subset was taken from) still comes from ../shared.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.cda import resources as res
from engine.cda.resources import PACKAGED
from tests.conftest import CORPUS, ROOT, SPECS
from tests.enginectl import EngineProcess, free_port

ANS_RELEASE = SPECS / "cisis-cda"
REF_N1 = CORPUS / "cda" / "IMG_CR_IMG_2024.01_CDA-R2-Niveau-1.xml"
OWN_FILES = {"README.md", "version.json", "MANIFEST"}  # written for mini-PFI, not ANS files


def _shipped() -> set[str]:
    return {p.relative_to(PACKAGED).as_posix() for p in PACKAGED.rglob("*") if p.is_file()}


def test_packaged_files_are_exactly_the_closure_of_the_profiles():
    files, missing = res.closure(PACKAGED)
    assert _shipped() - OWN_FILES == set(files)
    # the one upstream defect the validator works around (include dropped, value set generated)
    assert missing == ["schematrons/profils/IHE.sch: ../include/entrees/E_directiveAnticipee_int.sch"]
    assert res.J07 in files and "infrastructure/cda/general/voc.xsd" in files
    assert not any(f.endswith("voc-UCUM.xml") or "/CI-SIS_" in f for f in files)
    assert sum((PACKAGED / f).stat().st_size for f in files) < 4_000_000


def test_packaged_subset_is_the_ans_release_unchanged(tmp_path):
    copied = res.copy_subset(ANS_RELEASE, tmp_path)
    assert set(copied) == _shipped() - OWN_FILES
    for f in copied:
        assert (PACKAGED / f).read_bytes() == (ANS_RELEASE / f).read_bytes(), f


def test_manifest_lists_every_shipped_file_with_its_sha256():
    lines = (PACKAGED / "MANIFEST").read_text().splitlines()
    listed = {}
    for line in lines:
        digest, name = line.split("  ", 1)
        listed[name] = digest
    assert set(listed) == _shipped() - {"MANIFEST"}
    for name, digest in listed.items():
        assert hashlib.sha256((PACKAGED / name).read_bytes()).hexdigest() == digest, name


def test_version_file_and_readme():
    info = res.open_resources().info()
    assert info == {"version": json.loads((PACKAGED / "version.json").read_text())["version"],
                    "source": "packaged"}
    assert "1.16" in info["version"] and "2024-12-10" in info["version"]
    readme = (PACKAGED / "README.md").read_text()
    for needle in ("ANS", "Modèles de contenus CDA", "github.com/ansforge/TestContenuCDA-3-0",
                   "## Version", "## Licence", "Health Level Seven", "W3C Software License"):
        assert needle in readme, needle


def test_another_folder_reports_its_path_and_a_missing_one_is_refused(tmp_path):
    folder = tmp_path / "cisis-2099"
    shutil.copytree(PACKAGED, folder)
    (folder / "version.json").unlink()
    assert res.open_resources(folder).info() == {"version": "unknown", "source": str(folder.resolve())}
    with pytest.raises(res.ResourcesError, match="CDA_extended.xsd"):
        res.open_resources(tmp_path / "nothing-here")
    routes = tmp_path / "etc" / "routes.yaml"
    assert res.configured_folder("../cisis-2099", routes) == tmp_path / "etc" / "../cisis-2099"
    assert res.configured_folder(None, routes) is None


def test_a_newer_release_folder_is_the_one_validating(tmp_path):
    """A release whose Confidentiality value set lost "N": the reference N1 now fails, so the
    validator read the configured folder, and its stylesheet has another cache key."""
    from engine.cda.validation import CdaValidator

    folder = tmp_path / "release"
    shutil.copytree(PACKAGED, folder)
    voc = folder / "schematrons/profils/structurationMinimale/include/voc-2.16.840.1.113883.1.11.10228-DYNAMIC.xml"
    text = voc.read_text(encoding="utf-8")
    stripped = re.sub(r'<concept code="N"[^>]*?(/>|>.*?</concept>)', "", text, count=1, flags=re.S)
    assert stripped != text
    voc.write_text(stripped, encoding="utf-8")
    cache = tmp_path / "cache"
    v = CdaValidator(folder, cache_dir=cache, profiles=("structurationMinimale",))
    report = v.validate(REF_N1.read_bytes())
    assert not report.valid
    assert any("onfidentiality" in f["text"] for f in report.schematron_failures), report.schematron_failures[:3]
    assert v._cache_key("structurationMinimale") != CdaValidator(cache_dir=cache)._cache_key("structurationMinimale")
    assert list(cache.glob("structurationMinimale-*.xsl")) and not list(folder.rglob("*.xsl"))


def test_fresh_install_without_shared_validates_a_cisis_document(tmp_path):
    """The repository's files copied where no ``shared`` folder is beside them: the CLI validates
    the reference N1 (XSD and both schematron profiles ran) and a broken copy, caching under
    --data-dir, with nothing from ../shared."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    repo = tmp_path / "install" / "mini-pfi"
    for name in filter(None, listed.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, repo / name)
    assert not (repo.parent / "shared").exists() and not (repo.parent.parent / "shared").exists()
    good = REF_N1.read_bytes()
    (repo / "n1.xml").write_bytes(good)
    (repo / "broken.xml").write_bytes(re.sub(rb"<recordTarget>.*?</recordTarget>", b"", good, count=1, flags=re.S))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINIPFI_")}
    env["PYTHONPATH"] = str(repo)

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=repo, env=env, capture_output=True, text=True,
                              timeout=120)

    where = run("-c", "import engine.cda.validation as v, engine.cda.resources as r; print(v.__file__); print(r.PACKAGED)")
    assert where.stdout.splitlines() == [str(repo / "engine/cda/validation.py"), str(repo / "engine/cda/resources")]
    # the CLI's own code path, twice in one process (one schematron compilation, about 10 s)
    t0 = time.perf_counter()
    out = run("-c", "from engine.cli import main\n"
                    "for name in ('n1.xml', 'broken.xml'):\n"
                    "    print('rc', main(['cda', 'validate', name, '--json', '--data-dir', 'data']), '\\x1e')\n")
    assert out.returncode == 0, out.stderr[-2000:]
    (good_json, rc_good), (bad_json, rc_bad) = [part.rsplit("rc ", 1) for part in out.stdout.split("\x1e")[:2]]
    assert (rc_good.strip(), rc_bad.strip()) == ("0", "1")
    rep = json.loads(good_json)
    assert rep["valid"] and rep["xsd_errors"] == [] and rep["schematron_failures"] == []
    assert rep["timings"]["xsd_ms"] > 0 and rep["timings"]["schematron_ms"] > 0
    bad = json.loads(bad_json)
    assert not bad["valid"] and any("recordTarget" in f["text"] for f in bad["schematron_failures"])
    xsl = sorted(p.name.split("-")[0] for p in (repo / "data" / "cache" / "cda").glob("*.xsl"))
    assert xsl == ["IHE", "structurationMinimale"]  # cached under --data-dir
    print(f"\n[fresh install] cold cache, two validations: {time.perf_counter() - t0:.1f} s")


def test_status_and_version_name_the_resources_routes_yaml_points_to(tmp_path):
    folder = tmp_path / "cisis"
    shutil.copytree(PACKAGED, folder)
    (folder / "version.json").write_text('{"version": "CI-SIS test release"}')
    status_port = free_port()
    eng = EngineProcess(tmp_path, f"""
        engine:
          cda_resources: cisis
          status: {{port: {status_port}}}
        """, status_port=status_port).start()
    try:
        assert eng.status()["cda_resources"] == {"version": "CI-SIS test release", "source": str(folder)}
    finally:
        assert eng.stop() == 0
    out = json.loads(eng.cli("version", "--json", "--config", str(eng.config)).stdout)
    assert out["cda_resources"] == {"version": "CI-SIS test release", "source": str(folder)}
    packaged = json.loads(eng.cli("version", "--json").stdout)["cda_resources"]
    assert packaged["source"] == "packaged" and packaged["version"] != "CI-SIS test release"


def test_engine_refuses_a_resources_folder_without_the_files(tmp_path):
    eng = EngineProcess(tmp_path, f"""
        engine:
          cda_resources: no-such-folder
          status: {{port: {free_port()}}}
        """)
    eng.start(wait_ready=False)
    assert eng.proc.wait(timeout=30) == 2
    log = eng.log_text()
    assert "engine.cda_resources" in log and "CDA_extended.xsd" in log
