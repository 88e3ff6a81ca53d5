"""How well each calibration mode's stored BN statistics describe what the deployed model feeds its BN layers
(issue 16).

Usage: python tests/benchmarks/bench_consistency.py [--models demo,iresnet50] [--modes ema,exact,sequential]

For each model and mode it runs `bnport.calibrate.engine.calibrate` with `consistency = "full"` and prints the
consistency figure of the last snapshot (bnport.calibrate.consistency: per channel |m - mu| / sqrt(s2 + eps) for the
mean and |v - s2| / (s2 + eps) for the variance of each BN layer's input in an eval-mode forward, against the stored
mu and s2; a layer's figure is its worst channel, the model's the worst layer), twice:

- `calibration`: over the run's own images (noise included): no sampling spread, only the method's own error;
- `held-out`: over the 4 batches that follow the run's in its batch plan (`unseen` of their images the run did not
  use): the method's error plus the sampling spread between two image sets.

and the worst layer of each quarter of the network's depth (calibration images), which shows where the error grows.

Models:
- `demo`: the embedded demo model (iresnet_demo, MNIST digits at 32x32) on its calibration folder with the demo's
  noise (blur p=0.2 sigma 1-2, fractal 10%), batch 32, 30 steps (960 images); ema with the demo's momentum 0.1;
- `iresnet50`: random convolution weights with realistic BN statistics (tests/helpers/models.py realistic_bn) on
  the 100 face crops of scikit-image's LFW subset (25x25 grey, upscaled to 112x112), batch 16, 4 steps (64 images);
  ema with the model's momentum 0.1 (4 steps are far from converged: its figure is mostly the baseline's).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench_calibrate import PreloadedImages  # noqa: E402

from bnport.calibrate.engine import calibrate  # noqa: E402
from bnport.calibrate.settings import CalibrationSettings  # noqa: E402
from bnport.model.load import load_model  # noqa: E402


def demo_case():
    from bnport.demo import demo_files

    files = demo_files()
    loaded = load_model(files.model, weights=files.weights)
    base = {"noise": ["blur:p=0.2,sigma=1-2", "fractal:ratio=0.1"], "batch_size": 32, "steps": 30, "workers": 0}
    return loaded, str(files.calibration), base, {"ema": {"momentum": 0.1}}


def iresnet50_case():
    import cv2
    import numpy as np
    import skimage.data

    from bnport.model.arch import create_model
    from tests.helpers.models import realistic_bn

    loaded = load_model("iresnet50")
    torch.manual_seed(0)  # the convolution weights: the same model every run
    loaded = dataclasses.replace(loaded, module=realistic_bn(create_model("iresnet50")))
    spec = loaded.input_spec
    faces = []
    for face in skimage.data.lfw_subset()[:100]:
        grey = cv2.resize((face * 255).round().astype(np.uint8), (spec.width, spec.height),
                          interpolation=cv2.INTER_CUBIC)
        faces.append(spec.to_tensor(np.repeat(grey[:, :, None], 3, axis=2)))
    return loaded, PreloadedImages(torch.stack(faces)), {"batch_size": 16, "steps": 4, "workers": 0}, {}


CASES = {"demo": demo_case, "iresnet50": iresnet50_case}


def quarters(figure: dict) -> list[float]:
    values = [max(f["mean_worst"], f["var_worst"]) for f in figure["layers"].values()]
    n = len(values)
    return [max(values[n * q // 4:max(n * (q + 1) // 4, n * q // 4 + 1)]) for q in range(4)]


def run_mode(loaded, data, settings: CalibrationSettings) -> dict:
    """The consistency entry of the run's last snapshot."""
    with tempfile.TemporaryDirectory() as tmp:
        calibrate(loaded, data, Path(tmp) / "run", settings, device="cpu", progress=False, log=lambda m: None)
        last = sorted((Path(tmp) / "run" / "snapshots").glob("[0-9][0-9][0-9][0-9].json"))[-1]
        return json.loads(last.read_text())["consistency"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="demo,iresnet50")
    ap.add_argument("--modes", default="ema,exact,sequential")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    for model in args.models.split(","):
        loaded, data, base, per_mode = CASES[model]()
        print(f"\n{model}: {base}")
        print(f"{'mode':<11} {'calibration: worst layer':<44} {'median layer':>12}   {'held-out: worst layer':<44} "
              f"{'median layer':>12}  unseen/items")
        profiles = {}
        for mode in args.modes.split(","):
            one_snapshot = {} if mode == "sequential" else {"snapshot_every": base["steps"]}
            settings = CalibrationSettings(mode=mode, consistency="full", **base, **one_snapshot,
                                           **per_mode.get(mode, {}))
            figure = run_mode(loaded, data, settings)
            cal, held = figure["calibration"], figure["held_out"]
            profiles[mode] = quarters(cal)
            print(f"{mode:<11} {cal['worst']:<10.2e} {cal['worst_layer']:<33} {cal['median_layer']:>12.2e}   "
                  f"{held['worst']:<10.2e} {held['worst_layer']:<33} {held['median_layer']:>12.2e}  "
                  f"{held['unseen']:>5}/{held['items']}")
        print("worst layer per quarter of depth (calibration images):")
        for mode, values in profiles.items():
            print(f"  {mode:<11} " + "  ".join(f"{v:.2e}" for v in values))


if __name__ == "__main__":
    main()
