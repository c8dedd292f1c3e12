"""What a run ran on: CPU model, cores, processes, array library and device.

The trainer stores this dict in every checkpoint's ``trainer_state.json`` (key
``"hardware"``) so that the model card can name the machine without guessing; a resumed run
records the machine that wrote each checkpoint.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

from handgrad.backend import available_cores, cuda, get_num_threads
from handgrad.backend.device import device


def cpu_model() -> str:
    """The CPU's marketing name ("AMD EPYC 7763 64-Core Processor"), from /proc/cpuinfo on
    Linux, sysctl's value on macOS, else ``platform.processor()``; "unknown" when none says."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        try:
            for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                    return value.strip()
        except OSError:
            pass
    if sys.platform == "darwin":
        try:
            import subprocess

            name = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True, text=True, timeout=5, check=False,
            ).stdout.strip()  # fmt: skip
            if name:
                return name
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(where: str = "cpu") -> str:
    """ "cpu" for the CPU; "gpu: <its name>" for ``where`` = 'cuda' / 'cuda:N' ("gpu" when
    CuPy cannot name it)."""
    dev = device(where)
    if dev.type == "cpu":
        return "cpu"
    try:
        cp = cuda.require(dev.index)
    except RuntimeError:
        return "gpu"
    try:
        props = cp.cuda.runtime.getDeviceProperties(0 if dev.index is None else dev.index)
        name = props["name"]
        return "gpu: " + (name.decode() if isinstance(name, bytes) else str(name))
    except Exception:  # noqa: BLE001  (a name is a nicety; never fail a run over it)
        return "gpu"


def hardware_info(processes: int = 1, where: str = "cpu") -> dict[str, Any]:
    """The facts the model card prints under "Hardware":

    cpu                 CPU model name
    logical_cores       cores the machine has (``os.cpu_count()``)
    available_cores     cores this process may use (affinity / container limit)
    processes           training processes (data parallel over processes)
    threads_per_process threads one op may use in the main process
    array_module        "numpy" or "cupy"
    device              "cpu" or "gpu: <name>" (of ``where``, the device this rank trains on)
    platform, python    OS and interpreter versions
    """
    name = device_name(where)
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count() or 1,
        "available_cores": available_cores(),
        "processes": int(processes),
        "threads_per_process": get_num_threads() if processes == 1 else 1,
        "array_module": "numpy" if name == "cpu" else "cupy",
        "device": name,
        "platform": platform.platform(terse=True),
        "python": platform.python_version(),
    }
