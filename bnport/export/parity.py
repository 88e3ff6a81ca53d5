"""PyTorch vs onnxruntime parity: real images plus noise inputs, several batch sizes, one pass/fail verdict.

The reference is the original (unfolded) PyTorch module, so a parity pass proves the fold, the export and the
simplification together. Inputs are real images (`load_parity_images`) plus noise that real data never shows:
Gaussian images in normalised input space, constant images (black, grey, white) and uniform random pixels, fed in
batches of several sizes, 1 included. The file is judged against the module run in float64, the exact result as far
as float32 arithmetic is concerned, and the rule knows float32's own noise: PyTorch's float32 forward is itself some
distance from float64 (reordered sums, its kernels' choices, the thread count), and a file as close to float64 as
PyTorch float32 is cannot be told apart from a correct one. Per output, with `scale` = max |float64 output|:

    noise = max |PyTorch float32 - float64| / scale          (the model's own float32 error on these inputs)
    tol   = max(atol, NOISE_MULTIPLE x noise)                 (the larger bound decides, and the report says which)
    every element: |ort - float64| <= tol x scale + rtol x |float64|;  every row: cosine(ort, float64) >= min_cos

On a well-conditioned model (iresnet50, float32 CPU: noise 1-3e-6 of the scale) `atol` decides and the rule is the
fixed tolerance it always was; on an ill-conditioned one (timm MixNet with randomised statistics: noise 1.8e-4) the
noise decides, so the verdict does not flip with the thread count. Wrong folds (eps dropped, one shift lost, a shift
put into a padded conv's bias, one channel 1% off) are off by 3e-3 to 1 of the scale, far beyond either bound; see
tests/export/test_parity.py. A module that cannot run in float64 is judged against its float32 self with `atol` alone,
and the result says so. CUDA references run with TF32 off.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn

from bnport.data.transforms import InputSpec
from bnport.errors import BnportError
from bnport.export.gate_stats import REL_FLOOR, histogram, json_float, quantiles, row_cosines
from bnport.runtime.sessions import RuntimeSession

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-4
DEFAULT_MIN_COS = 0.99999
# a file may be this many times as far from float64 as PyTorch float32 itself is (see the module docstring)
NOISE_MULTIPLE = 4.0
DEFAULT_BATCH_SIZES = (1, 2, 8)
BOUND_ATOL = "atol"
BOUND_NOISE = "float32 noise"


@dataclass
class OutputParity:
    """One output's figures: `scale` = max |reference|; `max_abs` = max |ort - reference|; `reference_noise` =
    max |PyTorch float32 - float64| / scale (None without a float64 reference); `tolerance` = the bound used, as a
    fraction of `scale`, and `bound` which one it was ("atol" or "float32 noise"); `beyond` counts the elements over
    it; `max_abs_torch` = max |ort - PyTorch float32| (what earlier reports called max abs)."""

    name: str
    scale: float
    max_abs: float
    max_abs_torch: float
    min_cos: float
    reference_noise: float | None
    tolerance: float
    bound: str
    beyond: int
    size: int

    def to_dict(self) -> dict:
        return {k: json_float(v) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass
class ParityResult:
    """PyTorch vs onnxruntime figures; truthy when every check passed.

    The errors are against `reference`: "float64" (the module run in float64) or "float32" (PyTorch float32, when
    the module cannot run in float64; `reference_note` says why). `max_abs`, `mean_abs` and `quantiles` (p50 ...
    p99.9 of |ort - ref|) are absolute errors over all outputs; `output_scale` is max |ref| over all outputs, and
    `outputs` has each output's own scale, error and bound; `max_rel` is max |ort - ref| / |ref| over elements with
    |ref| >= 1e-3 x their output's scale; `min_cos` is the lowest cosine similarity between an output row and its
    reference. `inputs` counts inputs per kind (`noise_only` when no real image was among them).
    `reference_noise`: max over outputs of |PyTorch float32 - float64| / scale, the part of any float32 runtime's
    error that is the model's own arithmetic; `torch_min_cos`: PyTorch float32's own lowest row cosine against
    float64. `bound` says which bound decided: "atol", "float32 noise" (NOISE_MULTIPLE x reference_noise was
    larger), or one per output when they differ.
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
    reference: str = "float32"
    reference_note: str = ""
    noise_multiple: float = NOISE_MULTIPLE
    bound: str = BOUND_ATOL
    torch_min_cos: float | None = None
    outputs: list[OutputParity] = field(default_factory=list)
    session_settings: dict = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def n_inputs(self) -> int:
        return sum(self.inputs.values())

    @property
    def noise_only(self) -> bool:
        """Whether every input was synthetic noise (no real image): the check then says less about real data."""
        return not self.inputs.get("real", 0)

    @property
    def bound_text(self) -> str:
        """One line on which bound decided, with its value, for the report and the card."""
        if not self.outputs:
            return "not reached"
        parts = []
        for out in self.outputs:
            where = f"{out.name}: " if len(self.outputs) > 1 else ""
            if out.bound == BOUND_NOISE:
                parts.append(f"{where}float32 noise ({self.noise_multiple:g} x PyTorch float32's own error "
                             f"{out.reference_noise:.1e} = {out.tolerance:.1e} x scale; atol is {self.atol:g})")
            else:
                noise = "" if out.reference_noise is None else f"; {self.noise_multiple:g} x PyTorch float32's " \
                    f"own error would be {self.noise_multiple * out.reference_noise:.1e}"
                parts.append(f"{where}atol ({self.atol:g} x scale{noise})")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        """Plain JSON types; a non-finite figure (NaN outputs) becomes the string "inf" or "nan"."""
        return {"passed": self.passed, "max_abs": json_float(self.max_abs), "mean_abs": json_float(self.mean_abs),
                "max_rel": json_float(self.max_rel), "min_cos": json_float(self.min_cos),
                "output_scale": self.output_scale, "quantiles": {k: json_float(v) for k, v in self.quantiles.items()},
                "histogram": self.histogram, "inputs": self.inputs, "noise_only": self.noise_only,
                "batch_sizes": self.batch_sizes, "providers": self.providers, "device": self.device,
                "reference": self.reference, "reference_note": self.reference_note,
                "tolerances": {"atol": self.atol, "atol_is_relative_to": "output_scale", "rtol": self.rtol,
                               "min_cos": self.min_cos_required, "noise_multiple": self.noise_multiple},
                "bound": self.bound, "bound_text": self.bound_text,
                "outputs": [o.to_dict() for o in self.outputs], "failures": self.failures, "label": self.label,
                "reference_noise": self.reference_noise,
                "torch_min_cos": None if self.torch_min_cos is None else json_float(self.torch_min_cos),
                "session_settings": self.session_settings}

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        kinds = ", ".join(f"{n} {k}" for k, n in self.inputs.items() if n)
        sizes = ", ".join(str(b) for b in self.batch_sizes)
        what = f" ({self.label})" if self.label else ""
        only = "; noise inputs only, no real images" if self.noise_only else ""
        quant = "  ".join(f"{k} {v:.2e}" for k, v in self.quantiles.items())
        lines = [
            (f"parity {verdict}{what} on onnxruntime {', '.join(self.providers)}: {self.n_inputs} inputs ({kinds}"
             f"{only}), batch sizes {sizes}"),
            (f"  rule: |ort - {self.reference}| <= max(atol {self.atol:g}, {self.noise_multiple:g} x PyTorch float32's "
             f"own error) x output scale + {self.rtol:g} x |ref|, every output row cosine >= {self.min_cos_required}"),
            f"  bound: {self.bound_text}",
        ]
        if self.reference_note:
            lines.append(f"  reference: {self.reference_note}")
        lines += [
            (f"  max abs {self.max_abs:.3e} at scale {self.output_scale:.4g}, max rel {self.max_rel:.3e} (values >= "
             f"{REL_FLOOR:g} x scale), min row cosine {self.min_cos:.9f}"),
            f"  abs error quantiles: {quant}  max {self.max_abs:.2e}; mean {self.mean_abs:.2e}",
        ]
        if self.reference_noise is not None:
            cos = "" if self.torch_min_cos is None else f", min row cosine {self.torch_min_cos:.9f}"
            lines.append(f"  PyTorch float32 vs float64: {self.reference_noise:.2e} x scale{cos}")
        if len(self.outputs) > 1:
            lines += [f"  {o.name}: scale {o.scale:.4g}, max abs {o.max_abs:.3e}, tolerance {o.tolerance:.1e} x "
                      f"scale ({o.bound}), min row cosine {o.min_cos:.9f}" for o in self.outputs]
        lines += [f"  failed: {f}" for f in self.failures]
        return "\n".join(lines)


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
    """(start, stop) ranges covering 0..n once, cut cycling through `batch_sizes` (the last one may be shorter),
    returned grouped by size: a runtime that plans per input shape (cuDNN on CUDA) plans each size once."""
    ranges, start = [], 0
    for size in _cycle(batch_sizes):
        if start >= n:
            return sorted(ranges, key=lambda r: (r[1] - r[0], r[0]))
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

    `inputs` are network inputs (Nx3xHxW); `counts` says how many of each kind they hold (for the report). The
    float32 outputs (`outputs`) and the float64 ones (`exact_outputs`) are each computed on first use.
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
        self._exact: list[list[np.ndarray]] | None = None
        self._exact_note: str | None = None

    def outputs(self, device: str = "cpu") -> list[list[np.ndarray]]:
        """Per batch, the module's outputs as float32 arrays (computed on `device` the first time)."""
        if self._outputs is not None and self._device == device:
            return self._outputs
        self._outputs = [[o.numpy() for o in batch] for batch in self._run(torch.float32, device)]
        self._device = device
        return self._outputs

    def exact_outputs(self, device: str = "cpu") -> tuple[list[list[np.ndarray]] | None, str]:
        """Per batch, the module's outputs computed in float64 on a copy (on `device`, TF32 off), and "" ; or None
        and the reason when the module cannot run in float64 (code that makes float32 tensors of its own, say) or
        gives non-finite values where float32 does not."""
        if self._exact_note is None:
            try:
                batches = self._run(torch.float64, device)
                finite32 = all(np.isfinite(o).all() for batch in self.outputs(device) for o in batch)
                if finite32 and not all(torch.isfinite(o).all() for batch in batches for o in batch):
                    raise ValueError("float64 outputs have NaN/Inf where float32 ones do not")
                self._exact, self._exact_note = [[o.numpy() for o in batch] for batch in batches], ""
            except Exception as err:  # noqa: BLE001 - any failure means no float64 reference; the result says why
                first = (str(err).strip().splitlines() or [""])[0]
                self._exact, self._exact_note = None, f"{type(err).__name__}: {first[:200]}"
        return self._exact, self._exact_note

    def _run(self, dtype: torch.dtype, device: str) -> list[list[torch.Tensor]]:
        """The module's outputs per batch (on the CPU), run in `dtype` on `device` with TF32 off. The caller's module
        is left as it was (bnport.runtime.device.module_on: a copy does the run wherever a move would be needed)."""
        from bnport.runtime.device import module_on

        results = []
        with module_on(self.module, device, dtype) as module, no_tf32():
            for start, stop in self.batches:
                with torch.inference_mode():
                    out = flatten_outputs(module(self.inputs[start:stop].to(device, dtype)))
                    results.append([o.detach().to("cpu", dtype) for o in out])
        return results

    def compare(self, session: RuntimeSession, *, atol: float | None = None, rtol: float | None = None,
                min_cos: float | None = None, label: str = "", noise_multiple: float | None = None) -> ParityResult:
        """Run `session` on the same batches and judge it against the reference (None = the module's defaults:
        DEFAULT_ATOL, DEFAULT_RTOL, DEFAULT_MIN_COS, NOISE_MULTIPLE)."""
        atol = DEFAULT_ATOL if atol is None else atol
        rtol = DEFAULT_RTOL if rtol is None else rtol
        min_cos = DEFAULT_MIN_COS if min_cos is None else min_cos
        noise_multiple = NOISE_MULTIPLE if noise_multiple is None else noise_multiple
        device = reference_device(session.device)
        torch32 = self.outputs(device)
        failures: list[str] = []
        got = []
        for (start, stop), ref in zip(self.batches, torch32):
            out = session.run_all(self.inputs[start:stop].numpy())
            if len(out) != len(ref):
                failures.append(f"the ONNX model has {len(out)} outputs, PyTorch {len(ref)}")
                break
            mismatch = next(((o, r) for o, r in zip(out, ref) if o.shape != r.shape), None)
            if mismatch is not None:
                failures.append(f"output shape {list(mismatch[0].shape)} differs from PyTorch "
                                f"{list(mismatch[1].shape)} at batch size {stop - start}")
                break
            got.append(out)
        common = {"inputs": self.counts, "batch_sizes": list(self.batch_sizes), "providers": list(session.providers),
                  "device": session.device, "atol": atol, "rtol": rtol, "min_cos_required": min_cos, "label": label,
                  "noise_multiple": noise_multiple, "session_settings": dict(session.settings)}
        if failures or not got:
            return ParityResult(False, math.inf, math.inf, math.inf, -1.0, 0.0, {}, {},
                                failures=failures or ["no outputs to compare"], **common)
        exact, note = self.exact_outputs(device)
        names = list(session.output_names) if len(session.output_names) == len(got[0]) else \
            [f"output {i}" for i in range(len(got[0]))]
        outputs = [_OutputData(names[i], [b[i] for b in torch32], [b[i] for b in got],
                               None if exact is None else [b[i] for b in exact]) for i in range(len(names))]
        result = _judge(outputs, common, noise_multiple=noise_multiple)
        if exact is None:
            result.reference_note = f"no float64 reference ({note}): judged against PyTorch float32 by atol alone"
        elif not result.passed and result.torch_min_cos is not None and result.torch_min_cos < min_cos:
            result.failures.append(
                f"PyTorch float32 itself is only {result.torch_min_cos:.9f} in row cosine from float64 on these "
                "inputs: the model is ill-conditioned there and no float32 export can meet this --min-cos; loosen "
                "it or check the model")
        return result

    def float32_noise(self, reference: list[list[np.ndarray]], scale: float) -> float | None:
        """max |`reference` (PyTorch float32 outputs per batch) - float64| / scale: the error any float32 runtime
        may show for reasons of arithmetic alone. None when the module cannot run in float64."""
        exact, _ = self.exact_outputs(self._device or "cpu")
        if exact is None or scale <= 0:
            return None
        worst = max((float(np.abs(r - e).max(initial=0.0)) for rb, eb in zip(reference, exact)
                     for r, e in zip(rb, eb)), default=0.0)
        return worst / scale


@dataclass
class _OutputData:
    """One output across the batches: PyTorch float32, onnxruntime, and float64 (None when unavailable)."""
    name: str
    torch32: list[np.ndarray]
    got: list[np.ndarray]
    exact: list[np.ndarray] | None


def reference_device(ort_device: str) -> str:
    """Where the PyTorch reference runs: CUDA only when onnxruntime runs on CUDA and torch can use it too."""
    from bnport.runtime.device import cuda_works

    return "cuda" if ort_device == "cuda" and cuda_works()[0] else "cpu"


def _flat(batches: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([b.reshape(-1) for b in batches]).astype(np.float64)


def _judge(outputs: list[_OutputData], common: dict, *, noise_multiple: float) -> ParityResult:
    """Each output against its reference with its own scale and bound; the figures over all outputs."""
    atol, rtol, min_cos = common["atol"], common["rtol"], common["min_cos_required"]
    failures: list[str] = []
    figures: list[OutputParity] = []
    errors, relative, significant_rel, cosines, torch_cosines, scales, noises = [], [], [], [], [], [], []
    for out in outputs:
        reference = out.exact if out.exact is not None else out.torch32
        ref, got, t32 = _flat(reference), _flat(out.got), _flat(out.torch32)
        where = f"{out.name}: " if len(outputs) > 1 else ""
        if not np.all(np.isfinite(ref)):
            failures.append(f"{where}the PyTorch reference itself has NaN/Inf outputs")
        if not np.all(np.isfinite(got)):
            failures.append(f"{where}onnxruntime produced {int((~np.isfinite(got)).sum())} NaN/Inf values")
        err = np.abs(got - ref)
        err = np.where(np.isfinite(err), err, math.inf)
        scale = float(np.abs(ref[np.isfinite(ref)]).max(initial=0.0))
        noise = None
        if out.exact is not None:
            own = np.abs(t32 - ref)
            noise = float(own[np.isfinite(own)].max(initial=0.0)) / scale if scale > 0 else 0.0
            torch_cosines.append(np.concatenate([row_cosines(e, t) for e, t in zip(out.exact, out.torch32)]))
            noises.append(noise)
        tolerance = max(atol, noise_multiple * noise) if noise is not None else atol
        bound = BOUND_NOISE if tolerance > atol else BOUND_ATOL
        beyond = int((err > tolerance * scale + rtol * np.abs(ref)).sum())
        if beyond:
            failures.append(f"{where}{beyond} of {err.size} output values beyond {tolerance:.1e} x scale ({bound}) + "
                            f"rtol x |ref| (max abs {err.max():.3e} = {err.max() / scale if scale else math.inf:.1e} x "
                            "scale)")
        cos = np.concatenate([row_cosines(r, o) for r, o in zip(reference, out.got)])
        if cos.min() < min_cos:
            failures.append(f"{where}{int((cos < min_cos).sum())} of {cos.size} output rows with cosine below "
                            f"{min_cos} (lowest {cos.min():.9f})")
        significant = np.abs(ref) >= REL_FLOOR * scale
        figures.append(OutputParity(out.name, scale, float(err.max(initial=0.0)),
                                    float(np.abs(got - t32).max(initial=0.0)), float(cos.min()), noise, tolerance,
                                    bound, beyond, int(err.size)))
        errors.append(err)
        relative.append(err / scale if scale > 0 else err)
        significant_rel.append(err[significant] / np.abs(ref[significant]))
        cosines.append(cos)
        scales.append(scale)
    err = np.concatenate(errors)
    quantile_figures = quantiles(err)
    bounds = {f.bound for f in figures}
    return ParityResult(
        passed=not failures, max_abs=float(err.max()), mean_abs=float(err.mean()),
        max_rel=float(np.concatenate(significant_rel).max(initial=0.0)), min_cos=float(np.concatenate(cosines).min()),
        output_scale=max(scales), quantiles=quantile_figures, histogram=histogram(np.concatenate(relative)),
        failures=failures, reference="float64" if noises else "float32",
        reference_noise=max(noises) if noises else None,
        bound=bounds.pop() if len(bounds) == 1 else "per output",
        torch_min_cos=float(np.concatenate(torch_cosines).min()) if torch_cosines else None, outputs=figures, **common)


def check_parity(module: nn.Module, onnx_model, *, inputs: torch.Tensor, counts: dict[str, int] | None = None,
                 batch_sizes: tuple[int, ...] | list[int] = DEFAULT_BATCH_SIZES, device: str = "auto",
                 atol: float | None = None, rtol: float | None = None, min_cos: float | None = None,
                 label: str = "") -> ParityResult:
    """Compare `module` with an ONNX model (path, bytes or RuntimeSession) on `inputs`; see the module docstring.

    `device` picks the onnxruntime provider ("auto": CUDA when it really works); the PyTorch reference runs on the
    same kind of device, TF32 off. Tolerances default to DEFAULT_ATOL (x output scale), DEFAULT_RTOL, DEFAULT_MIN_COS
    (`ParityReference.compare` also takes another noise multiple).
    """
    from bnport.runtime.sessions import GATE, create_session

    session = onnx_model if isinstance(onnx_model, RuntimeSession) else \
        create_session(onnx_model, device=device, use=GATE)
    reference = ParityReference(module, inputs, counts=counts, batch_sizes=batch_sizes)
    return reference.compare(session, atol=atol, rtol=rtol, min_cos=min_cos, label=label)
