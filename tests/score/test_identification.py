"""1:N identification (bnport.score.identification, bnport.data.ijb_1n): the metrics against a direct computation of
the rule as the corrected insightface scripts state it (loops over probes, no vectorisation), a hand-worked case,
the protocol reader's refusals, and the 1:N table, JSON and selection of `bnport score` on a tiny release."""
from __future__ import annotations

import json

import numpy as np
import pytest

from bnport.data.ijb_1n import IdentificationProtocol, TemplateSet, read_identification
from bnport.errors import BnportError
from bnport.score.identification import identification_metrics
from tests.helpers.ijb import make_release, write_identification


def _direct(vectors, ids, gallery_t, gallery_s, probe_t, probe_s, fpir, k):
    """The rule written out probe by probe."""
    row = {t: i for i, t in enumerate(ids)}
    subjects = sorted(set(gallery_s))
    best_nonmated, mated = [], []
    for t, s in zip(probe_t, probe_s):
        per_subject = {u: max(float(vectors[row[t]] @ vectors[row[g]]) for g, gs in zip(gallery_t, gallery_s)
                              if gs == u) for u in subjects}
        if s in per_subject:
            mate = per_subject[s]
            others = [v for u, v in per_subject.items() if u != s]
            rank = 1 + sum(v >= mate for v in others)
            mated.append((mate, rank, max(others, default=-np.inf)))
        else:
            best_nonmated.append(max(per_subject.values()))
    ordered = sorted(best_nonmated, reverse=True)
    threshold = ordered[max(int(len(ordered) * fpir) - 1, 0)]
    tpir = np.mean([m[1] == 1 and m[0] > threshold for m in mated])
    top = np.mean([m[1] <= k for m in mated])
    return tpir, top


def test_metrics_equal_the_rule_computed_probe_by_probe():
    rng = np.random.default_rng(0)
    ids = np.arange(1000, 1300)
    vectors = rng.normal(size=(300, 16))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    gallery_t = ids[:60]
    gallery_s = np.r_[np.arange(50), np.arange(10)]  # subjects 0-9 hold two gallery templates each
    probe_t = ids[100:300]
    probe_s = rng.integers(0, 120, 200)  # about 40% of the probes have a mate in the gallery
    for k in range(len(probe_t)):  # mated probes resemble one of their subject's gallery templates
        if probe_s[k] < 50:
            vectors[100 + k] = vectors[int(probe_s[k])] + rng.normal(0, 0.9, 16)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    protocol = IdentificationProtocol({"G1": TemplateSet(gallery_t, gallery_s)}, TemplateSet(probe_t, probe_s))
    got = identification_metrics(vectors, ids, protocol, fpirs=(1e-2, 1e-1, 0.3), ranks=(1, 5))
    for fpir, label in ((1e-2, "1e-2"), (1e-1, "1e-1"), (0.3, "3e-1")):
        for k in (1, 5):
            tpir, top = _direct(vectors, ids, gallery_t, gallery_s, probe_t, probe_s, fpir, k)
            assert got["galleries"]["G1"]["tpir"][label] == pytest.approx(tpir, abs=1e-12)
            assert got["galleries"]["G1"]["top"][str(k)] == pytest.approx(top, abs=1e-12)
    assert 0 < got["mean"]["tpir"]["1e-1"] < got["mean"]["top"]["5"] <= 1
    assert got["galleries"]["G1"]["mated"] == int((probe_s < 50).sum())


def test_a_hand_worked_case_and_the_mean_over_galleries():
    # unit vectors at angles: probe P1 (subject 1) near gallery A (subject 1); P2 (subject 9, not in the gallery)
    angle = np.radians([0, 90, 10, 60, 180])
    vectors = np.stack([np.cos(angle), np.sin(angle)], axis=1)  # templates 1..5
    ids = np.arange(1, 6)
    g1 = TemplateSet(np.array([1, 2]), np.array([1, 2]))  # A: subject 1 at 0 deg, B: subject 2 at 90 deg
    g2 = TemplateSet(np.array([2, 5]), np.array([1, 2]))  # subject 1 now at 90 deg, subject 2 at 180 deg
    probes = TemplateSet(np.array([3, 4]), np.array([1, 9]))  # P1 at 10 deg (subject 1), P2 at 60 deg (non-mated)
    got = identification_metrics(vectors, ids, IdentificationProtocol({"G1": g1, "G2": g2}, probes))
    # G1: P2's best is cos 30 deg = 0.866 (threshold); P1's mate scores cos 10 = 0.985 > 0.866, beats B: a hit
    assert got["galleries"]["G1"]["tpir"]["1e-2"] == 1.0 and got["galleries"]["G1"]["top"]["1"] == 1.0
    assert got["galleries"]["G1"]["thresholds"]["1e-2"] == pytest.approx(np.cos(np.radians(30)))
    # G2: P1's mate (90 deg) scores cos 80 = 0.17 below P2's best (cos 30): rank 1 but under the threshold
    assert got["galleries"]["G2"]["top"]["1"] == 1.0 and got["galleries"]["G2"]["tpir"]["1e-2"] == 0.0
    assert got["mean"]["tpir"]["1e-2"] == 0.5 and got["mean"]["top"]["1"] == 1.0


def test_reader_refuses_partial_conflicting_and_foreign_protocols(tmp_path):
    root = tmp_path / "IJBC"
    make_release(root)
    templates = np.array([101, 102, 103, 104, 105])
    assert read_identification(root, "ijbc", templates) is None  # no 1:N files: a 1:1 release
    write_identification(root)
    protocol = read_identification(root, "ijbc", templates)
    assert list(protocol.galleries) == ["G1", "G2"] and list(protocol.probes.templates) == [104, 103, 105]
    assert list(protocol.galleries["G1"].subjects) == [1, 2] and len(protocol.sha256) == 3
    (root / "meta" / "ijbc_1N_gallery_G2.csv").unlink()
    with pytest.raises(BnportError, match="incomplete: .*G2.csv missing"):
        read_identification(root, "ijbc", templates)
    write_identification(root, galleries={"G1": [(101, 1), (101, 7)], "G2": [(103, 3)]})
    with pytest.raises(BnportError, match="template 101 is given subject 7, and subject 1 on line 2"):
        read_identification(root, "ijbc", templates)
    write_identification(root, galleries={"G1": [(101, 1), (999, 2)], "G2": [(103, 3)]})
    with pytest.raises(BnportError, match="template 999 has no images in the face list"):
        read_identification(root, "ijbc", templates)


def test_score_reports_1n_and_selects_by_tpir(tmp_path):
    from bnport.export import ExportSettings, export_onnx
    from bnport.model.arch import create_model
    from bnport.score import ScoreSettings, score
    from tests.helpers.models import realistic_bn

    root = tmp_path / "IJBC"
    make_release(root)
    write_identification(root)
    onnx_file = tmp_path / "m.onnx"
    assert export_onnx(realistic_bn(create_model("iresnet_tiny")), onnx_file, ExportSettings(exporter="torchscript"),
                       device="cpu")
    result = score([str(onnx_file)], ScoreSettings.of([f"ijbc:{root}"], fprs="1e-1", select="tpir@1e-1,bench=IJBC",
                                                      cache_dir=tmp_path / "cache"),
                   out=tmp_path / "out", device="cpu", progress=False, log=lambda m: None)
    (ijb,) = result.table.results
    assert set(ijb.identification["galleries"]) == {"G1", "G2"}
    assert "1:N identification (%)" in str(result) and "TPIR@1e-2" in str(result)
    assert result.selection.rule.short() == "tpir@1e-1" and result.selection.selected is not None
    saved = json.loads((tmp_path / "out" / "table.json").read_text())
    assert saved["results"][0]["identification"]["mean"]["tpir"]["1e-1"] == ijb.identification["mean"]["tpir"]["1e-1"]
    assert saved["benches"][0]["identification"]["probes"] == 3
    with pytest.raises(BnportError, match="TPIR is reported at FPIR 1e-2 and 1e-1"):
        ScoreSettings.of([f"ijbc:{root}"], select="tpir@1e-3")
