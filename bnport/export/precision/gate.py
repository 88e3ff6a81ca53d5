"""The gate of a converted file: the FP16 or INT8 file against its float32 file on onnxruntime, same inputs (real
images plus the noise inputs of `bnport.export.parity.build_parity_inputs`), batch sizes 1, 2 and 8, with the figures
the float32 gate reports (`PrecisionParity` is a `bnport.export.parity.ParityResult`, its statistics those of
bnport.export.gate_stats). Its verdict is the row cosine: every judged output row must reach
`DEFAULT_MIN_COS[precision]`. FP16 judges every row; INT8 judges the real-image rows, because noise inputs lie
outside the calibrated activation ranges by design (their figures are reported, only NaN/Inf fails). The defaults
come from measurements (tests/benchmarks/RESULTS.md): FP16 gives 1 - cos <= 9e-6 with float16 compute (iresnet50 in
PyTorch half) and <= 6e-6 on ORT CPU, so 0.9999 leaves a 10x margin and a clamped weight (0.63) fails. INT8 gives
0.9994 on a trained IResNet-50 and 0.915 on a trained MobileFaceNet (issue 10), 0.998-0.999 on the tests' tiny
IResNet, 0.967 on a random-weight IResNet-50 (random nets lose more than trained ones), and 0.58 or less when
calibrated on ranges 100x too wide; 0.99 passes the trained model INT8 serves well and refuses the one it damages
(pass `min_cos` to accept less, then let the verification metric decide).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from bnport.errors import BnportError
from bnport.export.gate_stats import histogram, json_float, max_relative, quantiles, row_cosines
from bnport.export.parity import ParityResult
from bnport.export.settings import check_precision

DEFAULT_MIN_COS = {"fp16": 0.9999, "int8": 0.99}
DEFAULT_BATCH_SIZES = (1, 2, 8)


@dataclass
class PrecisionParity(ParityResult):
    """A lower-precision file against its float32 file: the float32 gate's figures plus the row cosine per input kind.

    `max_abs`, `mean_abs`, `quantiles`, `histogram`, `max_rel`, `output_scale` are as in `ParityResult`, with the
    float32 file's outputs as the reference. `min_cos` is the lowest row cosine over the judged rows (`judged` names
    their kinds), `min_cos_by_kind` the lowest per input kind, `mean_cos` the mean over the judged rows. `atol` and
    `rtol` are None: elementwise errors are reported, not judged, since INT8 moves single values by a few percent of
    the output scale even when every embedding keeps its direction.
    """

    precision: str = ""
    min_cos_by_kind: dict[str, float] = field(default_factory=dict)
    mean_cos: float = math.nan
    judged: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["tolerances"] = {"min_cos": self.min_cos_required, "rows_judged": list(self.judged), "atol": None,
                           "rtol": None}
        d.update({"precision": self.precision, "reference": "float32 ONNX file",
                  "min_cos_by_kind": {k: json_float(v) for k, v in self.min_cos_by_kind.items()},
                  "mean_cos": json_float(self.mean_cos)})
        return d

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        kinds = ", ".join(f"{n} {k}" for k, n in self.inputs.items() if n)
        sizes = ", ".join(str(b) for b in self.batch_sizes)
        unjudged = [k for k, n in self.inputs.items() if n and k not in self.judged]
        rule = f"every {'/'.join(self.judged)} output row cosine >= {self.min_cos_required}"
        if unjudged:
            rule += f" ({', '.join(unjudged)} rows reported, not judged: outside the calibrated ranges)"
        per_kind = ", ".join(f"{k} {v:.6f}" for k, v in self.min_cos_by_kind.items())
        quant = "  ".join(f"{k} {v:.2e}" for k, v in self.quantiles.items())
        lines = [
            (f"{self.precision} parity {verdict} vs the float32 file on onnxruntime {', '.join(self.providers)}: "
             f"{self.n_inputs} inputs ({kinds}), batch sizes {sizes}"),
            f"  rule: {rule}",
            f"  min row cosine: {per_kind}; mean over judged rows {self.mean_cos:.6f}",
            (f"  max abs {self.max_abs:.3e} (output scale {self.output_scale:.4g}), max rel {self.max_rel:.3e}; "
             f"abs error quantiles: {quant}"),
        ]
        lines += [f"  failed: {f}" for f in self.failures]
        return "\n".join(lines)


def check_precision_parity(fp32_model, lower_model, *, precision: str, inputs, counts: dict[str, int] | None = None,
                           batch_sizes: tuple[int, ...] | list[int] = DEFAULT_BATCH_SIZES, device: str = "cpu",
                           min_cos: float | None = None, label: str = "") -> PrecisionParity:
    """Run the float32 and the lower-precision model (paths, bytes or ModelProtos) on `inputs` and judge the latter.

    `inputs`: N x 3 x H x W network inputs; `counts`: how many of each kind they hold, in order (as
    `build_parity_inputs` returns them; None: one kind, "inputs", judged). Batches cycle through `batch_sizes`.
    `device`: onnxruntime device for both files. `min_cos`: None = DEFAULT_MIN_COS[precision]. See the module
    docstring for which rows are judged.
    """
    from bnport.export.parity import split_batches
    from bnport.runtime.sessions import CHECK, GATE, create_session

    check_precision(precision)
    if precision == "fp32":
        raise BnportError("the float32 file is its own reference", "check it against PyTorch with bnport export")
    required = DEFAULT_MIN_COS[precision] if min_cos is None else float(min_cos)
    x = inputs.detach().cpu().numpy() if hasattr(inputs, "detach") else np.asarray(inputs)
    x = np.ascontiguousarray(x, dtype=np.float32)
    counts = dict(counts) if counts else {"inputs": len(x)}
    if sum(counts.values()) != len(x):
        raise BnportError(f"input counts {counts} add up to {sum(counts.values())}, not {len(x)} inputs",
                          "pass the counts build_parity_inputs returned with these inputs")
    serialized = [m.SerializeToString() if hasattr(m, "SerializeToString") else m for m in (fp32_model, lower_model)]
    # the float32 file is the reference (full float32, as the float32 gate ran it); the converted file runs as it
    # will be deployed: a float16 file never has TF32 forced off (cuDNN has no plan for some of its convolutions)
    reference = create_session(serialized[0], device=device, use=GATE)
    candidate = create_session(serialized[1], device=device, use=CHECK)
    failures: list[str] = []
    pairs: list[tuple[np.ndarray, np.ndarray, int]] = []
    for start, stop in split_batches(len(x), batch_sizes):
        ref, got = reference.run_all(x[start:stop]), candidate.run_all(x[start:stop])
        if len(ref) != len(got):
            failures.append(f"the {precision} file has {len(got)} outputs, the float32 file {len(ref)}")
            break
        for r, o in zip(ref, got):
            if r.shape != o.shape:
                failures.append(f"output shape {list(o.shape)} differs from the float32 file's {list(r.shape)} "
                                f"at batch size {stop - start}")
                break
            pairs.append((r.astype(np.float64), o.astype(np.float64), start))
    kinds = np.repeat(np.array(list(counts), dtype=object), list(counts.values()))
    judged_kinds = ["real"] if precision == "int8" and counts.get("real") else [k for k, n in counts.items() if n]
    common = {"inputs": counts, "batch_sizes": list(batch_sizes), "providers": list(candidate.providers),
              "device": candidate.device, "atol": None, "rtol": None, "min_cos_required": required, "label": label,
              "precision": precision, "judged": judged_kinds, "session_settings": dict(candidate.settings)}
    if failures or not pairs:
        return PrecisionParity(False, math.inf, math.inf, math.inf, -1.0, 0.0, {}, {},
                               failures=failures or ["no outputs to compare"], **common)
    ref = np.concatenate([r.reshape(-1) for r, _, _ in pairs])
    out = np.concatenate([o.reshape(-1) for _, o, _ in pairs])
    if not np.all(np.isfinite(out)):
        failures.append(f"the {precision} file produced {int((~np.isfinite(out)).sum())} NaN/Inf values")
    err = np.abs(out - ref)
    err = np.where(np.isfinite(err), err, math.inf)
    scale = float(np.abs(ref[np.isfinite(ref)]).max(initial=0.0))
    max_rel = max_relative(err, ref, scale)
    cos = np.concatenate([row_cosines(r, o) for r, o, _ in pairs])
    row_kinds = np.concatenate([kinds[start:start + len(r)] for r, _, start in pairs])
    by_kind = {k: float(cos[row_kinds == k].min()) for k, n in counts.items() if n}
    judged = np.isin(row_kinds, judged_kinds)
    worst = float(cos[judged].min())
    low = int((cos[judged] < required).sum())
    if low:
        failures.append(f"{low} of {int(judged.sum())} {'/'.join(judged_kinds)} output rows with cosine below "
                        f"{required} (lowest {worst:.6f})")
    return PrecisionParity(passed=not failures, max_abs=float(err.max()), mean_abs=float(err.mean()),
                           max_rel=max_rel, min_cos=worst, output_scale=scale, quantiles=quantiles(err),
                           histogram=histogram(err / scale if scale > 0 else err), failures=failures,
                           min_cos_by_kind=by_kind,
                           mean_cos=float(cos[judged].mean()), **common)
