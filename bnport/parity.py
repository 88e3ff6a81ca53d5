"""PyTorch vs onnxruntime parity: real images plus noise inputs, several batch sizes, one pass/fail verdict.

The reference is the original (unfolded) PyTorch module in float32, so a parity pass proves the fold, the export and
the simplification together. Inputs are real images (`load_parity_images`) plus noise that real data never shows:
Gaussian images in normalised input space, constant images (black, grey, white) and uniform random pixels, fed in
batches of several sizes, 1 included. An output element passes when `|ort - ref| <= atol * scale + rtol * |ref|`,
where `scale` is the largest |ref| over all outputs (so atol is relative to the output's magnitude), and every output
row must have cosine similarity >= `min_cos` with its reference. The defaults (`DEFAULT_ATOL`, `DEFAULT_RTOL`,
`DEFAULT_MIN_COS`) sit between what correct folds give (iresnet50, float32 CPU: max abs error 2-3e-6 of the output
scale, 1 - cosine about 1e-12) and what wrong folds give (eps dropped, one shift lost, a shift put into a padded
conv's bias, one channel 1% off: 3e-3 to 1 of the scale); see tests/test_parity.py. When a check fails, the module's
own float32 error against float64 is measured too, so an ill-conditioned model is told apart from a broken export.
CUDA references run with TF32 off.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from bnport.data.transforms import InputSpec
from bnport.errors import BnportError
from bnport.runtime import RuntimeSession

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-4
DEFAULT_MIN_COS = 0.99999
DEFAULT_BATCH_SIZES = (1, 2, 8)
QUANTILES = (0.5, 0.9, 0.99, 0.999)
# max rel is taken over elements at least this fraction of the output scale; smaller ones are judged by atol
_REL_FLOOR = 1e-3


@dataclass
class ParityResult:
    """PyTorch vs onnxruntime figures; truthy when every check passed.

    `max_abs`, `mean_abs` and `quantiles` (p50 ... p99.9 of |ort - ref|) are absolute errors; `output_scale` is
    max |ref|; `max_rel` is max |ort - ref| / |ref| over elements with |ref| >= 1e-3 * scale; `min_cos` is the
    lowest cosine similarity between an output row and its reference. `inputs` counts inputs per kind.
    `reference_noise` (only measured when a check fails): max |PyTorch float32 - float64| / scale, the part of
    the error that is the model's own float32 arithmetic.
    """

    passed: bool
    max_abs: float
    mean_abs: float
    max_rel: float
    min_cos: float
    output_scale: float
    quantiles: dict[str, float]
    histogram: dict[str, int]
    inputs: dict[str, int]
    batch_sizes: list[int]
    providers: list[str]
    device: str
    atol: float
    rtol: float
    min_cos_required: float
    failures: list[str] = field(default_factory=list)
    label: str = ""
    reference_noise: float | None = None

    def __bool__(self) -> bool:
        return self.passed

    @property
    def n_inputs(self) -> int:
        return sum(self.inputs.values())

    def to_dict(self) -> dict:
        """Plain JSON types; a non-finite figure (NaN outputs) becomes the string "inf" or "nan"."""
        return {"passed": self.passed, "max_abs": _json_float(self.max_abs), "mean_abs": _json_float(self.mean_abs),
                "max_rel": _json_float(self.max_rel), "min_cos": _json_float(self.min_cos),
                "output_scale": self.output_scale, "quantiles": {k: _json_float(v) for k, v in self.quantiles.items()},
                "histogram": self.histogram, "inputs": self.inputs, "batch_sizes": self.batch_sizes,
                "providers": self.providers, "device": self.device,
                "tolerances": {"atol": self.atol, "atol_is_relative_to": "output_scale", "rtol": self.rtol,
                               "min_cos": self.min_cos_required},
                "failures": self.failures, "label": self.label, "reference_noise": self.reference_noise}

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        kinds = ", ".join(f"{n} {k}" for k, n in self.inputs.items() if n)
        sizes = ", ".join(str(b) for b in self.batch_sizes)
        what = f" ({self.label})" if self.label else ""
        quant = "  ".join(f"{k} {v:.2e}" for k, v in self.quantiles.items())
        lines = [
            (f"parity {verdict}{what} on onnxruntime {', '.join(self.providers)}: {self.n_inputs} inputs ({kinds}), "
             f"batch sizes {sizes}"),
            (f"  rule: |ort - torch| <= {self.atol:g} x output scale ({self.output_scale:.4g}) + {self.rtol:g} x "
             f"|torch|, every output row cosine >= {self.min_cos_required}"),
            (f"  max abs {self.max_abs:.3e}, max rel {self.max_rel:.3e} (values >= {_REL_FLOOR:g} x scale), "
             f"min row cosine {self.min_cos:.9f}"),
            f"  abs error quantiles: {quant}  max {self.max_abs:.2e}; mean {self.mean_abs:.2e}",
        ]
        lines += [f"  failed: {f}" for f in self.failures]
        return "\n".join(lines)


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def _constant_image(spec: InputSpec, value: int) -> torch.Tensor:
    return spec.to_tensor(np.full((spec.height, spec.width, 3), value, dtype=np.uint8))


def build_parity_inputs(spec: InputSpec, *, real: torch.Tensor | None = None, n_gaussian: int = 4,
                        constants: tuple[int, ...] = (0, 128, 255), n_uniform: int = 2, seed: int = 0,
                        ) -> tuple[torch.Tensor, dict[str, int]]:
    """Real images (already network inputs, Nx3xHxW) followed by noise inputs; returns (inputs, count per kind).

    Noise: `n_gaussian` N(0, 1) images in normalised input space, one constant image per value in `constants` (pixel
    value 0..255 through the input spec) and `n_uniform` images of uniform random pixels through the input spec.
    """
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    parts = []
    counts = {"real": 0, "gaussian": n_gaussian, "constant": len(constants), "uniform": n_uniform}
    if real is not None and len(real):
        if real.shape[1:] != (3, spec.height, spec.width):
            raise BnportError(f"parity images have shape {list(real.shape[1:])}, the model takes "
                              f"3x{spec.height}x{spec.width}", "resize them with the model's input spec")
        parts.append(real.float())
        counts["real"] = len(real)
    parts.append(torch.randn(n_gaussian, 3, spec.height, spec.width, generator=generator))
    parts += [_constant_image(spec, v)[None] for v in constants]
    parts += [spec.to_tensor(rng.integers(0, 256, (spec.height, spec.width, 3), dtype=np.uint8))[None]
              for _ in range(n_uniform)]
    return torch.cat(parts), counts


def load_parity_images(src: str, spec: InputSpec, *, limit: int = 16) -> torch.Tensor:
    """Up to `limit` decodable images from a data SRC (folder, list, .rec, .bin), evenly spread over it."""
    from bnport.data import open_images

    dataset = open_images(src, spec)
    if len(dataset) == 0:
        raise BnportError(f"no images in parity data {src}", "point --parity-data at a folder, list, .rec or .bin "
                          "with images")
    picks = np.unique(np.linspace(0, len(dataset) - 1, num=min(limit, len(dataset))).round().astype(int))
    images = [item for item in (dataset[int(i)][0] for i in picks) if item is not None]
    if not images:
        raise BnportError(f"none of the parity images in {src} could be decoded", "check the image files")
    return torch.stack(images).float()


def split_batches(n: int, batch_sizes: tuple[int, ...] | list[int]) -> list[tuple[int, int]]:
    """(start, stop) ranges covering 0..n, cycling through `batch_sizes` (the last batch may be shorter)."""
    ranges, start = [], 0
    for size in _cycle(batch_sizes):
        if start >= n:
            return ranges
        ranges.append((start, min(n, start + size)))
        start += size
    raise AssertionError("unreachable")


def _cycle(values) -> Iterator[int]:
    while True:
        yield from values


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """Full float32 matmul/conv on CUDA for the duration (TF32 would put 1e-3 errors into a parity reference)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def flatten_outputs(out) -> list[torch.Tensor]:
    """A model output (tensor, or nested tuple/list/dict of tensors) as a flat list, in the order exporters use."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in flatten_outputs(item)]
    raise BnportError(f"the model returns {type(out).__name__}, not tensors", "wrap it so forward returns a tensor")


class ParityReference:
    """Reference outputs of the original PyTorch module on fixed inputs, computed once, compared to many ONNX files.

    `inputs` are network inputs (Nx3xHxW); `counts` says how many of each kind they hold (for the report).
    """

    def __init__(self, module: nn.Module, inputs: torch.Tensor, *, counts: dict[str, int] | None = None,
                 batch_sizes: tuple[int, ...] | list[int] = DEFAULT_BATCH_SIZES):
        self.module = module
        self.inputs = inputs.float().contiguous()
        self.counts = dict(counts) if counts else {"inputs": len(inputs)}
        self.batch_sizes = list(batch_sizes)
        self.batches = split_batches(len(inputs), self.batch_sizes)
        self._outputs: list[list[np.ndarray]] | None = None
        self._device: str | None = None
        self._noise: float | None = None

    def outputs(self, device: str = "cpu") -> list[list[np.ndarray]]:
        """Per batch, the module's outputs as float32 arrays (computed on `device` the first time)."""
        if self._outputs is not None and self._device == device:
            return self._outputs
        was_training = self.module.training
        home = next(itertools.chain(self.module.parameters(), self.module.buffers()), torch.empty(0)).device
        self.module.eval()
        results = []
        with torch.inference_mode(), no_tf32():
            self.module.to(device)
            try:
                for start, stop in self.batches:
                    out = flatten_outputs(self.module(self.inputs[start:stop].to(device)))
                    results.append([o.detach().float().cpu().numpy() for o in out])
            finally:
                self.module.to(home)
                self.module.train(was_training)
        self._outputs, self._device = results, device
        return results

    def compare(self, session: RuntimeSession, *, atol: float | None = None, rtol: float | None = None,
                min_cos: float | None = None, label: str = "") -> ParityResult:
        """Run `session` on the same batches and judge it against the reference (None = the module's defaults)."""
        atol = DEFAULT_ATOL if atol is None else atol
        rtol = DEFAULT_RTOL if rtol is None else rtol
        min_cos = DEFAULT_MIN_COS if min_cos is None else min_cos
        reference = self.outputs(reference_device(session.device))
        failures: list[str] = []
        pairs = []
        for (start, stop), ref in zip(self.batches, reference):
            got = session.run_all(self.inputs[start:stop].numpy())
            if len(got) != len(ref):
                failures.append(f"the ONNX model has {len(got)} outputs, PyTorch {len(ref)}")
                break
            for r, o in zip(ref, got):
                if r.shape != o.shape:
                    failures.append(f"output shape {list(o.shape)} differs from PyTorch {list(r.shape)} "
                                    f"at batch size {stop - start}")
                    break
                pairs.append((r.astype(np.float64), o.astype(np.float64)))
        result = _judge(pairs, failures, counts=self.counts, batch_sizes=self.batch_sizes, session=session,
                        atol=atol, rtol=rtol, min_cos=min_cos, label=label)
        if not result.passed and math.isfinite(result.max_abs) and result.output_scale > 0:
            result.reference_noise = self.float32_noise(reference, result.output_scale)
            if result.reference_noise is not None and result.reference_noise > atol:
                result.failures.append(
                    f"PyTorch float32 itself is {result.reference_noise:.1e} x scale away from float64 on these "
                    "inputs: the model is ill-conditioned there and no float32 export can meet this atol; loosen "
                    "--atol or check the model")
        return result

    def float32_noise(self, reference: list[list[np.ndarray]], scale: float) -> float | None:
        """max |PyTorch float32 - PyTorch float64| / scale on the reference inputs: the error any float32 runtime
        may show for reasons of arithmetic alone. None when the module cannot run in float64."""
        if self._noise is None:
            try:
                exact = copy.deepcopy(self.module).to("cpu", torch.float64).eval()
                worst = 0.0
                with torch.inference_mode():
                    for (start, stop), ref in zip(self.batches, reference):
                        out = flatten_outputs(exact(self.inputs[start:stop].double()))
                        worst = max([worst, *(float(np.abs(r - o.numpy()).max(initial=0.0)) for r, o in zip(ref, out))])
                self._noise = worst
            except Exception:  # noqa: BLE001 - a diagnostic only: modules with float32-only code cannot give it
                self._noise = math.nan
        return None if math.isnan(self._noise) else self._noise / scale


def reference_device(ort_device: str) -> str:
    """Where the PyTorch reference runs: CUDA only when onnxruntime runs on CUDA and torch can use it too."""
    from bnport.device import cuda_works

    return "cuda" if ort_device == "cuda" and cuda_works()[0] else "cpu"


def _row_cosines(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    r = ref.reshape(len(ref), -1)
    o = out.reshape(len(out), -1)
    nr, no = np.linalg.norm(r, axis=1), np.linalg.norm(o, axis=1)
    both_zero = (nr == 0) & (no == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (r * o).sum(axis=1) / (nr * no)
    return np.where(both_zero, 1.0, np.nan_to_num(cos, nan=-1.0))


def _histogram(err: np.ndarray, scale: float) -> dict[str, int]:
    """Counts of |error| / scale per decade, from <1e-9 to >=1e-1."""
    rel = err / scale if scale > 0 else err
    edges = [0.0] + [10.0 ** k for k in range(-9, 0)] + [math.inf]
    labels = ["<1e-9"] + [f"1e{k}..1e{k + 1}" for k in range(-9, -1)] + [">=1e-1"]
    counts, _ = np.histogram(rel, bins=edges)
    return {label: int(c) for label, c in zip(labels, counts)}


def _judge(pairs, failures, *, counts, batch_sizes, session, atol, rtol, min_cos, label) -> ParityResult:
    common = {"inputs": counts, "batch_sizes": list(batch_sizes), "providers": list(session.providers),
              "device": session.device, "atol": atol, "rtol": rtol, "min_cos_required": min_cos, "label": label}
    if failures or not pairs:
        return ParityResult(False, math.inf, math.inf, math.inf, -1.0, 0.0, {}, {}, failures=failures or
                            ["no outputs to compare"], **common)
    ref = np.concatenate([r.reshape(-1) for r, _ in pairs])
    out = np.concatenate([o.reshape(-1) for _, o in pairs])
    if not np.all(np.isfinite(ref)):
        failures.append("the PyTorch reference itself has NaN/Inf outputs")
    if not np.all(np.isfinite(out)):
        failures.append(f"onnxruntime produced {int((~np.isfinite(out)).sum())} NaN/Inf values")
    err = np.abs(out - ref)
    err = np.where(np.isfinite(err), err, math.inf)
    scale = float(np.abs(ref[np.isfinite(ref)]).max(initial=0.0))
    bound = atol * scale + rtol * np.abs(ref)
    beyond = int((err > bound).sum())
    if beyond:
        failures.append(f"{beyond} of {err.size} output values beyond atol x scale + rtol x |ref| "
                        f"(max abs {err.max():.3e})")
    significant = np.abs(ref) >= _REL_FLOOR * scale
    max_rel = float((err[significant] / np.abs(ref[significant])).max(initial=0.0))
    cos = np.concatenate([_row_cosines(r, o) for r, o in pairs])
    worst = float(cos.min())
    if worst < min_cos:
        failures.append(f"{int((cos < min_cos).sum())} of {cos.size} output rows with cosine below {min_cos} "
                        f"(lowest {worst:.9f})")
    with np.errstate(invalid="ignore"):  # inf errors (NaN outputs) make the upper quantiles inf, as they should
        quantiles = {f"p{q * 100:g}": float(np.quantile(err, q)) for q in QUANTILES}
    return ParityResult(passed=not failures, max_abs=float(err.max()), mean_abs=float(err.mean()), max_rel=max_rel,
                        min_cos=worst, output_scale=scale, quantiles=quantiles, histogram=_histogram(err, scale),
                        failures=failures, **common)


def check_parity(module: nn.Module, onnx_model, *, inputs: torch.Tensor, counts: dict[str, int] | None = None,
                 batch_sizes: tuple[int, ...] | list[int] = DEFAULT_BATCH_SIZES, device: str = "auto",
                 atol: float | None = None, rtol: float | None = None, min_cos: float | None = None,
                 label: str = "") -> ParityResult:
    """Compare `module` with an ONNX model (path, bytes or RuntimeSession) on `inputs`; see the module docstring.

    `device` picks the onnxruntime provider ("auto": CUDA when it really works); the PyTorch reference runs on the
    same kind of device, TF32 off. Tolerances default to DEFAULT_ATOL (x output scale), DEFAULT_RTOL, DEFAULT_MIN_COS.
    """
    from bnport.runtime import create_session

    session = onnx_model if isinstance(onnx_model, RuntimeSession) else create_session(onnx_model, device=device)
    reference = ParityReference(module, inputs, counts=counts, batch_sizes=batch_sizes)
    return reference.compare(session, atol=atol, rtol=rtol, min_cos=min_cos, label=label)
