"""The `flower` section of `make bench`: fedpit on Flower's simulation engine at cross-device scale,
and what SecAgg+ costs.

Every figure comes from whole `fedpit run --runtime flower-sim` runs in fresh processes on the embedded
SmolLM2 and MedQuAD, alternated so that a slow stretch of the machine hits every variant:
- cross-device: 10 and 100 clients of 5 examples each, 10 sampled per round. The time of a round
  should follow the clients per round (10 in both) and the memory should not follow the clients.
- secure aggregation: the 10-client run again with `flower.secure_aggregation = true`, against the
  plain 10-client run: seconds per round and bytes on the wire in each direction.

FedAvg is the method: the runtime's cost does not depend on the client rule, and a FedPIT round
would spend minutes generating text that is not what these rows measure. A round's seconds are
the server's own record (`seconds.round` in metrics.jsonl); the first round is left out, because
it includes starting the Ray workers and loading the model in each. Memory is the peak, sampled
twice a second, of the summed PSS (proportional set size, so pages the processes share are
counted once) of the run's whole process tree: the driver, Ray's raylet and GCS, and its workers.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
EXAMPLES_PER_CLIENT = 5
PER_ROUND = 10


def run_overrides(clients: int, rounds: int, secure: bool) -> list[str]:
    return [
        f"data.fewshot.total={EXAMPLES_PER_CLIENT * clients}", "data.fewshot.num_clusters=10",
        "data.fewshot.pool_size=1500", "data.partition.kind='iid'", f"data.partition.num_clients={clients}",
        "data.partition.min_examples=4", f"federation.rounds={rounds}", f"federation.clients_per_round={PER_ROUND}",
        "method.name='fedavg'", "eval.every=0", "eval.at_start=false", "eval.final_sets=[]",
        f"flower.secure_aggregation={'true' if secure else 'false'}",
    ]


def tree_pss_mib(root: psutil.Process) -> tuple[float, int]:
    """Summed PSS (MiB) of `root` and all its descendants, and how many processes that is."""
    total, count = 0, 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
            count += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total / 2**20, count


def run_flower_sim(clients: int, rounds: int, secure: bool) -> dict:
    """One whole simulated run; its per-round seconds and wire bytes, and the tree's peak PSS."""
    out = Path(tempfile.mkdtemp(prefix=f"fedpit-bench-flower-{clients}-")) / "run"
    command = [str(Path(sys.executable).parent / "fedpit"), "run", "configs/demo.toml", "--runtime", "flower-sim",
               "--quiet", "--out", str(out)]
    for override in run_overrides(clients, rounds, secure):
        command += ["--set", override]
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"mib": 0.0, "processes": 0}
    root = psutil.Process(proc.pid)

    def sample() -> None:
        while proc.poll() is None:
            try:
                mib, count = tree_pss_mib(root)
            except psutil.NoSuchProcess:
                return
            if mib > peak["mib"]:
                peak.update(mib=mib, processes=count)
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        log, _ = proc.communicate()
    finally:  # an interrupted bench stops, by PID, the run it started and every process under it (Ray's too)
        if proc.poll() is None:
            tree = [root, *root.children(recursive=True)]
            for member in tree:
                try:
                    member.terminate()
                except psutil.NoSuchProcess:
                    continue
            _, alive = psutil.wait_procs(tree, timeout=30)
            for member in alive:
                member.kill()
        sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"the {clients}-client flower-sim run failed (exit {proc.returncode}):\n{log[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rounds_seen = [r for r in records if r.get("kind") == "round"]
    return {
        "seconds_per_round": [r["seconds"]["round"] for r in rounds_seen],
        "wire": [r.get("wire", {}) for r in rounds_seen],
        "sampled": [len(r["sampled"]) for r in rounds_seen],
        "peak_pss_mib": peak["mib"], "processes_at_peak": peak["processes"],
        "wall_seconds": time.perf_counter() - started,
    }


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def bench_flower(repeats: int, rounds: int = 3) -> dict:
    variants = {"plain_10_clients": (10, False), "plain_100_clients": (100, False), "secure_10_clients": (10, True)}
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(repeats):  # alternated, so that a noisy stretch of the machine hits every variant
        for name, (clients, secure) in variants.items():
            print(f"  flower-sim {name} ...", flush=True)
            runs[name].append(run_flower_sim(clients, rounds, secure))

    def steady_rounds(name: str) -> list[float]:
        return [s for run in runs[name] for s in run["seconds_per_round"][1:]]

    def wire(name: str, direction: str) -> float:
        return statistics.median(w[direction] for run in runs[name] for w in run["wire"] if direction in w)

    seconds = {name: _summary(steady_rounds(name)) for name in variants}
    memory = {name: _summary([run["peak_pss_mib"] for run in runs[name]]) for name in variants}
    return {
        "clients_per_round": PER_ROUND, "examples_per_client": EXAMPLES_PER_CLIENT, "rounds": rounds,
        "method": "fedavg", "repeats": repeats,
        "seconds_per_round": seconds,
        "peak_tree_pss_mib": memory,
        "processes_at_peak": {name: max(run["processes_at_peak"] for run in runs[name]) for name in variants},
        "cross_device": {
            "seconds_ratio_100_vs_10_clients": seconds["plain_100_clients"]["median"]
            / seconds["plain_10_clients"]["median"],
            "memory_ratio_100_vs_10_clients": memory["plain_100_clients"]["median"]
            / memory["plain_10_clients"]["median"],
        },
        "secure_aggregation": {
            "seconds_ratio_vs_plain": seconds["secure_10_clients"]["median"] / seconds["plain_10_clients"]["median"],
            "wire_bytes_per_round": {name: {"down": wire(name, "down"), "up": wire(name, "up")}
                                     for name in ("plain_10_clients", "secure_10_clients")},
            "up_ratio_vs_plain": wire("secure_10_clients", "up") / wire("plain_10_clients", "up"),
            "down_ratio_vs_plain": wire("secure_10_clients", "down") / wire("plain_10_clients", "down"),
        },
        "runs": runs,
    }


def table_rows(f: dict) -> list[tuple[str, str, str, str, str]]:
    """Rows for bench.py's table: (measure, value, baseline, ratio, target)."""
    sec, mem, cd, sa = f["seconds_per_round"], f["peak_tree_pss_mib"], f["cross_device"], f["secure_aggregation"]
    wire = sa["wire_bytes_per_round"]
    return [
        ("flower-sim seconds/round, 100 clients (10 per round)", f"{sec['plain_100_clients']['median']:.1f}",
         f"{sec['plain_10_clients']['median']:.1f} with 10 clients", f"{cd['seconds_ratio_100_vs_10_clients']:.2f}x",
         "~1x (follows clients per round)"),
        ("flower-sim peak PSS MiB of the process tree, 100 clients", f"{mem['plain_100_clients']['median']:.0f}",
         f"{mem['plain_10_clients']['median']:.0f} with 10 clients", f"{cd['memory_ratio_100_vs_10_clients']:.2f}x",
         "~1x (does not follow clients)"),
        ("SecAgg+ seconds/round, 10 clients", f"{sec['secure_10_clients']['median']:.1f}",
         f"{sec['plain_10_clients']['median']:.1f} plain", f"{sa['seconds_ratio_vs_plain']:.2f}x", ""),
        ("SecAgg+ bytes up per round, 10 clients", f"{wire['secure_10_clients']['up'] / 1e6:.1f} MB",
         f"{wire['plain_10_clients']['up'] / 1e6:.1f} MB plain", f"{sa['up_ratio_vs_plain']:.2f}x", ""),
        ("SecAgg+ bytes down per round, 10 clients", f"{wire['secure_10_clients']['down'] / 1e6:.1f} MB",
         f"{wire['plain_10_clients']['down'] / 1e6:.1f} MB plain", f"{sa['down_ratio_vs_plain']:.2f}x", ""),
    ]
