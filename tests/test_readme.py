"""Every command in README.md is run here as written, on small real files standing in for the user's: the README's
model names, files and sizes are replaced by tiny ones (a tiny IResNet saved as an insightface checkpoint, the
mxnet-written RecordIO set, small .bin packs, a tiny IJB-C release), nothing else. A renamed option, a wrong path
layout or a command that no longer works fails here. The install lines are what CI itself runs; `bnport demo` is
run by tests/test_pipeline.py."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bnport.model.arch import create_model
from tests.helpers.benchdata import write_bin_pack
from tests.helpers.models import realistic_bn
from tests.helpers.paths import FIXTURES, REPO

README = REPO / "README.md"

# what the README names -> what stands in for it here (only names, paths and sizes)
SUBSTITUTIONS = [
    (r"\biresnet(50|100)\b", "iresnet_tiny"),
    (r"--batch-size 128", "--batch-size 4"),
    (r"--steps 2000 --snapshot-every 200", "--steps 4 --snapshot-every 2"),
    (r"--nproc-per-node 4", "--nproc-per-node 2"),
    (r"snapshots/0007", "snapshots/0002"),
]
CONFIG_SUBSTITUTIONS = [(r'"iresnet50"', '"iresnet_tiny"'), (r"batch_size = 128", "batch_size = 4"),
                        (r"steps = 2000", "steps = 4"), (r"snapshot_every = 200", "snapshot_every = 2"),
                        (r'# device = "auto"', 'device = "cpu"')]


def readme_commands() -> list[str]:
    """The bnport / torchrun command lines of the README's bash blocks, in order (comments dropped)."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(("bnport ", "torchrun ")):
                commands.append(line)
    return commands


def _substitute(text: str, rules) -> str:
    for pattern, replacement in rules:
        text = re.sub(pattern, replacement, text)
    return text


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from tests.helpers.ijb import make_release

    root = tmp_path_factory.mktemp("readme")
    model = realistic_bn(create_model("iresnet_tiny"))
    torch.save({"state_dict_backbone": model.state_dict()}, root / "backbone.pth")  # as insightface saves them
    shutil.copytree(FIXTURES / "recordio" / "insightface", root / "faces_emore")
    write_bin_pack(root / "lfw.bin", 20, seed=1)
    write_bin_pack(root / "cfp_fp.bin", 20, seed=2)
    make_release(root / "IJB_release" / "IJBC")
    return root


def test_the_readme_has_the_commands_this_test_knows():
    commands = readme_commands()
    assert commands[0] == "bnport inspect iresnet50 --weights backbone.pth"
    assert any(c.startswith("bnport run --print-config") for c in commands)
    assert sum(c.startswith("torchrun ") for c in commands) == 2


def test_every_readme_command_runs(workdir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BNPORT_CACHE_DIR": str(workdir / "cache")}
    bin_dir = Path(sys.executable).parent
    for command in readme_commands():
        line = _substitute(command, SUBSTITUTIONS)
        if line.startswith("bnport run --print-config"):
            printed = subprocess.run([str(bin_dir / "bnport"), "run", "--print-config"], cwd=workdir, env=env,
                                     capture_output=True, text=True, check=True).stdout
            target = line.split(">")[1].split()[0]
            (workdir / target).write_text(_substitute(printed, CONFIG_SUBSTITUTIONS))
            continue
        argv = shlex.split(line)
        argv[0] = shutil.which(argv[0], path=str(bin_dir)) or argv[0]
        if Path(argv[0]).name == "torchrun":
            argv[1:1] = ["--standalone"]
        if "score" in argv and "--device" not in argv:
            argv += ["--device", "cpu"]
        proc = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
    assert (workdir / "runs" / "r50" / "score" / "handoff" / "model.onnx").is_file()
    assert (workdir / "runs" / "r50" / "report" / "drift.png").is_file()
    assert (workdir / "runs" / "r100" / "score" / "table.json").is_file()
