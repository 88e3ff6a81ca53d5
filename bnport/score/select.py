"""Which model to ship: a stated selection rule over the score table, an optional guard, and the handoff bundle.

Rules (`--select`): `tpr@FPR` (strict rule: best TPR with FPR <= target; the default is `tpr@1e-4`),
`strict:tpr@FPR`, `insightface:tpr@FPR` (nearest ROC point, as published tables), `acc` (insightface's 10-fold
accuracy; .bin packs only), `tpir@FPIR` (1:N TPIR at FPIR 1e-2 or 1e-1, the mean over the galleries; an IJB release
with its 1:N files); `,bench=NAME` applies it to another benchmark than the first. `,confident` (TPR rules): a
model beats the baseline only when the paired 95% interval of its gain clears 0; `bnport run` and the demo apply it by
default where the rule's benchmark is large enough (at least 10/FPR impostor pairs), `,confident=off` says not to.
The guard (`--guard X`) drops any model for which some other FPR of that benchmark falls more than X points
(percentage points of TPR) below the baseline under the same rule. Models that failed parity are never selected. The
best value wins; ties go to the earlier model (the baseline first, then snapshots in order); when no model beats the
baseline, the baseline is selected and the selection says so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from bnport.errors import BnportError
from bnport.score.table import ScoreTable, fpr_label

DEFAULT_RULE = "tpr@1e-4"
# a lower precision must be at least this much faster to be worth shipping: smaller gaps are timing noise
MAX_LATENCY_RATIO = 0.9
RULE_HELP = ("tpr@1e-4 | strict:tpr@1e-5 | insightface:tpr@1e-6 | acc | tpir@1e-2, optionally ,bench=NAME and (TPR "
             "rules) ,confident or ,confident=off")


@dataclass(frozen=True)
class Rule:
    """metric "tpr" (at `fpr` under `rule`), "acc" or "tpir"; `bench` None means the first benchmark. `confident`:
    True/False as the rule text said (`,confident`, `,confident=off`), None when it said nothing (off); `auto`: it
    was switched on by default (bnport run), so a benchmark too small for it turns it off again."""

    metric: str
    rule: str = "strict"
    fpr: float | None = None
    bench: str | None = None
    confident: bool | None = None
    auto: bool = False

    def describe(self) -> str:
        if self.metric == "acc":
            return "10-fold accuracy (insightface verification.py)"
        if self.metric == "tpir":
            return f"1:N TPIR@FPIR={fpr_label(self.fpr)} (mean over the galleries)"
        how = "strict rule: best TPR with FPR <= target" if self.rule == "strict" else \
            "insightface rule: nearest ROC point"
        return f"TPR@FPR={fpr_label(self.fpr)} ({how})"

    def short(self) -> str:
        if self.metric == "tpir":
            text = f"tpir@{fpr_label(self.fpr)}"
        else:
            text = "acc" if self.metric == "acc" else f"{self.rule}:tpr@{fpr_label(self.fpr)}"
        return text + (",confident" if self.confident else "")


def parse_rule(text: str | None) -> Rule:
    """`--select` text -> Rule; see the module docstring."""
    text = (text or DEFAULT_RULE).strip()
    head, *opts = [t.strip() for t in text.split(",")]
    bench, confident = None, None
    for opt in opts:
        key, eq, value = opt.partition("=")
        if key == "confident" and (not eq or value in ("on", "off")):
            confident = value != "off"
            continue
        if key != "bench" or not eq or not value:
            raise BnportError(f"bad selection rule {text!r}: unknown option {opt!r}", f"use {RULE_HELP}")
        bench = value
    if confident is not None and (head.lower() == "acc" or head.lower().startswith("tpir@")):
        raise BnportError(f"bad selection rule {text!r}: confident applies to TPR rules (tpr@FPR)",
                          "drop ,confident or select by tpr@FPR")
    if head.lower() == "acc":
        return Rule("acc", bench=bench)
    if head.lower().startswith("tpir@"):
        from bnport.score.identification import FPIRS

        try:
            fpir = float(head.partition("@")[2])
        except ValueError:
            fpir = -1.0
        if fpr_label(fpir) not in {fpr_label(f) for f in FPIRS}:
            raise BnportError(f"bad selection rule {text!r}: TPIR is reported at FPIR "
                              f"{' and '.join(fpr_label(f) for f in FPIRS)}", "use tpir@1e-2 or tpir@1e-1")
        return Rule("tpir", "1:N", fpir, bench)
    rule, sep, rest = head.partition(":")
    if not sep:
        rule, rest = "strict", head
    if rule not in ("strict", "insightface"):
        raise BnportError(f"bad selection rule {text!r}: unknown TPR rule {rule!r}", f"use {RULE_HELP}")
    metric, at, fpr_text = rest.partition("@")
    try:
        fpr = float(fpr_text)
    except ValueError:
        fpr = -1.0
    if metric.lower() != "tpr" or not at or not 0 < fpr < 1:
        raise BnportError(f"bad selection rule {text!r}", f"use {RULE_HELP} (FPR between 0 and 1)")
    return Rule("tpr", rule, fpr, bench, confident)


@dataclass
class Selection:
    """The outcome: `selected` (a model label), the value each eligible model reached, and for every other model
    the reason it lost. `beats_baseline` False means the baseline was kept because nothing did better."""

    rule: Rule
    bench: str
    baseline: str | None
    selected: str | None
    guard: float | None
    values: dict[str, float] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    beats_baseline: bool = False
    notes: list[str] = field(default_factory=list)
    baseline_is_snapshot: bool = True
    precision: str = "fp32"
    final: str | None = None
    precision_reasons: dict[str, str] = field(default_factory=dict)
    max_drop: float | None = None

    @property
    def handoff(self) -> str | None:
        """The label of the file that ships: the selected snapshot at the chosen precision."""
        return self.final or self.selected

    def to_dict(self) -> dict:
        return {"rule": self.rule.short(), "rule_text": self.rule.describe(), "bench": self.bench,
                "baseline": self.baseline, "selected": self.selected, "guard_points": self.guard,
                "values": self.values, "reasons": self.reasons, "beats_baseline": self.beats_baseline,
                "notes": self.notes, "baseline_is_snapshot": self.baseline_is_snapshot, "precision": self.precision,
                "final": self.handoff,
                "precision_reasons": self.precision_reasons, "max_drop_points": self.max_drop, "text": self.lines()}

    def lines(self) -> list[str]:
        """The selection in words, for the terminal and report.md."""
        def pct(v: float) -> str:
            return f"{v:.2f}%" if self.rule.metric == "acc" else f"{100 * v:.2f}"

        what = f"{self.rule.describe()} on {self.bench}"
        guard = f", guard {self.guard:g} points vs baseline at every other FPR" if self.guard is not None else ""
        confident = "; a win counts only when its paired 95% interval clears 0 (,confident)" \
            if self.rule.confident else ""
        out = [f"selection rule: {what}{guard}; ties go to the earlier model{confident}"]
        if self.selected is None:
            out.append("selected: nothing (no model passed parity and the guard)")
        elif len(self.values) == 1:
            out.append(f"selected: {self.selected} ({pct(self.values[self.selected])}), the only model scored")
        elif self.selected == self.baseline and not self.beats_baseline:
            if self.baseline_is_snapshot:
                out.append(f"selected: {self.selected} — no snapshot beats the baseline "
                           f"({pct(self.values[self.selected])}), so the baseline is selected")
            else:
                out.append(f"selected: {self.selected} ({pct(self.values[self.selected])}) — no other model beats "
                           "it; it is the first listed, the reference the others are compared with")
        else:
            name = "baseline" if self.baseline_is_snapshot else f"the reference {self.baseline}"
            base = f" vs {name} {pct(self.values[self.baseline])}" if self.baseline in self.values else ""
            out.append(f"selected: {self.selected} ({pct(self.values[self.selected])}{base})")
        out += [f"  {label}: {why}" for label, why in self.reasons.items()]
        if self.precision_reasons:
            unit = "%" if self.rule.metric == "acc" else " points"
            out.append(f"precision: {self.precision} ({self.handoff}); a lower precision is taken when it is faster "
                       f"and loses at most {self.max_drop:g}{unit} at the rule's figure against the same snapshot "
                       "in float32")
            out += [f"  {p}: {why}" for p, why in self.precision_reasons.items()]
        out += self.notes
        return out


def check_rule(rule: Rule, benches: list[dict]) -> str:
    """The benchmark `rule` applies to (checked before any model runs): it must be scored, and `acc` needs a .bin."""
    names = [b["name"] for b in benches]
    bench = rule.bench or names[0]
    if bench not in names:
        raise BnportError(f"selection bench {bench!r} is not among the benchmarks scored ({', '.join(names)})",
                          "name one of them in --select ...,bench=NAME")
    kind = next(b["kind"] for b in benches if b["name"] == bench)
    if rule.metric == "acc" and kind != "bin":
        raise BnportError(f"--select acc needs an insightface .bin benchmark, {bench} is {kind}",
                          "use a TPR rule such as tpr@1e-4, or name a .bin benchmark with ,bench=NAME")
    if rule.metric == "tpir" and not next(b.get("identification") for b in benches if b["name"] == bench):
        raise BnportError(f"--select tpir needs an IJB release with its 1:N files, {bench} has none",
                          "add the release's meta/*_1N_*.csv files, or select by a TPR rule")
    return bench


def confident_by_default(rule: Rule) -> Rule:
    """`rule` as `bnport run` and the demo apply it: a TPR rule that says nothing of `,confident` gets it, to be
    dropped again where the benchmark is too small for it (select_model)."""
    if rule.metric != "tpr" or rule.confident is not None:
        return rule
    return replace(rule, confident=True, auto=True)


def select_model(table: ScoreTable, rule: Rule, *, guard: float | None = None,
                 baseline: str | None = None) -> Selection:
    """Apply `rule` (and `guard`, in TPR points) to `table` (whose FPR targets include the rule's). `baseline`:
    the label of the reference model (the run's 0000), None = the first model in the table."""
    bench = check_rule(rule, table.benches)
    if rule.metric == "tpr" and fpr_label(rule.fpr) not in {fpr_label(f) for f in table.fprs}:
        raise BnportError(f"the selection FPR {fpr_label(rule.fpr)} is not among the table's FPR targets",
                          f"add it to --fpr (now {', '.join(fpr_label(f) for f in table.fprs)})")
    small = rule.auto and any(r.noisy.get(fpr_label(rule.fpr)) for r in table.results if r.bench == bench)
    if small:
        rule = replace(rule, confident=False)
    float32 = [m for m in table.models if m.get("precision", "fp32") == "fp32"]
    labels = [m["label"] for m in float32]
    is_snapshot = baseline in labels
    baseline = baseline if is_snapshot else (labels[0] if labels else None)
    selection = Selection(rule=rule, bench=bench, baseline=baseline, selected=None, guard=guard,
                          baseline_is_snapshot=is_snapshot)
    if small:
        selection.notes.append(f"note: ,confident (bnport run's default) is off: {bench} has fewer than 10/FPR "
                               f"impostor pairs at {fpr_label(rule.fpr)}, too few for a paired interval")
    base_result = table.result(baseline, bench) if baseline else None
    if baseline is not None and base_result is None:
        selection.notes.append(f"note: the baseline {baseline} has no score (it failed parity), so nothing is "
                               "compared with it and the guard is not applied")
    eligible = []
    for model in float32:  # snapshots compete in float32; lower precisions are chosen afterwards (choose_precision)
        label = model["label"]
        result = table.result(label, bench)
        if not model["passed"] or result is None:
            selection.reasons[label] = f"not eligible: failed parity ({model.get('failure') or 'no verified file'})"
            continue
        value = result.value(rule.metric, rule.rule, rule.fpr)
        if math.isnan(value):
            selection.reasons[label] = "not eligible: no value for the rule"
            continue
        selection.values[label] = value
        broken = _guard_breach(table, result, base_result, rule, guard) if label != baseline else None
        if broken:
            selection.reasons[label] = f"excluded by the guard: {broken}"
            continue
        eligible.append((label, value))
    if rule.metric == "tpr" and any(table.result(label, bench).noisy.get(fpr_label(rule.fpr))
                                    for label, _ in eligible):
        selection.notes.append(f"warning: on {bench}, TPR@{fpr_label(rule.fpr)} rests on fewer than 10/FPR impostor "
                               "pairs, so this selection is decided by noise; select at a larger FPR or on a "
                               "larger benchmark")
    if not eligible:
        return selection
    best_label, best_value = eligible[0]
    for label, value in eligible[1:]:
        if value > best_value:
            best_label, best_value = label, value
    selection.selected = best_label
    base_value = selection.values.get(baseline)
    selection.beats_baseline = base_value is None or (best_label != baseline and best_value > base_value)
    if best_label != baseline and _within_noise(table, selection, best_label) and rule.confident:
        selection.reasons[best_label] = f"best by {100 * (best_value - base_value):.2f} points, but within noise (the "\
            "paired interval reaches 0): ,confident keeps the baseline"
        eligible = [(label, value) for label, value in eligible if label != best_label]
        best_label, best_value, selection.selected = baseline, base_value, baseline
        selection.beats_baseline = False
    unit = "%" if rule.metric == "acc" else " points"
    scale = 1.0 if rule.metric == "acc" else 100.0
    for label, value in eligible:
        if label == best_label:
            continue
        if value == best_value:
            selection.reasons[label] = f"ties with {best_label}, which comes first"
        else:
            selection.reasons[label] = f"{scale * (best_value - value):.2f}{unit} below {best_label}"
    return selection


def _within_noise(table: ScoreTable, selection: Selection, label: str) -> bool:
    """Whether `label`'s win over the baseline is within noise by its paired bootstrap interval (which a note
    states); False without one."""
    result = table.result(label, selection.bench)
    paired = (result.extra.get("paired") if result is not None else None) or None
    if paired is None:
        if selection.rule.confident:
            selection.notes.append("note: no paired interval was computed, so ,confident could not judge the win")
        return False
    low, high = paired["low"], paired["high"]
    verdict = "more than noise" if low > 0 else "within noise"
    selection.notes.append(f"paired bootstrap ({paired['replicates']} replicates, resampling {paired['units']}): "
                           f"{label} {100 * paired['delta']:+.2f} points over {selection.baseline} at "
                           f"TPR@{paired['fpr']} (95%: {100 * low:+.2f} .. {100 * high:+.2f}): {verdict}")
    return low <= 0


def _guard_breach(table: ScoreTable, result, base_result, rule: Rule, guard: float | None) -> str | None:
    """Why `result` breaks the guard (the first FPR where it falls more than `guard` points below the baseline)."""
    if guard is None or base_result is None:
        return None
    tpr_rule = rule.rule if rule.metric == "tpr" else "strict"
    for fpr in table.fprs:
        if rule.metric == "tpr" and fpr_label(fpr) == fpr_label(rule.fpr):
            continue
        key = fpr_label(fpr)
        drop = 100 * (base_result.tpr[tpr_rule][key] - result.tpr[tpr_rule][key])
        if drop > guard + 1e-9:
            return (f"TPR@{key} {100 * result.tpr[tpr_rule][key]:.2f} is {drop:.2f} points below the baseline's "
                    f"{100 * base_result.tpr[tpr_rule][key]:.2f} (more than {guard:g})")
    return None


def _int8_on_cuda_note(model: dict) -> str:
    """For INT8 timed on CUDA without TensorRT: why it is slow, and where it would not be."""
    latency = model.get("latency") or {}
    if model.get("precision") != "int8" or latency.get("device") != "cuda" or \
            "TensorrtExecutionProvider" in latency.get("providers", []):
        return ""
    return "; onnxruntime's CUDA provider runs QDQ INT8 as float kernels between Quantize/DequantizeLinear nodes: " \
           "INT8 pays off on a CPU (score with --device cpu) or with TensorRT"


def choose_precision(table: ScoreTable, selection: Selection, *, max_drop: float = 0.2) -> Selection:
    """Among the precisions of the selected snapshot, take the fastest (median latency at batch 8, at most
    MAX_LATENCY_RATIO of float32's in both the median and the fastest run: a smaller gain is timing noise) whose
    figure under the selection rule is at most `max_drop` points (TPR points, or accuracy %) below the same snapshot
    in float32; float32 otherwise. FP16 timed on a CPU is never shipped (onnxruntime computes it in float32
    there). Says for every precision why it was or was not taken."""
    selection.max_drop = max_drop
    family = [m for m in table.models if (m.get("base") or m["label"]) == selection.selected]
    if selection.selected is None or len(family) < 2:
        return selection
    rule, bench = selection.rule, selection.bench
    scale, unit = (1.0, "%") if rule.metric == "acc" else (100.0, " points")
    what = {"acc": "accuracy", "tpir": f"TPIR@{fpr_label(rule.fpr)}"}.get(rule.metric, f"TPR@{fpr_label(rule.fpr)}")

    def speed(model, figure: str = "median_ms") -> float:
        latency = (model.get("latency") or {}).get(figure, {})
        return float(latency.get("8", latency.get(8, math.inf)))

    def faster(model) -> bool:  # median and fastest run both: a one-sided gain is timing noise
        return all(speed(model, f) / speed(reference, f) <= MAX_LATENCY_RATIO for f in ("median_ms", "min_ms"))

    reference = next(m for m in family if m.get("precision", "fp32") == "fp32")
    base_value = table.result(reference["label"], bench).value(rule.metric, rule.rule, rule.fpr)
    base_speed = speed(reference)
    contenders = []
    for model in family:
        if model is reference:
            continue
        precision = model.get("precision", "fp32")
        result = table.result(model["label"], bench)
        if not model["passed"] or result is None:
            selection.precision_reasons[precision] = f"failed its gate against float32 ({model.get('failure')})"
            continue
        drop = scale * (base_value - result.value(rule.metric, rule.rule, rule.fpr))
        ratio = speed(model) / base_speed if math.isfinite(base_speed) and base_speed > 0 else math.nan
        figures = f"{what} {0.0 - drop:+.2f}{unit}, " + (f"{ratio:.2f}x the float32 latency at batch 8"
                                                     if math.isfinite(ratio) else "latency not measured")
        if drop > max_drop + 1e-9:
            selection.precision_reasons[precision] = f"{figures}: loses more than the {max_drop:g} allowed"
        elif precision == "fp16" and (model.get("latency") or {}).get("device") == "cpu":
            selection.precision_reasons[precision] = f"{figures}: onnxruntime's CPU provider has no float16 " \
                                                     "kernels (it computes in float32), so FP16 is not shipped for " \
                                                     "a CPU"
        elif not faster(model):
            selection.precision_reasons[precision] = f"{figures}: not faster than float32 (needs <= " \
                                                     f"{MAX_LATENCY_RATIO:g}x in the median and the fastest run)" + \
                _int8_on_cuda_note(model)
        else:
            selection.precision_reasons[precision] = figures
            contenders.append(model)
    best = min(contenders, key=speed) if contenders else reference
    for model in contenders:
        precision = model.get("precision")
        selection.precision_reasons[precision] = ("chosen: " if model is best else
                                                  f"within the allowed but slower than {best.get('precision')}: ") \
            + selection.precision_reasons[precision]
    if best is reference:
        selection.precision_reasons = {"fp32": "chosen: no lower precision is both faster and within the allowed "
                                               "drop", **selection.precision_reasons}
    selection.precision = best.get("precision", "fp32")
    selection.final = best["label"]
    return selection
