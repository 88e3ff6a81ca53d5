"""Graph reuse for later snapshots of one run: snapshots differ only in their BN statistics, so after one full export
(`bnport.export.onnx_export.export_onnx`: fold, trace, export, simplify, parity) the others need not be traced again.
A `GraphTemplate` is a verified file plus, for each initializer holding a folded tensor, that tensor's name, found by
matching the file's initializers to the folded module's tensors by exact value (float32 bytes, reshapes allowed).
`export_reusing` folds a new snapshot in PyTorch (a torch.fx pass, no ONNX export), substitutes the new tensors into a
copy of the file and puts it through the same parity gate against the unfolded module with the snapshot applied;
when that gate fails (an initializer the match missed, say) it returns None and the caller exports in full, so a
reused graph is never trusted unchecked.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np

from bnport.atomic import atomic_write_bytes
from bnport.data.transforms import InputSpec
from bnport.errors import BnportError
from bnport.export.export_report import parity_props, stamp
from bnport.export.settings import ExportSettings


class GraphTemplate:
    """A verified export of one snapshot and, for each initializer holding a folded tensor, that tensor's name."""

    def __init__(self, model, mapping: dict[str, str], ambiguous: dict[str, list[str]], source: str, report: dict):
        self.model, self.mapping, self.ambiguous = model, mapping, ambiguous
        self.source, self.report = source, report

    def undecided(self, state: dict) -> str | None:
        """An initializer whose value matched several folded tensors that differ for `state` (the template snapshot
        held coinciding values, as an untouched initialisation does): then the graph cannot be reused."""
        for init, names in self.ambiguous.items():
            first = state[names[0]].reshape(-1)
            if any(not bool((state[n].reshape(-1) == first).all()) for n in names[1:]):
                return init
        return None


def folded_state(module, spec: InputSpec) -> dict:
    import torch

    from bnport.export.fold_torch import fold_bn

    folded = fold_bn(module, example_input=torch.zeros(1, 3, spec.height, spec.width))
    return {k: v.detach() for k, v in folded.state_dict().items() if v.is_floating_point()}


def _value_key(array: np.ndarray) -> tuple[int, str]:
    data = np.ascontiguousarray(array, dtype=np.float32)
    return data.size, hashlib.sha1(data.tobytes()).hexdigest()


def build_template(model, state: dict, source: str, report: dict) -> GraphTemplate:
    """Match the file's float initializers to the folded module's tensors by exact value (a name match wins a tie);
    an initializer equal to no folded tensor, or to several, is taken as independent of the BN statistics."""
    from onnx import TensorProto, numpy_helper

    by_value: dict[tuple[int, str], list[str]] = {}
    for name, tensor in state.items():
        by_value.setdefault(_value_key(tensor.float().cpu().numpy()), []).append(name)
    mapping, ambiguous = {}, {}
    for init in model.graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        names = by_value.get(_value_key(numpy_helper.to_array(init)), [])
        if init.name in names:
            mapping[init.name] = init.name
        elif len(names) == 1:
            mapping[init.name] = names[0]
        elif names:
            mapping[init.name] = names[0]
            ambiguous[init.name] = names
    return GraphTemplate(model, mapping, ambiguous, source, report)


def substituted(template: GraphTemplate, state: dict):
    """A copy of the template file with every mapped initializer replaced by the new folded tensor."""
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(template.model)
    for init in model.graph.initializer:
        name = template.mapping.get(init.name)
        if name is None:
            continue
        value = state[name].float().cpu().numpy().reshape(tuple(init.dims))
        init.CopyFrom(numpy_helper.from_array(value, init.name))
    return model


def export_reusing(template: GraphTemplate, loaded, spec: InputSpec, out: Path, settings: ExportSettings, *,
                   inputs, device: str, metadata: dict, log) -> dict | None:
    """`loaded`'s folded tensors put into `template`'s graph, checked against `loaded.module` on `inputs` (the
    parity inputs and their counts) and written to `out`; the report written beside it, or None (a full export
    follows) when the graph cannot be reused or fails the gate."""
    from bnport.export.parity import ParityReference
    from bnport.runtime.sessions import GATE, create_session

    began = time.perf_counter()
    state = folded_state(loaded.module, spec)
    undecided = template.undecided(state)
    label = f"snapshot {loaded.provenance.get('snapshot')}"
    if undecided is not None:
        log(f"{label}: the graph of {template.source} cannot be reused ({undecided} held a value several folded "
            "tensors shared there); exporting anew")
        return None
    model = substituted(template, state)
    reference = ParityReference(loaded.module, inputs[0], counts=inputs[1], batch_sizes=(1, 2, 8))
    try:
        session = create_session(model.SerializeToString(), device=device, use=GATE)
        parity = reference.compare(session, label=f"graph of snapshot {template.source} reused",
                                   **settings.tolerances())
    except BnportError:
        raise
    except Exception as err:  # noqa: BLE001 - a reused graph that will not even run means a full export
        log(f"{label}: the reused graph did not run ({type(err).__name__}); exporting anew")
        return None
    if not parity:
        log(f"{label}: the reused graph failed parity; exporting anew")
        return None
    stamp(model, {**metadata, **parity_props(parity)})
    data = model.SerializeToString()
    atomic_write_bytes(out, data)
    report = {key: template.report.get(key) for key in ("exporter", "opset", "dynamic_batch", "input_name",
                                                          "output_names", "simplified", "fold_bn", "bn_before",
                                                          "bn_torch_after", "bn_onnx", "remaining")}
    report.update(passed=True, output=str(out), sha256=hashlib.sha256(data).hexdigest(), parity=parity.to_dict(),
                  runtime=session.describe(), how="graph reused", graph_of=template.source,
                  seconds=round(time.perf_counter() - began, 3))
    return report
