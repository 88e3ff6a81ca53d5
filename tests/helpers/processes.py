"""Kill-and-resume tests: start `python -m bnport ...` in its own process and kill it with SIGKILL the moment a file
appears, checking that it really died mid-run (it was still running when the file appeared)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def bnport(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`python -m bnport ARGS` to the end, output captured, on one OpenMP thread."""
    return subprocess.run([sys.executable, "-m", "bnport", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def kill_when(marker: Path, *args: str, timeout: float = 300, poll: float = 0.02) -> None:
    """Run `python -m bnport ARGS` and SIGKILL it as soon as `marker` exists; fails the test when the process ended
    first (nothing was interrupted) or did not die of the signal."""
    proc = subprocess.Popen([sys.executable, "-m", "bnport", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + timeout
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(poll)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    code = proc.wait()
    assert marker.exists() and alive, f"bnport {' '.join(args)} ended before {marker.name} could interrupt it"
    assert code == -signal.SIGKILL  # it really died, mid-run
