"""Does a calibration whose statistics match the deployed model score better? Recipes compared on the demo (issue 16).

Usage: python tests/benchmarks/bench_recipes.py [--out DIR] [--steps 30] [--bootstrap 200]

One `bnport run` (bnport.pipeline.run_pipeline) on the embedded demo model with six recipes in one table: the modes
ema (momentum 0.1, the demo's), exact and sequential, each with the demo's noise (blur p=0.2 sigma 1-2, fractal 10%)
and without noise, all on the demo's calibration folder, batch 32, the same steps (one snapshot at the end of each:
the modes are compared at the same images seen). It prints, per recipe, the last snapshot's held-out consistency
figure (worst layer) and TPR at each FPR on both committed benchmarks (strict rule), with the paired 95% interval of
the gain over the shared baseline at TPR@1e-3 on pairs.csv (its 10,000 impostor pairs), and the selection's outcome.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bnport.config import parse_config  # noqa: E402
from bnport.pipeline import run_pipeline  # noqa: E402
from bnport.score.format import recipe_outcome  # noqa: E402
from bnport.score.table import fpr_label  # noqa: E402

NOISE = ["blur:p=0.2,sigma=1-2", "fractal:ratio=0.1"]


def recipes(steps: int) -> list[dict]:
    out = []
    for mode in ("ema", "exact", "sequential"):
        extra = {"momentum": 0.1} if mode == "ema" else {}
        every = {} if mode == "sequential" else {"snapshot_every": steps}
        out.append({"name": f"{mode}-noise", "mode": mode, "noise": NOISE, **extra, **every})
        out.append({"name": f"{mode}-clean", "mode": mode, "noise": [], **extra, **every})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="keep the run here (default: a temporary folder)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--bootstrap", type=int, default=200)
    args = ap.parse_args()
    from bnport.demo import demo_files

    files = demo_files()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or Path(tmp) / "recipes")
        data = {"out": str(out), "device": "cpu", "model": {"spec": files.model, "weights": str(files.weights)},
                "calibrate": {"data": str(files.calibration), "batch_size": 32, "steps": args.steps, "workers": 0,
                              "recipe": recipes(args.steps)},
                "score": {"bench": [f"{spec},flip=off" for spec in files.bench_specs],
                          "fpr": [1e-4, 1e-3, 1e-2, 1e-1], "select": "tpr@1e-3,bench=pairs,confident",
                          "bootstrap": args.bootstrap, "cache_dir": str(out / "cache")}}
        began = time.perf_counter()
        result = run_pipeline(parse_config(data, base=Path.cwd()), progress=False, log=lambda m: None)
        table = result.score.table
        print(f"demo, {args.steps} steps of batch 32 per recipe, one snapshot each; {time.perf_counter() - began:.0f}s")
        labels = [fpr_label(f) for f in table.fprs]
        for bench in table.benches:
            print(f"\n{bench['name']}: TPR (%) at FPR, strict rule")
            print(f"{'model':<22} {'consistency':>11}  " + "  ".join(f"{'@' + x:>7}" for x in labels)
                  + "   gain @1e-3 (95% paired)")
            for model in table.models:
                r = table.result(model["label"], bench["name"])
                figure = (model.get("consistency") or {}).get("worst")
                paired = r.extra.get("paired")
                gain = f"{100 * paired['delta']:+.2f} ({100 * paired['low']:+.2f} .. {100 * paired['high']:+.2f})" \
                    if paired else "-"
                print(f"{model['label']:<22} {figure if figure is None else format(figure, '.2e'):>11}  "
                      + "  ".join(f"{100 * r.tpr['strict'][x]:>7.2f}" for x in labels) + f"   {gain}")
        print()
        print("\n".join(result.score.selection.lines()))
        print("\n".join(recipe_outcome(table, result.score.selection.to_dict())))


if __name__ == "__main__":
    main()
