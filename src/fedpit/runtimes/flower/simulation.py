"""`fedpit run CONFIG --runtime flower-sim`: the experiment on Flower's simulation engine (Ray).

One SuperNode per client (partition-id = the client's index in the federation the config builds),
each ClientApp in a Ray worker that loads the base model once and keeps it; resources per client
from `[flower]`. The ServerApp is fedpit's server loop, so the run directory is the same as the
in-process simulator's, and so is the final adapter (tested).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fedpit import config as config_mod
from fedpit.config import Config
from fedpit.errors import FedpitError
from fedpit.runs import RunDir
from fedpit.runtimes.flower import client_app, server_app


def run_simulation(config: Config, run_dir: Path, resume: bool = False, num_clients: int | None = None) -> Path:
    from flwr.simulation import run_simulation as flower_run_simulation

    server_app.check_config(config)
    clients = num_clients or config.data.partition.num_clients
    settings = {"config-text": config_mod.dumps(config), "run-dir": str(run_dir), "resume": resume,
                "clients": clients}
    environment = {server_app.SETTINGS_ENV: json.dumps(settings),
                   client_app.STATE_DIR_ENV: str(Path(run_dir) / "clients"),
                   "RAY_DEDUP_LOGS": "0", "TOKENIZERS_PARALLELISM": "false"}
    saved = {k: os.environ.get(k) for k in environment}
    os.environ.update(environment)  # Ray workers inherit the driver's environment
    try:
        flower_run_simulation(
            server_app=server_app.app, client_app=client_app.app, num_supernodes=clients,
            backend_config={
                "client_resources": {"num_cpus": config.flower.client_cpus, "num_gpus": config.flower.client_gpus},
                "init_args": {"logging_level": "ERROR", "log_to_driver": True},
            },
        )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    status = RunDir(run_dir).read_status()
    if status.get("status") != "complete":
        raise FedpitError(f"the Flower simulation did not complete ({status.get('error', 'see the log above')}); "
                          f"continue it with `fedpit run --resume {run_dir} --runtime flower-sim`")
    return Path(run_dir)
