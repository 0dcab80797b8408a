"""saeflow's flows and command line.

Importing this package sets process defaults that must be in place before torch and Prefect
start: OpenMP threads sleep instead of spinning (about 4x faster on small shared machines),
Prefect sends no telemetry, and its temporary server gets time to start on a 2-core machine.
Values already set in the environment win.
"""

import os

for _name, _value in {
    "OMP_WAIT_POLICY": "PASSIVE",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}.items():
    os.environ.setdefault(_name, _value)
