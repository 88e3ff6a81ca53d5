"""The results of `bnport score` as small dataclasses: one `BenchResult` per model x benchmark, gathered in a
`ScoreTable`. TPR values are fractions (0..1); tables print them as percentages. Formatting lives in
bnport.score.format.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from bnport.score.metrics import DEFAULT_FPRS

__all__ = ["DEFAULT_FPRS", "RULES", "BenchResult", "ScoreTable", "fpr_label"]

RULES = ("strict", "insightface")


def fpr_label(fpr: float) -> str:
    """How an FPR target is named in tables and JSON keys: 1e-4 -> "1e-4", 5e-3 -> "5e-3", 0.15 -> "0.15"."""
    mantissa, exponent = f"{fpr:e}".split("e")
    m = float(mantissa)
    return f"{int(m)}e{int(exponent)}" if m == int(m) else f"{fpr:g}"


@dataclass
class BenchResult:
    """One model on one benchmark. `tpr[rule][fpr_label]` is the TPR at that FPR under "strict" (best TPR with
    FPR <= target) and "insightface" (nearest ROC point, as eval_ijbc.py); `noisy[fpr_label]` is True where the
    benchmark has fewer than 10/FPR impostor pairs; `intervals[rule][fpr_label]` = (low, high) with --bootstrap.
    `accuracy` = (mean, std) in percent of insightface's 10-fold accuracy (.bin packs only); `identification` the
    1:N metrics of an IJB release with its 1:N files (bnport.score.identification). `scores_file`:
    per-pair float64 scores in pair order."""

    model: str
    bench: str
    n_genuine: int
    n_impostor: int
    tpr: dict[str, dict[str, float]]
    noisy: dict[str, bool]
    achieved_fpr: dict[str, dict[str, float]] = field(default_factory=dict)
    thresholds: dict[str, dict[str, float]] = field(default_factory=dict)
    intervals: dict[str, dict[str, list[float]]] | None = None
    accuracy: tuple[float, float] | None = None
    identification: dict | None = None
    scores_file: str | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def value(self, metric: str, rule: str = "strict", fpr: float | None = None) -> float:
        """The figure a selection rule reads: "acc" (mean 10-fold accuracy), "tpir" (1:N TPIR at FPIR `fpr`, the
        mean over the galleries) or "tpr" at `fpr` under `rule`."""
        if metric == "acc":
            return self.accuracy[0] if self.accuracy is not None else float("nan")
        if metric == "tpir":
            if not self.identification:
                return float("nan")
            return self.identification["mean"]["tpir"].get(fpr_label(fpr), float("nan"))
        return self.tpr[rule][fpr_label(fpr)]

    def to_dict(self) -> dict:
        return {"model": self.model, "bench": self.bench, "n_genuine": self.n_genuine, "n_impostor": self.n_impostor,
                "tpr": self.tpr, "noisy": self.noisy, "achieved_fpr": self.achieved_fpr,
                "thresholds": self.thresholds, "intervals": self.intervals,
                "accuracy": list(self.accuracy) if self.accuracy is not None else None,
                "identification": self.identification,
                "scores_file": self.scores_file, "seconds": round(self.seconds, 3), **self.extra}


@dataclass
class ScoreTable:
    """Every model x benchmark result, with what is needed to read it: the FPR targets, the benchmarks (kind,
    pairs, switches), the models (how each file was made, its parity), the onnxruntime providers that ran and the
    settings the scoring sessions ran with (`session_settings`: bnport.runtime.sessions.DEPLOY, onnxruntime's
    defaults)."""

    fprs: list[float]
    benches: list[dict]
    models: list[dict]
    results: list[BenchResult]
    providers: list[str]
    device_note: str = ""
    session_settings: dict = field(default_factory=dict)

    def result(self, model: str, bench: str) -> BenchResult | None:
        return next((r for r in self.results if r.model == model and r.bench == bench), None)

    @classmethod
    def from_dict(cls, d: dict) -> "ScoreTable":
        """The table back from table.json."""
        fields = set(BenchResult.__dataclass_fields__)
        results = []
        for r in d["results"]:
            known = {k: v for k, v in r.items() if k in fields}
            known["accuracy"] = tuple(known["accuracy"]) if known.get("accuracy") else None
            results.append(BenchResult(**known, extra={k: v for k, v in r.items() if k not in fields}))
        return cls(fprs=list(d["fprs"]), benches=d["benches"], models=d["models"], results=results,
                   providers=d.get("providers", []), device_note=d.get("device_note", ""),
                   session_settings=d.get("session_settings", {}))

    def to_dict(self) -> dict:
        return {"fprs": self.fprs, "fpr_labels": [fpr_label(f) for f in self.fprs], "benches": self.benches,
                "models": self.models, "providers": self.providers, "device_note": self.device_note,
                "session_settings": self.session_settings,
                "results": [r.to_dict() for r in self.results]}
