"""Regenerate tests/fixtures/peer_bn_counts.json: BatchNorms each peer leaves in the models of the export coverage
tests.

Peers: the TorchScript exporter followed by onnxsim (BatchNormalization nodes in the file), the dynamo exporter with
its default optimisation (BatchNormalization nodes), and torch.fx's `fuse` (BatchNorm modules left). Running the peers
takes minutes, too long for the test suite, so tests/export/test_onnx_export.py reads this golden file and checks that
bnport leaves no more BatchNorms than the best peer; tests/benchmarks/bench_export.py repeats the comparison live.
Models: the face registry, torchvision (`torchvision:NAME`, 64x64) and timm (`timm:NAME`, 224x224; needs
`pip install timm`).

    python tests/benchmarks/peer_bn_counts.py [--models NAME ...]
"""
from __future__ import annotations

import argparse
import io
import json
import time
import warnings
from pathlib import Path

import onnx
import onnxsim
import torch
import torch.nn.functional as F
import torchvision

from bnport.model.arch import create_model
from bnport.export.fold_torch import count_bn
from bnport.export.fold_onnx import count_bn_nodes

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "peer_bn_counts.json"
FACE_MODELS = ("iresnet18", "iresnet50", "iresnet100", "mobilefacenet")
TORCHVISION_MODELS = ("resnet50", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf", "shufflenet_v2_x1_0",
                      "mnasnet1_0", "googlenet", "densenet121")
TIMM_MODELS = ("mixnet_s", "levit_128s", "repvgg_a0")
TORCHVISION_SIZE = (64, 64)
TIMM_SIZE = (224, 224)
FACE_SIZE = (112, 112)
ALL_MODELS = (*FACE_MODELS, *(f"torchvision:{m}" for m in TORCHVISION_MODELS), *(f"timm:{m}" for m in TIMM_MODELS))


def build(name: str) -> tuple[torch.nn.Module, tuple[int, int]]:
    """The model under its coverage-test name (`torchvision:NAME`, `timm:NAME` or a registry name), random weights,
    eval mode, and its input size."""
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name.split(":", 1)[1], pretrained=False).eval(), TIMM_SIZE
    if name.startswith("torchvision:"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torchvision.models.get_model(name.split(":", 1)[1], weights=None)
        return model.eval(), TORCHVISION_SIZE
    return create_model(name).eval(), FACE_SIZE


def torchscript_onnxsim(model: torch.nn.Module, x: torch.Tensor) -> int:
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["data"], opset_version=17,
                      dynamic_axes={"data": {0: "batch"}})
    simplified, ok = onnxsim.simplify(onnx.load_from_string(buffer.getvalue()))
    assert ok, "onnxsim check failed"
    return count_bn_nodes(simplified)


def dynamo(model: torch.nn.Module, x: torch.Tensor) -> int:
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False, input_names=["data"],
                                dynamic_shapes=({0: torch.export.Dim("batch")},))
    return count_bn_nodes(program.model_proto)


def fx_fuse(model: torch.nn.Module, x: torch.Tensor) -> int:
    """BatchNorm modules left by `fuse`, plus batch_norm calls: symbolic_trace inlines a BN subclass with its own
    forward (timm's BatchNormAct2d) as a functional batch_norm, which `fuse` leaves and a module count misses."""
    from torch.fx.experimental.optimization import fuse

    fused = fuse(model)
    functional = sum(node.op == "call_function" and node.target in (F.batch_norm, torch.batch_norm)
                     for node in fused.graph.nodes)
    return count_bn(fused) + functional


PEERS = {"torchscript_onnxsim": torchscript_onnxsim, "dynamo": dynamo, "fx_fuse": fx_fuse}


def count_peers(name: str) -> dict:
    model, size = build(name)
    x = torch.randn(2, 3, *size)
    row: dict = {"input_size": list(size), "bn_modules": count_bn(model)}
    for peer, run in PEERS.items():
        began = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                row[peer] = run(model, x)
            except Exception as err:  # noqa: BLE001 - a peer that cannot handle a model is recorded, not fatal
                row[peer] = None
                row[f"{peer}_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        row[f"{peer}_seconds"] = round(time.perf_counter() - began, 2)
    row["best_peer"] = min(row[p] for p in PEERS if row[p] is not None)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(ALL_MODELS), help="models to (re)count; default: all")
    args = parser.parse_args()
    torch.manual_seed(0)
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {"models": {}}
    for name in args.models:
        golden["models"][name] = count_peers(name)
        print(name, json.dumps(golden["models"][name]), flush=True)
    golden.update({"generated_by": "tests/benchmarks/peer_bn_counts.py", "torch": torch.__version__,
                   "torchvision": torchvision.__version__, "onnx": onnx.__version__,
                   "onnxsim": onnxsim.__version__})
    if any(name.startswith("timm:") for name in golden["models"]):
        import timm

        golden["timm"] = timm.__version__
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
