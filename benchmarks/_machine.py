"""Machine description recorded with every benchmark result (CPU model, cores, RAM, library versions)."""

from __future__ import annotations

import hashlib
import os
import platform

DEFAULT_PACKAGES = ("numpy", "torch", "monai", "onnxruntime", "nibabel", "segrt")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ram_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 ** 2, 2)
    except OSError:
        pass
    return None


def version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info(packages=DEFAULT_PACKAGES) -> dict:
    """CPU model, physical/logical cores, RAM, platform and the versions of ``packages``."""
    from segrt.engine.backends.ort_cpu import physical_cores

    return {
        "cpu_model": cpu_model(),
        "physical_cores": physical_cores(),
        "logical_cpus": os.cpu_count(),
        "cpus_allowed": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gib": ram_gib(),
        "platform": platform.platform(),
        "hostname_sha1": hashlib.sha1(platform.node().encode()).hexdigest()[:10],
        "versions": {"python": platform.python_version(), **{p: version(p) for p in packages}},
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
                       if k in os.environ},
    }
