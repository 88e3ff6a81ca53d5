"""1:N identification metrics of an IJB release (numpy only): TPIR at FPIR and the CMC's top-k, per gallery and
their mean, from the L2-normalised template vectors the 1:1 protocol pools (bnport.data.ijb.pool_templates).

The rule, as the corrected insightface scripts use it. A probe template's score against a gallery subject is the
best cosine over that subject's gallery templates (each gallery template is one subject). A probe whose subject is in
the gallery is mated, the others are non-mated. At FPIR f the threshold is the non-mated probes' best gallery scores
sorted high to low, taken at index max(int(N_nonmated * f) - 1, 0); TPIR is the share of mated probes whose mate
scores higher than every other gallery subject and higher than that threshold. A mated probe's rank is 1 plus the
number of other subjects scoring at least as high as its mate (a tie is not a hit), and top-k is the share of mated
probes ranked k or better.
"""
from __future__ import annotations

import numpy as np

from bnport.data.ijb_1n import IdentificationProtocol, TemplateSet
from bnport.score.table import fpr_label

FPIRS = (1e-2, 1e-1)
RANKS = (1, 5, 10)
PROTOCOL = "1:N, mixed probes (open set: TPIR at FPIR; closed set: CMC top-k over mated probes)"


def _rows(template_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    rows = np.searchsorted(template_ids, ids)
    if np.any(rows >= len(template_ids)) or not np.array_equal(template_ids[rows.clip(max=len(template_ids) - 1)],
                                                                 ids):
        raise ValueError("a 1:N template has no pooled vector")
    return rows


def subject_scores(probes: np.ndarray, gallery: np.ndarray, gallery_subjects: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(probes x subjects best cosine, the subjects in column order) from probe and gallery template vectors."""
    subjects, column = np.unique(gallery_subjects, return_inverse=True)
    cosines = probes @ gallery.T
    if len(subjects) == len(gallery_subjects):  # one template per subject (IJB's galleries): a permutation
        order = np.empty(len(column), dtype=np.int64)
        order[column] = np.arange(len(column))
        return cosines[:, order], subjects
    scores = np.full((len(probes), len(subjects)), -np.inf)
    for j in range(len(gallery_subjects)):  # several templates of one subject: it keeps its best
        np.maximum(scores[:, column[j]], cosines[:, j], out=scores[:, column[j]])
    return scores, subjects


def gallery_metrics(vectors: np.ndarray, template_ids: np.ndarray, gallery: TemplateSet, probes: TemplateSet, *,
                    fpirs=FPIRS, ranks=RANKS, chunk: int = 4096) -> dict:
    """TPIR at each FPIR, its threshold, and top-k for one gallery, with the mated and non-mated probe counts.
    Probes are scored `chunk` at a time (memory: chunk x gallery subjects x 8 bytes)."""
    g = vectors[_rows(template_ids, gallery.templates)]
    probe_rows = _rows(template_ids, probes.templates)
    subjects = np.unique(gallery.subjects)
    mated = np.isin(probes.subjects, subjects)
    best_nonmated, mate, rank = [], [], []
    for start in range(0, len(probe_rows), chunk):
        scores, _ = subject_scores(vectors[probe_rows[start:start + chunk]], g, gallery.subjects)
        is_mated = mated[start:start + chunk]
        best_nonmated.append(scores[~is_mated].max(axis=1, initial=-np.inf))
        column = np.searchsorted(subjects, probes.subjects[start:start + chunk][is_mated])
        mated_scores = scores[is_mated]
        mate_score = mated_scores[np.arange(len(column)), column]
        mate.append(mate_score)
        rank.append((mated_scores >= mate_score[:, None]).sum(axis=1))  # the mate and every subject at least as high
    best_nonmated = np.sort(np.concatenate(best_nonmated))[::-1]
    mate, rank = np.concatenate(mate), np.concatenate(rank)
    out = {"mated": int(mated.sum()), "nonmated": int((~mated).sum()), "tpir": {}, "thresholds": {}, "top": {}}
    for f in fpirs:
        label = fpr_label(f)
        threshold = float(best_nonmated[max(int(len(best_nonmated) * f) - 1, 0)]) if len(best_nonmated) else -np.inf
        out["tpir"][label] = float(((rank == 1) & (mate > threshold)).mean()) if len(mate) else float("nan")
        out["thresholds"][label] = threshold if np.isfinite(threshold) else None
    for k in ranks:
        out["top"][str(k)] = float((rank <= k).mean()) if len(mate) else float("nan")
    return out


def identification_metrics(vectors: np.ndarray, template_ids: np.ndarray, protocol: IdentificationProtocol, *,
                           fpirs=FPIRS, ranks=RANKS) -> dict:
    """Per gallery (by name) and "mean" over the galleries: TPIR at each FPIR and top-k (fractions), with the
    protocol named under "protocol"."""
    per = {name: gallery_metrics(vectors, template_ids, gallery, protocol.probes, fpirs=fpirs, ranks=ranks)
           for name, gallery in protocol.galleries.items()}
    mean = {"tpir": {label: float(np.mean([m["tpir"][label] for m in per.values()])) for label in
                     next(iter(per.values()))["tpir"]},
            "top": {k: float(np.mean([m["top"][k] for m in per.values()])) for k in next(iter(per.values()))["top"]}}
    return {"protocol": PROTOCOL, "galleries": per, "mean": mean}
