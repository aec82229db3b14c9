"""What the numbers were measured on: CPU, cores, memory, library versions."""
from __future__ import annotations

import importlib
import platform
from pathlib import Path

from kvc.compiler.bench.options import available_cpus


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for module in ("kvc", "numpy", "torch", "onnx", "onnxruntime", "tvm"):
        try:
            versions[module] = str(importlib.import_module(module).__version__)
        except Exception:  # noqa: BLE001 - a missing or broken optional library is reported, not fatal
            versions[module] = "not installed"
    return versions


def bandwidth_probe_text(threads: int) -> str:
    return f"1 GiB numpy copy on {threads} thread(s), (read + written bytes) / time, median of 5"


def machine_info(threads: int, bandwidth_bytes_per_s: float, bandwidth_given: bool = False,
                 probe: str | None = None) -> dict:
    """``probe`` says where a given bandwidth came from (default: the --bandwidth-gbs option)."""
    import os

    if probe is None:
        probe = "given by the caller (--bandwidth-gbs), not measured" if bandwidth_given else \
            bandwidth_probe_text(threads)
    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "cpus_available": available_cpus(),
            "threads_used": threads, "memory_bytes": memory_bytes(), "platform": platform.platform(),
            "measured_bandwidth_bytes_per_s": bandwidth_bytes_per_s,
            "bandwidth_probe": probe,
            "versions": library_versions()}
