"""The handoff bundle: what a production team gets, and can use without asking questions.

`handoff/model.onnx` is the selected, parity-verified file with the scores and the selection rule added to its
metadata_props; `model.json` is its card (input name, shape and spec with a numpy preprocessing example, output,
provenance, parity figures, the full table, the rule, the file's sha256); `report.md` is the table in Markdown, how
the model was selected and the command that reproduces it. The bundle is written into a temporary folder beside
the target and renamed into place, so a failure leaves the previous bundle (or none), never half of one.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from bnport import __version__
from bnport.atomic import atomic_replace_dir, json_bytes
from bnport.score.candidates import Candidate

PREPROCESS_EXAMPLE = '''import cv2, numpy as np, onnxruntime as ort
image = cv2.imread("face.jpg")                     # an aligned face crop (5-point ArcFace alignment), BGR
image = cv2.resize(image, ({width}, {height}))            # (width, height)
{channels}
x = (pixels.astype(np.float32) - np.float32({mean})) / np.float32({std})
x = x.transpose(2, 0, 1)[None]                     # 1 x 3 x {height} x {width}, float32, NCHW
session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
embedding = session.run(None, {{"{input_name}": x}})[0][0]
embedding /= np.linalg.norm(embedding)             # L2-normalise
similarity = float(embedding @ other_embedding)    # cosine{flip_note}'''


def preprocessing_example(spec, input_name: str, *, flip: bool | None = None) -> str:
    """Ten lines of numpy/OpenCV that turn an image file into this model's input and an embedding. `flip`: whether
    the scores were computed on image + horizontal-flip embeddings (said in the last comment)."""
    def numbers(values) -> str:
        values = list(values)
        return repr(values[0]) if len(set(values)) == 1 else repr([float(v) for v in values])

    channels = ("pixels = image                                     # the model takes BGR, as cv2 reads it"
                if spec.bgr else
                "pixels = image[:, :, ::-1]                         # BGR -> RGB: the model takes RGB")
    flip_note = {True: "; the scores below summed the embeddings of the image and its mirror",
                 False: "; the scores below used the image alone (no flip)", None: ""}[flip]
    return PREPROCESS_EXAMPLE.format(width=spec.width, height=spec.height, channels=channels, flip_note=flip_note,
                                     mean=numbers(spec.mean),
                                     std=numbers(spec.std), input_name=input_name)


def _flip(table) -> bool | None:
    """Whether every benchmark scored with flip (True), none (False), or some did and some did not (None)."""
    flips = {bool(b.get("settings", {}).get("flip", True)) for b in table.benches}
    return flips.pop() if len(flips) == 1 else None


def _io(model) -> tuple[dict, list[dict]]:
    def dims(value_info) -> list:
        return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]

    initializers = {i.name for i in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in initializers)
    return ({"name": inp.name, "shape": dims(inp)},
            [{"name": o.name, "shape": dims(o)} for o in model.graph.output])


def write_handoff(folder: Path, candidate: Candidate, *, table, selection, markdown: str, command: str,
                  extra_card: dict | None = None) -> Path:
    """Write the bundle for `candidate` into `folder` (replacing an older bundle only once the new one is whole)."""
    import onnx
    from onnx import helper

    folder = Path(folder)
    model = onnx.load(str(candidate.onnx))
    props = {p.key: p.value for p in model.metadata_props}
    results = {r.bench: r.to_dict() for r in table.results if r.model == candidate.label}
    props.update({"scores": json.dumps(results, default=str), "selection": json.dumps(selection.to_dict()),
                  "selected": candidate.label})
    helper.set_model_props(model, props)
    data = model.SerializeToString()
    sha = hashlib.sha256(data).hexdigest()
    spec = candidate.input_spec
    inp, outputs = _io(model)
    calibration = candidate.provenance.get("calibration") or {}
    card = {
        "format": "bnport-handoff/1",
        "bnport": __version__,
        "model": {"file": "model.onnx", "sha256": sha, "bytes": len(data), "label": candidate.label,
                  "how": candidate.how, "source_file": str(Path(candidate.onnx).resolve())},
        "input": {**inp, "dtype": "float32", "layout": "NCHW", "spec": spec.to_dict(),
                  "preprocessing_example": preprocessing_example(spec, inp["name"], flip=_flip(table)).splitlines()},
        "output": {"outputs": outputs, "use": "the first output is the embedding: L2-normalise it and compare two "
                                              "faces by cosine similarity (higher = more alike)"},
        "provenance": {"source": props.get("source"), "source_sha256": props.get("source_sha256"),
                       "weights_sha256": props.get("weights_sha256"),
                       "run": str(candidate.run.path.resolve()) if candidate.run else None,
                       "snapshot": candidate.snapshot.id if candidate.snapshot else None,
                       "recipe": candidate.recipe, "calibration": calibration,
                       "data": candidate.provenance.get("data"),
                       "step": candidate.provenance.get("step"),
                       "images_seen": candidate.provenance.get("images_seen")},
        "parity": candidate.parity,
        "metrics": results,
        "selection": selection.to_dict(),
        "selection_text": selection.lines(),
        "table": table.to_dict(),
        "reproduce": command,
        "reproduce_in": str(Path.cwd()),
        **(extra_card or {}),
    }
    def fill(tmp: Path) -> None:
        (tmp / "model.onnx").write_bytes(data)
        (tmp / "model.json").write_bytes(json_bytes(card))
        (tmp / "report.md").write_text(markdown)

    return atomic_replace_dir(folder, fill)
