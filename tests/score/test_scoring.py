"""Tests for `bnport score`: a real calibration run scored on a real insightface .bin pack and a pairs.csv, checked
against PyTorch embeddings computed independently, the export cache, selection, the handoff bundle, and bad input."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from bnport.cli import cli
from bnport.errors import BnportError
from bnport.export.settings import ExportSettings
from bnport.model.options import ModelOptions
from bnport.model.snapshot import load_snapshot_model
from bnport.score import ScoreSettings, score
from tests.helpers.benchdata import write_bin_pack, write_pairs_csv
from tests.helpers.runs import copy_run

FPRS = "1e-3,1e-2,1e-1"


@pytest.fixture(scope="module")
def world(tmp_path_factory, shared_ema_run):
    """A run of iresnet_tiny with trained-looking BN (weights file), 4 snapshots, a .bin pack and a pairs.csv: a copy
    of the shared EMA run, since scoring writes its exports into the run."""
    root = copy_run(shared_ema_run, tmp_path_factory.mktemp("score") / "world")
    write_bin_pack(root / "lfw.bin", 40)
    write_pairs_csv(root / "pairs", 24)
    return root


def _score(world, out, *, export=None, **settings):
    """Score the world's run on its .bin pack; `settings`: ScoreSettings.of's (fprs FPRS unless given)."""
    settings.setdefault("fprs", FPRS)
    return score([str(world / "run")],
                 ScoreSettings.of([str(world / "lfw.bin")], cache_dir=world / "cache", **settings),
                 export=export or ExportSettings(exporter="torchscript"), out=out, device="cpu", progress=False,
                 log=lambda m: None)


@pytest.fixture(scope="module")
def scored(world):
    return _score(world, world / "out")


def _torch_scores(snapshot: Path, bins: list[bytes]) -> np.ndarray:
    """Cosine per pair from PyTorch in float64: PIL decode, insightface normalisation, image + flip, L2."""
    loaded = load_snapshot_model(snapshot)
    module = loaded.module.double().eval()
    images = np.stack([np.asarray(Image.open(__import__("io").BytesIO(b)).convert("RGB")) for b in bins])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255.0
    x = (x - 0.5) / 0.5
    with torch.no_grad():
        features = (module(x) + module(torch.flip(x, dims=[3]))).numpy()
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    return np.einsum("ij,ij->i", features[0::2], features[1::2])


def test_score_run_scores_every_snapshot_against_independent_pytorch(world, scored):
    labels = [c.label for c in scored.candidates]
    assert labels == ["0000 (baseline)", "0001", "0002", "0003"]
    assert all(c.passed for c in scored.candidates)
    bins, _ = __import__("pickle").load(open(world / "lfw.bin", "rb"))
    for c in scored.candidates:
        npy = np.load(scored.out_dir / "scores" / f"{c.snapshot.id}__lfw.npy")
        assert npy.dtype == np.float64 and npy.shape == (40,)
        np.testing.assert_allclose(npy, _torch_scores(c.snapshot.tensors, bins), atol=2e-5)


def test_tpr_cells_match_a_brute_force_over_thresholds(world, scored):
    _, issame = __import__("pickle").load(open(world / "lfw.bin", "rb"))
    labels = np.asarray(issame)
    for result in scored.table.results:
        scores = np.load(result.scores_file)
        for fpr in (1e-3, 1e-2, 1e-1):
            best = 0.0
            for t in np.unique(scores):
                far = (scores[~labels] >= t).mean()
                if far <= fpr:
                    best = max(best, (scores[labels] >= t).mean())
            key = f"{int(fpr / 10 ** np.floor(np.log10(fpr)))}e{int(np.floor(np.log10(fpr)))}"
            assert result.tpr["strict"][key] == pytest.approx(best)
            assert result.noisy[key] == (20 < 10 / fpr)
        assert result.n_genuine == 20 and result.n_impostor == 20
        assert result.accuracy is not None and 0 <= result.accuracy[0] <= 100


def test_snapshots_after_the_first_reuse_its_graph_and_pass_parity(scored):
    hows = [c.how for c in scored.candidates]
    assert hows[0] == "full export"
    assert hows[1:] == ["graph reused"] * 3
    for c in scored.candidates:
        assert c.parity["passed"]
        meta = {p.key: p.value for p in onnx.load(str(c.onnx)).metadata_props}
        assert meta["snapshot_id"] == c.snapshot.id
        assert json.loads(meta["parity"])["passed"]


def test_reused_graph_equals_a_full_export(world, scored, tmp_path):
    from bnport.export.onnx_export import export_model
    from bnport.runtime.sessions import create_session

    reused = scored.candidates[2]
    full = tmp_path / "full.onnx"
    assert export_model(str(reused.snapshot.tensors), full, settings=ExportSettings(exporter="torchscript"),
                        device="cpu")
    x = np.random.default_rng(0).normal(size=(3, 3, 112, 112)).astype(np.float32)
    a = create_session(reused.onnx, device="cpu").run(x)
    b = create_session(full, device="cpu").run(x)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_scoring_again_exports_and_embeds_nothing(world, scored):
    stamps = {p: p.stat().st_mtime_ns for p in (world / "run" / "exports").iterdir()}
    again = _score(world, world / "out")
    assert [c.how for c in again.candidates] == ["cached full export"] + ["cached graph reused"] * 3
    assert {p: p.stat().st_mtime_ns for p in (world / "run" / "exports").iterdir()} == stamps
    for a, b in zip(again.table.results, scored.table.results):
        assert a.tpr == b.tpr and a.accuracy == b.accuracy


def test_handoff_bundle_is_complete_and_says_what_it_is(scored):
    bundle = scored.handoff
    assert sorted(p.name for p in bundle.iterdir()) == ["model.json", "model.onnx", "report.md"]
    card = json.loads((bundle / "model.json").read_text())
    data = (bundle / "model.onnx").read_bytes()
    assert card["model"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert card["model"]["label"] == scored.selection.selected
    assert card["input"]["name"] == "data" and card["input"]["shape"][1:] == [3, 112, 112]
    assert card["provenance"]["weights_sha256"] and card["provenance"]["run"]
    assert card["selection"]["rule"] == "strict:tpr@1e-4" or card["selection"]["bench"] == "lfw"
    assert card["parity"]["passed"]
    meta = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
    assert json.loads(meta["selection"])["selected"] == scored.selection.selected
    assert "lfw" in json.loads(meta["scores"])
    report = (bundle / "report.md").read_text()
    assert "## Selection" in report and "| model |" in report and "bnport score" in report


def test_preprocessing_example_in_the_card_gives_the_scored_embedding(world, scored, tmp_path, monkeypatch):
    import cv2

    from bnport.runtime.sessions import create_session
    from bnport.score.embed import to_network_input

    card = json.loads((scored.handoff / "model.json").read_text())
    image = np.asarray(Image.open(world / "calib" / "id00" / "img000.jpg").convert("RGB"))
    cv2.imwrite(str(tmp_path / "face.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    shutil.copy(scored.handoff / "model.onnx", tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    code = "\n".join(card["input"]["preprocessing_example"][:-1])
    namespace: dict = {}
    exec(code, namespace)  # noqa: S102 - the card's own example, run as a user would
    decoded = cv2.cvtColor(cv2.imread("face.jpg"), cv2.COLOR_BGR2RGB)
    spec = scored.candidates[0].input_spec
    ours = create_session(tmp_path / "model.onnx", device="cpu").run(to_network_input(decoded[None], spec))[0]
    np.testing.assert_allclose(namespace["embedding"], ours / np.linalg.norm(ours), atol=1e-5)


def test_cli_score_prints_the_table_and_writes_the_outputs(world, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(cli, ["score", str(world / "run"), "--bench", str(world / "lfw.bin"),
                                      "--bench", f"pairs:{world / 'pairs' / 'pairs.csv'}", "--out", str(out),
                                      "--cache-dir", str(world / "cache"), "--device", "cpu", "--exporter",
                                      "torchscript", "--fpr", FPRS, "--select", "tpr@1e-1,bench=pairs",
                                      "--guard", "5"])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "TPR (%) at FPR, strict rule" in text and "insightface rule" in text
    assert "lfw (bin, 80 images" in text and "pairs (pairs" in text
    assert "selection rule: TPR@FPR=1e-1 (strict rule" in text and "on pairs" in text
    assert f"handoff bundle: {out / 'handoff'}" in text
    assert (out / "table.txt").read_text().startswith("onnxruntime providers: CPUExecutionProvider")
    table = json.loads((out / "table.json").read_text())
    assert {r["bench"] for r in table["results"]} == {"lfw", "pairs"}
    assert np.load(out / "scores" / "0002__pairs.npy").shape == (24,)


def test_cli_json(world, tmp_path):
    result = CliRunner().invoke(cli, ["score", str(world / "run" / "snapshots" / "0002.safetensors"), "--bench",
                                      str(world / "lfw.bin"), "--out", str(tmp_path / "j"), "--cache-dir",
                                      str(world / "cache"), "--device", "cpu", "--exporter", "torchscript",
                                      "--fpr", FPRS, "--select", "acc", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [m["label"] for m in data["models"]] == ["0002"]
    assert data["selection"]["selected"] == "0002" and data["selection"]["rule"] == "acc"


def test_an_onnx_file_is_scored_with_the_spec_in_its_metadata(world, scored, tmp_path):
    onnx_path = scored.candidates[1].onnx
    result = score([str(onnx_path)], ScoreSettings.of([str(world / "lfw.bin")], cache_dir=world / "cache", fprs=FPRS),
                   out=tmp_path / "o", device="cpu", progress=False, log=lambda m: None)
    assert result.candidates[0].how == "given" and result.candidates[0].passed
    np.testing.assert_allclose(np.load(result.table.results[0].scores_file),
                               np.load(scored.table.results[1].scores_file), atol=1e-12)


def test_foreign_onnx_with_wrong_input_size_is_one_error(world, scored, tmp_path):
    model = onnx.load(str(scored.candidates[0].onnx))
    del model.metadata_props[:]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value, dims[3].dim_value = 112, 112
    foreign = tmp_path / "foreign.onnx"
    onnx.save(model, str(foreign))
    result = CliRunner().invoke(cli, ["score", str(foreign), "--bench", str(world / "lfw.bin"), "--input-size",
                                      "96x96", "--out", str(tmp_path / "f"), "--device", "cpu"])
    assert result.exit_code == 1
    assert "does not fit the benchmark images 96x96" in result.stderr and "--input-size" in result.stderr
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("bench, message", [
    ("missing.bin", "benchmark not found"),
    ("lfw:{root}/lfw.bin", "unknown benchmark kind 'lfw'"),
    ("{root}/calib", "cannot tell what kind of benchmark"),
    ("{root}/notapack.bin", "is not a readable .bin pack"),
    ("{root}/lfw.bin,flip=maybe", "bad option"),
    ("pairs:{root}/lfw.bin,norm=off", "unknown option 'norm'"),
])
def test_bad_bench_specs_are_one_line_errors(world, tmp_path, bench, message):
    (world / "notapack.bin").write_bytes(b"\x00 not a pickle")
    result = CliRunner().invoke(cli, ["score", str(world / "run"), "--bench", bench.format(root=world), "--out",
                                      str(tmp_path / "bad"), "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_bad_options_are_errors(world, tmp_path):
    base = ["score", str(world / "run"), "--bench", str(world / "lfw.bin"), "--out", str(tmp_path / "b")]
    usage = [(["--select", "tpr@2"], "Invalid value for '--select': bad selection rule"),
             (["--select", "insightface:tpr"], "Invalid value for '--select': bad selection rule"),
             (["--fpr", "0,1e-3"], "Invalid value for '--fpr': FPR targets must lie between 0 and 1"),
             (["--precision", "fp32,fp8"], "Invalid value for '--precision': unknown precision 'fp8'"),
             (["--input-size", "abc"], "Invalid value for '--input-size': bad input size")]
    for extra, message in usage:  # a bad option value is a usage error: exit 2, before anything runs
        result = CliRunner().invoke(cli, base + extra)
        assert result.exit_code == 2 and message in result.stderr, (extra, result.output)
    for extra, message in [(["--select", "acc,bench=lfw-2"], "not among"),
                           (["--device", "cuda"], "CUDA was requested")]:
        result = CliRunner().invoke(cli, base + extra)
        assert result.exit_code == 1 and message in result.stderr, (extra, result.output)
    assert not (tmp_path / "b").exists()


def test_a_directory_that_is_not_a_run_names_the_missing_manifest(tmp_path, world):
    result = CliRunner().invoke(cli, ["score", str(tmp_path), "--bench", str(world / "lfw.bin"), "--device", "cpu"])
    assert result.exit_code == 1 and "run.json is missing" in result.stderr


def test_snapshots_that_fail_parity_are_shown_and_never_selected(world, tmp_path):
    result = _score(world, tmp_path / "strict", export=ExportSettings(exporter="torchscript",
                                                                       atol=1e-12, rtol=0.0, min_cos=1.0))
    assert not any(c.passed for c in result.candidates)
    assert result.selection.selected is None and result.handoff is None
    assert all("failed parity" in why for why in result.selection.reasons.values())
    assert "FAILED" in (tmp_path / "strict" / "table.txt").read_text()
    assert list((world / "run" / "exports").glob("*.rejected"))
    cli_run = CliRunner().invoke(cli, ["score", str(world / "run"), "--bench", str(world / "lfw.bin"), "--out",
                                       str(tmp_path / "cli"), "--cache-dir", str(world / "cache"), "--device", "cpu",
                                       "--exporter", "torchscript", "--atol", "1e-12", "--rtol", "0", "--min-cos",
                                       "1", "--fpr", FPRS])
    assert cli_run.exit_code == 1 and "no model passed its parity gate" in cli_run.stderr
    assert "FAILED" in cli_run.stdout and not (tmp_path / "cli" / "handoff").exists()


def test_a_model_spec_target_is_exported_behind_the_gate(world, tmp_path):
    weights = world / "w.safetensors"
    result = score(["iresnet_tiny"], ScoreSettings.of([str(world / "lfw.bin")], cache_dir=world / "cache", fprs=FPRS),
                   out=tmp_path / "m", device="cpu", progress=False, log=lambda m: None,
                   export=ExportSettings(exporter="torchscript", parity_data=str(world / "calib")),
                   model_options=ModelOptions(weights=weights))
    c = result.candidates[0]
    assert c.passed and c.how == "export" and c.onnx.parent == tmp_path / "m" / "exports"
    assert c.parity["inputs"]["real"] > 0
    base = np.load(result.table.results[0].scores_file)
    assert base.shape == (40,) and np.isfinite(base).all()


def test_library_errors_are_bnport_errors(world):
    with pytest.raises(BnportError, match="no benchmark given"):
        score([str(world / "run")], ScoreSettings.of([]), device="cpu", progress=False)


def test_torchrun_two_processes_give_the_single_process_table(world, scored, tmp_path):
    import os
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    out = tmp_path / "dist"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "bnport", "score",
                           str(world / "run"), "--bench", str(world / "lfw.bin"), "--out", str(out), "--cache-dir",
                           str(world / "cache"), "--device", "cpu", "--exporter", "torchscript", "--fpr", FPRS,
                           "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)  # only rank 0 prints
    for mine, theirs in zip(data["results"], scored.table.results):
        assert mine["model"] == theirs.model and mine["tpr"] == theirs.tpr
        np.testing.assert_allclose(np.load(mine["scores_file"]), np.load(theirs.scores_file), rtol=0, atol=1e-6)
    assert data["selection"]["selected"] == scored.selection.selected


@pytest.mark.parametrize("switches", ["", ",flip=off,norm=off,faceness=off"])
def test_ijbc_scores_follow_insightface_eval_ijbc(world, scored, tmp_path, switches):
    """bnport score on an IJB-C release laid out like the real one equals insightface's procedure run by hand:
    scikit-image + cv2 alignment, PyTorch features (image + flip), eval_ijbc.py's template loops."""
    from tests.helpers.ijb import MEDIAS, PAIRS, TEMPLATES, insightface_scores, make_release, skimage_crop_rgb

    written = make_release(tmp_path / "IJBC")
    snapshot = scored.candidates[2]
    result = score([str(snapshot.onnx)],
                   ScoreSettings.of([f"ijbc:{tmp_path / 'IJBC'}{switches}"], cache_dir=tmp_path / "cache", fprs=FPRS),
                   out=tmp_path / "o", device="cpu", progress=False, log=lambda m: None)
    flip = not switches
    module = load_snapshot_model(snapshot.snapshot.tensors).module.double().eval()
    crops = np.stack([skimage_crop_rgb(tmp_path / "IJBC" / "loose_crop" / n, p.astype(np.float32), (112, 112))
                      for n, p in zip(written["names"], written["landmarks"])])
    x = (torch.from_numpy(crops).permute(0, 3, 1, 2).double() / 255.0 - 0.5) / 0.5
    with torch.no_grad():
        feats = module(x) + (module(torch.flip(x, dims=[3])) if flip else 0)
    expected = insightface_scores(feats.numpy(), written["faceness"], np.array(TEMPLATES), np.array(MEDIAS),
                                  np.array([p[:2] for p in PAIRS]), use_norm_score=flip, use_detector_score=flip)
    got = np.load(result.table.results[0].scores_file)
    # alignment may differ from scikit-image's by one grey level on a few pixels: a small tolerance on cosines
    np.testing.assert_allclose(got, expected, atol=2e-3)
    assert result.table.benches[0]["settings"] == {"flip": flip, "norm": flip, "faceness": flip}
    assert result.table.results[0].n_genuine == 3 and result.table.results[0].n_impostor == 3


def test_benchmarks_that_cannot_be_scored_fail_before_any_model_runs(world, tmp_path):
    import pickle

    from tests.helpers.benchdata import encode, identity_image

    images = [encode(identity_image(i % 2, i)) for i in range(8)]
    with open(tmp_path / "same.bin", "wb") as f:
        pickle.dump((images, [True] * 4), f)
    result = CliRunner().invoke(cli, ["score", str(world / "run"), "--bench", str(tmp_path / "same.bin"), "--out",
                                      str(tmp_path / "o"), "--device", "cpu"])
    assert result.exit_code == 1
    assert "same.bin cannot be scored: 8 images, 4 genuine and 0 impostor pairs" in result.stderr
    assert not (tmp_path / "o").exists()


def test_a_small_pack_gets_tpr_without_the_10_fold_accuracy(world, scored, tmp_path):
    write_bin_pack(tmp_path / "small.bin", 6)
    result = score([str(scored.candidates[1].onnx)],
                   ScoreSettings.of([str(tmp_path / "small.bin")], cache_dir=tmp_path / "c", fprs=FPRS),
                   out=tmp_path / "o", device="cpu", progress=False, log=lambda m: None)
    assert result.table.results[0].accuracy is None and result.table.results[0].n_genuine == 3
    assert "acc (%)" in str(result) and " - " in str(result)
