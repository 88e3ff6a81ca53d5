"""The 1:N identification protocol of an IJB release: two galleries and the mixed probe set, each a CSV in `meta/`
with a header and one row per image, TEMPLATE_ID and SUBJECT_ID first, more columns after (`ijbc_1N_gallery_G1.csv`,
`ijbc_1N_gallery_G2.csv`, `ijbc_1N_probe_mixed.csv`; IJB-B's galleries are S1 and S2). The templates are those of
the release's face list, so their features are the 1:1 protocol's pooled template vectors. A release without these
files has no 1:N protocol; one with only some of them is an error naming what is missing.
"""
from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bnport.errors import BnportError

GALLERIES = {"ijbc": ("G1", "G2"), "ijbb": ("S1", "S2")}
_HINT = "restore the 1:N files from the IJB release's meta/ folder, or remove them all to score 1:1 only"


def protocol_files(kind: str) -> dict[str, str]:
    """The 1:N CSV file names of a release of `kind`, by role: each gallery's name, then "probe"."""
    names = {gallery: f"{kind}_1N_gallery_{gallery}.csv" for gallery in GALLERIES[kind]}
    return {**names, "probe": f"{kind}_1N_probe_mixed.csv"}


@dataclass
class TemplateSet:
    """Templates of one gallery or of the probes: their ids and each one's subject (one entry per template)."""

    templates: np.ndarray
    subjects: np.ndarray


@dataclass
class IdentificationProtocol:
    """The galleries (by name, in protocol order) and the probes; `sha256` of each CSV as read."""

    galleries: dict[str, TemplateSet]
    probes: TemplateSet
    sha256: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict:
        return {"galleries": {name: {"templates": len(g.templates), "subjects": int(np.unique(g.subjects).size)}
                              for name, g in self.galleries.items()},
                "probes": len(self.probes.templates)}


def read_identification(root: str | Path, kind: str, templates: np.ndarray) -> IdentificationProtocol | None:
    """The release's 1:N protocol, or None when it has none of the files. Every row is checked: two integer ids
    first, one subject per template, and every template among the face list's `templates`."""
    meta = Path(root) / "meta"
    files = {role: meta / name for role, name in protocol_files(kind).items()}
    present = {role: path for role, path in files.items() if path.is_file()}
    if not present:
        return None
    missing = [str(path) for role, path in files.items() if role not in present]
    if missing:
        raise BnportError(f"the 1:N protocol of {root} is incomplete: {', '.join(missing)} missing", _HINT)
    known = np.unique(templates)
    sets, sha = {}, {}
    for role, path in files.items():
        data = path.read_bytes()
        sha[path.name] = hashlib.sha256(data).hexdigest()
        sets[role] = _read_set(path, data, known)
    probes = sets.pop("probe")
    return IdentificationProtocol(galleries=sets, probes=probes, sha256=sha)


def _read_set(path: Path, data: bytes, known: np.ndarray) -> TemplateSet:
    """One CSV: per template (first seen order) its subject; an error naming the line for a bad row, a template
    given two subjects, or one the face list does not have."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BnportError(f"{path} is not a text file", _HINT) from None
    subject_of: dict[int, int] = {}
    line_of: dict[int, int] = {}
    for number, row in enumerate(csv.reader(io.StringIO(text)), 1):
        if number == 1 or not row or not "".join(row).strip():
            continue  # the header, and blank lines
        try:
            template, subject = int(row[0]), int(row[1])
        except (ValueError, IndexError):
            raise BnportError(f"{path} line {number}: expected TEMPLATE_ID,SUBJECT_ID,... (integers), got "
                              f"{','.join(row)[:80]!r}", _HINT) from None
        if subject_of.setdefault(template, subject) != subject:
            raise BnportError(f"{path} line {number}: template {template} is given subject {subject}, and subject "
                              f"{subject_of[template]} on line {line_of[template]}", _HINT)
        line_of.setdefault(template, number)
    if not subject_of:
        raise BnportError(f"{path} has no rows", _HINT)
    ids = np.fromiter(subject_of, dtype=np.int64, count=len(subject_of))
    unknown = ids[~np.isin(ids, known)]
    if unknown.size:
        template = int(unknown[0])
        raise BnportError(f"{path} line {line_of[template]}: template {template} has no images in the face list",
                          "the 1:N files and the face/template/media file come from different releases")
    return TemplateSet(templates=ids, subjects=np.fromiter(subject_of.values(), dtype=np.int64, count=len(ids)))
