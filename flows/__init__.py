"""saeflow's flows and command line.

Importing this package sets process defaults that must be in place before torch and Prefect
start: OpenMP threads spin only briefly (GNU OpenMP's 1,000 iterations) before they sleep, where
OpenMP's default spins for long (several times slower on small machines whose cores other jobs
use) and sleeping at once made small models' forward passes 1.5-1.8x slower on a quiet one; as
many of them as this process may use CPUs (`usable_cpus`: its CPU affinity and its container's
CPU quota, where torch alone would count every core of the host), Prefect sends no telemetry,
and its temporary server gets time to start on a 2-core machine. Values already set in the
environment win (`OMP_NUM_THREADS=1 saeflow run ...`).
"""

import math
import os
from pathlib import Path


def usable_cpus(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The CPUs this process can use: those it may run on, capped by a cgroup v2 CPU quota
    (`cpu.max`, "quota period", rounded up)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


for _name, _value in {
    "OMP_WAIT_POLICY": "PASSIVE",
    "GOMP_SPINCOUNT": "1000",  # what PASSIVE alone sets is 0
    "OMP_NUM_THREADS": str(usable_cpus()),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}.items():
    os.environ.setdefault(_name, _value)
