"""`ScoreSettings`: what `bnport score` measures and how it chooses (benchmarks, FPR targets, the selection rule and
its guard, bootstrap, batch size, the decode cache and its workers, the precisions and the drop each may cost,
latency, whether to write the handoff bundle). Declared once; the `score` command's options and the `[score]` table
of `bnport run` build it alike. `from_values` parses the rule, the FPRs and the precisions; `with_benchmarks` reads
the benchmark files and checks the rule against them, once: `bnport run` does it before the calibration starts (a
typo fails in seconds) and hands the checked settings to `score`, which uses them as they are.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

from bnport.errors import BnportError
from bnport.export.settings import parse_precisions
from bnport.options import Setting, SettingsGroup
from bnport.score.select import RULE_HELP, Rule, check_rule, parse_rule
from bnport.score.table import DEFAULT_FPRS, fpr_label

CONFIDENT_REPLICATES = 200  # the bootstrap a `,confident` rule runs when --bootstrap is not given


def parse_fprs(fprs: str | list[float] | tuple[float, ...] | None) -> list[float]:
    """"1e-6,1e-4" or a list -> sorted unique FPR targets in (0, 1); None -> 1e-6 ... 1e-1."""
    if fprs is None:
        return list(DEFAULT_FPRS)
    if isinstance(fprs, str):
        try:
            values = [float(v) for v in fprs.split(",") if v.strip()]
        except ValueError:
            raise BnportError(f"bad FPR list {fprs!r}", "give numbers separated by commas, e.g. 1e-6,1e-4,1e-2") \
                from None
    else:
        values = [float(v) for v in fprs]
    if not values or any(not 0 < v < 1 for v in values):
        raise BnportError(f"FPR targets must lie between 0 and 1, got {fprs}", "e.g. 1e-6,1e-5,1e-4")
    return sorted(set(values))


@dataclass(frozen=True)
class ScoreSettings(SettingsGroup):
    """`benches`: bench specs, or Benchmark objects once `with_benchmarks` read them; `fprs`: FPR targets (the rule's
    always among them); `rule`: the selection rule (strict TPR@1e-4 on the first benchmark by default); `guard`: TPR
    points no other FPR may lose vs the baseline; `bootstrap`: replicates for percentile intervals (0: none);
    `batch_size` None: 32 on CPU, 256 on CUDA; `cache_dir` None: $BNPORT_CACHE_DIR or ~/.cache/bnport; `workers`
    None: up to 8 decode processes; `precisions`: fp32 first, then each lower precision to score; `max_drop`: points
    a lower precision may lose at the rule's figure; `latency` None: measured when lower precisions are scored;
    `handoff`: write the bundle of the selected model; `seed`: of the bootstrap."""

    benches: tuple = ()
    fprs: tuple[float, ...] = DEFAULT_FPRS
    rule: Rule = parse_rule(None)
    guard: float | None = None
    bootstrap: int = 0
    batch_size: int | None = None
    cache_dir: str | None = None
    workers: int | None = None
    precisions: tuple[str, ...] = ("fp32",)
    max_drop: float = 0.2
    latency: bool | None = None
    latency_runs: int = 20
    handoff: bool = True
    seed: int = 0

    SETTINGS: ClassVar[tuple[Setting, ...]] = (
        Setting("bench", [], "list[str]", "benchmarks: PATH.bin | ijbc:DIR | ijbb:DIR | pairs:FILE.csv | folder:DIR",
                required=True, path=True),
        Setting("fpr", None, "list[float]", "FPR targets (default 1e-6 ... 1e-1)"),
        Setting("select", "tpr@1e-4", "str", f"selection rule: {RULE_HELP}"),
        Setting("guard", None, "float", "no other FPR may fall more than this many points below the baseline",
                minimum=0.0),
        Setting("bootstrap", 0, "int", "bootstrap replicates: percentile intervals, and paired "
                "intervals of each model against the baseline", minimum=0),
        Setting("batch_size", None, "int", "images per inference batch (default 32 CPU, 256 CUDA)", minimum=1),
        Setting("cache_dir", None, "str", "decoded-image cache (default $BNPORT_CACHE_DIR or ~/.cache/bnport)",
                path=True),
        Setting("workers", None, "int", "decode processes (default: up to 8)", minimum=0),
        Setting("precision", ["fp32"], "list[str]", "precisions to score (fp32, fp16, int8); float32 is always "
                "scored"),
        Setting("max_drop", 0.2, "float", "a lower precision ships when faster and at most this many points below "
                "float32 at the selection rule's figure", minimum=0.0),
    )

    def __post_init__(self) -> None:
        if self.guard is not None and self.guard < 0:
            raise BnportError(f"the guard must be >= 0 points, got {self.guard}", "e.g. 0.1")
        if self.bootstrap < 0:
            raise BnportError(f"bootstrap replicates must be >= 0, got {self.bootstrap}", "e.g. 200")
        if self.max_drop < 0:
            raise BnportError(f"the allowed precision drop must be >= 0 points, got {self.max_drop}", "e.g. 0.2")
        if self.rule.confident and not self.bootstrap:  # ,confident reads the paired intervals the bootstrap makes
            object.__setattr__(self, "bootstrap", CONFIDENT_REPLICATES)
        fprs = parse_fprs(list(self.fprs))
        if self.rule.metric == "tpr" and fpr_label(self.rule.fpr) not in {fpr_label(f) for f in fprs}:
            fprs = sorted([*fprs, self.rule.fpr])  # the rule's FPR is always in the table
        object.__setattr__(self, "fprs", tuple(fprs))
        object.__setattr__(self, "benches", tuple(self.benches))
        object.__setattr__(self, "precisions", tuple(parse_precisions(list(self.precisions))))

    @classmethod
    def _convert(cls, values: dict[str, Any]) -> dict[str, Any]:
        out = dict(values)
        out["benches"] = tuple(out.pop("bench", ()))
        if "fpr" in out:
            out["fprs"] = tuple(parse_fprs(out.pop("fpr")))
        out["rule"] = parse_rule(out.pop("select", None))
        if "precision" in out:
            out["precisions"] = tuple(parse_precisions(out.pop("precision")))
        return out

    @classmethod
    def of(cls, benches, *, select: str | None = None, fprs=None, precisions=None, **values) -> "ScoreSettings":
        """Settings from Python values as a caller writes them (`fprs` "1e-4,1e-2" or a list, `select` text,
        `precisions` "fp32,int8" or a list), unchecked benchmarks; other fields by name."""
        return cls(benches=tuple(benches), rule=parse_rule(select), fprs=tuple(parse_fprs(fprs)),
                   precisions=tuple(parse_precisions(precisions)), **values)

    @property
    def measure_latency(self) -> bool:
        return self.latency if self.latency is not None else len(self.precisions) > 1

    def with_benchmarks(self) -> "ScoreSettings":
        """These settings with every benchmark read (bnport.score.bench; an IJB release's parsed meta files kept in
        the cache folder) and the rule checked against them; the same object when that was done already."""
        from bnport.score.bench import Benchmark, parse_benches

        if self.benches and all(isinstance(b, Benchmark) for b in self.benches):
            return self
        from bnport.score.cache import default_cache_dir

        benchmarks = parse_benches(list(self.benches), cache_dir=self.cache_dir or default_cache_dir())
        check_rule(self.rule, [b.to_dict() for b in benchmarks])
        return replace(self, benches=tuple(benchmarks))
