"""Tests for bnport.score.handoff on a small ONNX file written in tmp_path: `write_handoff` writes the bundle
(model.onnx whose sha256 and size are the card's, the card's input, output, provenance, parity, table and selection,
the scores and the selection in the file's metadata_props beside the props it already had, the graph itself
unchanged, report.md as given); a failure while the bundle is being filled leaves the previous bundle exactly as it
was; and the preprocessing example of the card, for an RGB and a BGR model, run as a user would, gives the embedding
computed independently (InputSpec.to_tensor, onnxruntime)."""
from __future__ import annotations

import hashlib
import json

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bnport.data.transforms import InputSpec
from bnport.score.candidates import Candidate
from bnport.score.handoff import preprocessing_example, write_handoff
from bnport.score.select import parse_rule, select_model
from bnport.score.table import BenchResult, ScoreTable
from tests.helpers.onnxgraphs import image_embedder

H, W = 12, 10
SOURCE_PROPS = {"source": "iresnet_tiny", "weights_sha256": "ab" * 32, "parity": json.dumps({"passed": True})}


def _model(path, spec: InputSpec, seed: int = 0):
    weight = np.random.default_rng(seed).normal(size=(6, 3 * H * W)) / 30
    path.write_bytes(image_embedder(weight, size=(H, W), metadata={**SOURCE_PROPS, "input_spec": json.dumps(
        spec.to_dict())}))
    return path


def _result(model: str, tpr: float, *, bench: str = "lfw") -> BenchResult:
    return BenchResult(model=model, bench=bench, n_genuine=40, n_impostor=40,
                       tpr={"strict": {"1e-1": tpr}, "insightface": {"1e-1": tpr}}, noisy={"1e-1": True},
                       accuracy=(90.0 + tpr, 1.0), scores_file=f"/scores/{model}__{bench}.npy")


def _world(tmp_path, spec: InputSpec, *, flips=(True,)):
    """A candidate (the file, its spec, provenance and parity), the table it was scored in and the selection."""
    onnx_path = _model(tmp_path / "0002.onnx", spec)
    candidate = Candidate(label="0002", kind="snapshot", onnx=onnx_path, input_spec=spec, passed=True,
                          how="graph reused", parity={"passed": True, "max_abs": 1e-7},
                          provenance={"calibration": {"mode": "ema"}, "data": {"src": "calib"}, "step": 8,
                                      "images_seen": {"data": 32}})
    benches = [{"name": f"b{k}", "kind": "bin", "images": 80, "pairs": 40, "settings": {"flip": flip}}
               for k, flip in enumerate(flips)]
    results = [_result(label, tpr, bench=b["name"]) for b in benches
               for label, tpr in (("0000 (baseline)", 0.5), ("0001", 0.55), ("0002", 0.7))]
    models = [{"label": label, "passed": True} for label in ("0000 (baseline)", "0001", "0002")]
    table = ScoreTable(fprs=[0.1], benches=benches, models=models, results=results, providers=["CPUExecutionProvider"])
    selection = select_model(table, parse_rule("tpr@1e-1"))
    assert selection.selected == "0002"
    return candidate, table, selection


def test_the_bundle_is_the_file_its_card_and_the_report(tmp_path):
    spec = InputSpec(H, W, mean=(127.5,), std=(128.0,))
    candidate, table, selection = _world(tmp_path, spec)
    folder = write_handoff(tmp_path / "handoff", candidate, table=table, selection=selection, markdown="# table\n",
                           command="bnport score run --bench lfw.bin", extra_card={"note": "extra"})
    assert folder == tmp_path / "handoff"
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.onnx", "report.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0002.onnx", "handoff"]  # no temporary folder left
    data = (folder / "model.onnx").read_bytes()
    card = json.loads((folder / "model.json").read_text())
    assert card["format"] == "bnport-handoff/1" and card["note"] == "extra"
    assert card["model"]["sha256"] == hashlib.sha256(data).hexdigest() and card["model"]["bytes"] == len(data)
    assert card["model"]["label"] == "0002" and card["model"]["how"] == "graph reused"
    assert card["model"]["source_file"] == str(candidate.onnx.resolve())
    assert card["input"]["name"] == "data" and card["input"]["shape"] == ["batch", 3, H, W]
    assert card["input"]["spec"] == json.loads(json.dumps(spec.to_dict()))
    assert card["output"]["outputs"] == [{"name": "emb", "shape": ["batch", 6]}]
    assert card["provenance"]["source"] == "iresnet_tiny" and card["provenance"]["weights_sha256"] == "ab" * 32
    assert card["provenance"]["run"] is None and card["provenance"]["step"] == 8
    assert card["provenance"]["calibration"] == {"mode": "ema"} and card["provenance"]["images_seen"] == {"data": 32}
    assert card["parity"] == {"passed": True, "max_abs": 1e-7}
    assert card["metrics"] == {"b0": json.loads(json.dumps(_result("0002", 0.7, bench="b0").to_dict()))}
    assert card["table"] == json.loads(json.dumps(table.to_dict()))
    assert card["selection"] == json.loads(json.dumps(selection.to_dict()))
    assert card["selection_text"] == selection.lines() and card["reproduce"] == "bnport score run --bench lfw.bin"
    assert (folder / "report.md").read_text() == "# table\n"
    model = onnx.load_from_string(data)
    props = {p.key: p.value for p in model.metadata_props}
    assert {k: props[k] for k in SOURCE_PROPS} == SOURCE_PROPS  # the file's own props stay
    assert props["selected"] == "0002"
    assert json.loads(props["selection"]) == json.loads(json.dumps(selection.to_dict()))
    assert json.loads(props["scores"]) == {"b0": json.loads(json.dumps(_result("0002", 0.7, bench="b0").to_dict()))}
    source = onnx.load(str(candidate.onnx))
    assert model.graph.SerializeToString() == source.graph.SerializeToString()  # the graph is the verified one
    x = np.random.default_rng(3).normal(size=(2, 3, H, W)).astype(np.float32)
    run = [ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, {"data": x})[0]
           for m in (data, candidate.onnx.read_bytes())]
    np.testing.assert_array_equal(run[0], run[1])


def test_a_failure_while_filling_leaves_the_previous_bundle_as_it_was(tmp_path):
    candidate, table, selection = _world(tmp_path, InputSpec(H, W))
    folder = write_handoff(tmp_path / "handoff", candidate, table=table, selection=selection, markdown="first\n",
                           command="bnport score first")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(TypeError, match="not JSON serialisable: object"):  # the card cannot be written
        write_handoff(folder, candidate, table=table, selection=selection, markdown="second\n",
                      command="bnport score second", extra_card={"broken": object()})
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0002.onnx", "handoff"]  # the half bundle is gone
    write_handoff(folder, candidate, table=table, selection=selection, markdown="third\n", command="bnport score third")
    assert (folder / "report.md").read_text() == "third\n"  # a whole new bundle does replace it
    assert json.loads((folder / "model.json").read_text())["reproduce"] == "bnport score third"


@pytest.mark.parametrize("flips, note", [((True,), "summed the embeddings of the image and its mirror"),
                                         ((False,), "used the image alone (no flip)"),
                                         ((True, False), None)])
def test_the_example_says_whether_the_scores_used_the_mirror(tmp_path, flips, note):
    candidate, table, selection = _world(tmp_path, InputSpec(H, W), flips=flips)
    folder = write_handoff(tmp_path / "handoff", candidate, table=table, selection=selection, markdown="",
                           command="c")
    last = json.loads((folder / "model.json").read_text())["input"]["preprocessing_example"][-1]
    assert last.endswith(f"# cosine; the scores below {note}" if note else "# cosine")


@pytest.mark.parametrize("spec", [InputSpec(H, W), InputSpec(H, W, mean=(120.0, 110.0, 100.0), std=(60.0, 50.0, 40.0),
                                                             bgr=True)], ids=["rgb", "bgr"])
def test_the_preprocessing_example_gives_the_embedding_of_the_model(tmp_path, spec, monkeypatch):
    text = preprocessing_example(spec, "data", flip=True)
    lines = text.splitlines()
    if spec.bgr:
        assert "pixels = image " in text and "the model takes BGR, as cv2 reads it" in text
        assert "[:, :, ::-1]" not in text
        assert "np.float32([120.0, 110.0, 100.0])" in text and "np.float32([60.0, 50.0, 40.0])" in text
    else:
        assert "pixels = image[:, :, ::-1]" in text and "BGR -> RGB: the model takes RGB" in text
        assert "np.float32(127.5)" in text
    assert f"cv2.resize(image, ({W}, {H}))" in text and f"1 x 3 x {H} x {W}" in text
    _model(tmp_path / "model.onnx", spec, seed=5)
    photo = np.random.default_rng(6).integers(0, 256, size=(30, 24, 3), dtype=np.uint8)  # RGB, not the model's size
    assert cv2.imwrite(str(tmp_path / "face.jpg"), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec("\n".join(lines[:-1]), namespace)  # noqa: S102 - the example as a user runs it (the last line compares two)
    decoded = cv2.cvtColor(cv2.resize(cv2.imread("face.jpg"), (W, H)), cv2.COLOR_BGR2RGB)
    x = spec.to_tensor(decoded).numpy()[None]
    direct = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"]).run(None, {"data": x})[0][0]
    np.testing.assert_allclose(namespace["embedding"], direct / np.linalg.norm(direct), rtol=1e-5, atol=1e-6)
