"""What several benchmarks share: the models they run (examples and the test zoo), a headless pyplot, host facts."""

from __future__ import annotations

import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

import codesign
from codesign.ir.workload import Workload

ROOT = Path(__file__).resolve().parent.parent


def workloads(names: list[str], size: str) -> list[Workload]:
    """Example models by name (at ``size``); ``zoo`` expands to every model of tests/zoo."""
    out = []
    for name in names:
        if name == "zoo":
            sys.path.insert(0, str(ROOT))
            from tests.zoo import ZOO

            out += [build() for build in ZOO.values()]
        else:
            out.append(codesign.load_model_ref(name, size=size))
    return out


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None (with a note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'codesign[bench]'): no plot written")
        return None
    return plt


def host_meta() -> dict[str, Any]:
    """Where a host benchmark ran: written beside its results."""
    return {
        "device": f"host CPU ({platform.machine()})",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def serve_child(args: list[str]) -> tuple[subprocess.Popen[str], str, int]:
    """``codesign serve ARGS --port 0`` in a child process: the process and the host and port it reports."""
    cmd = [sys.executable, "-m", "codesign.cli", "serve", *args, "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"codesign serve exited with {proc.wait()}")
        if "serving" in line and "http://" in line:
            host, port = line.split("http://", 1)[1].split()[0].rstrip(";").rsplit(":", 1)
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            return proc, host, int(port)
    proc.kill()
    raise RuntimeError("codesign serve did not report its address")
