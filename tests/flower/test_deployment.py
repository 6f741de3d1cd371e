"""A real Flower deployment on loopback: a SuperLink and two SuperNodes as separate processes, each
SuperNode with its own data file and state folder, a FedPIT run submitted with `flwr run`, and every
process this test started stopped by its PID afterwards, also when the test fails."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from fedpit import config as config_mod
from fedpit.runs import RunDir
from fedpit.runtimes.flower import deployment as dep


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on port {port}")


def _children_of(pids: set[int]) -> list[int]:
    """Processes whose parent is one we started, or that watch one (flower-superexec --parent-pid)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        watched = {int(cmdline[i + 1]) for i, a in enumerate(cmdline[:-1]) if a == b"--parent-pid"
                   and cmdline[i + 1].isdigit()}
        if int(stat[1]) in pids or watched & pids:
            found.append(int(entry.name))
    return found


@pytest.fixture
def started():
    processes: list[dep.Started] = []
    yield processes
    pids = {p.process.pid for p in processes}
    for process in reversed(processes):
        process.stop()
    deadline = time.monotonic() + 30
    while _children_of(pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert all(p.process.poll() is not None for p in processes), "a started process is still running"
    assert _children_of(pids) == [], "a child of a started process is still running"


def _client_files(tmp_path: Path, write_instruction_file) -> list[Path]:
    everything = write_instruction_file(tmp_path / "all.jsonl", 36).read_text().splitlines()
    files = []
    for i in range(2):
        path = tmp_path / f"clinic-{i}.jsonl"
        path.write_text("\n".join(everything[i::2]))
        files.append(path)
    return files


def test_fedpit_runs_on_a_loopback_deployment(tmp_path, tiny_overrides, started, write_instruction_file):
    config = config_mod.load(None, [*tiny_overrides, "data.partition.num_clients=2", "federation.rounds=2",
                                    "federation.reply_timeout=240"])
    config_file = tmp_path / "experiment.toml"
    config_file.write_text(config_mod.dumps(config))
    home = tmp_path / "flwr-home"
    env = dep.flower_env(home)
    logs = tmp_path / "logs"
    link_port = _free_port()
    started.append(dep.start("superlink", dep.superlink_command(link_port, tmp_path / "link"), env, logs))
    _wait_for_port(link_port)
    for i, data_file in enumerate(_client_files(tmp_path, write_instruction_file)):
        command = dep.supernode_command(f"127.0.0.1:{link_port}", _free_port(), tmp_path / f"node-{i}",
                                        client_id=f"clinic-{i}", data_file=str(data_file))
        started.append(dep.start(f"supernode-{i}", command, env, logs))
    dep.write_connection(home, f"127.0.0.1:{link_port}")
    app = dep.write_app(tmp_path / "app")
    run_dir = tmp_path / "run"
    submitted = subprocess.run(dep.submit_command(app, config_file, run_dir, clients=2, stream=False), env=env,
                               capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    try:
        status = dep.wait_for_run(run_dir, timeout=500)
    except Exception:
        print({p.name: p.log.read_text()[-3000:] for p in started})
        raise
    assert status["status"] == "complete", status
    rounds = [r for r in RunDir(run_dir).metrics() if r["kind"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(sorted(r["clients"]) == ["clinic-0", "clinic-1"] for r in rounds)
    assert all(r["clients"]["clinic-0"]["num_examples"] == 18 for r in rounds)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    for i in range(2):  # private state and synthetic samples stayed on each node's own disk
        node = tmp_path / f"node-{i}" / f"clinic-{i}"
        assert list((node / "state").glob("round-*.json")) and list((node / "synthetic").glob("*.jsonl"))
    assert not (run_dir / "clients").exists(), "the server's run directory holds nothing of the clients"
    assert json.loads((run_dir / "run.json").read_text())["runtime"] == "flower"
    assert os.environ.get("FLWR_HOME") != str(home), "the test's FLWR_HOME stays inside the test"


def _wait_for_commit(run_dir: Path, round_num: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (run_dir / "checkpoints" / f"round-{round_num:03d}.json").is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"round {round_num} was not committed within {timeout:.0f}s")
        time.sleep(1)


def test_a_supernode_that_dies_is_dropped_and_resumes_its_state_after_restart(
    tmp_path, tiny_overrides, started, write_instruction_file
):
    config = config_mod.load(None, [*tiny_overrides, "data.partition.num_clients=2", "federation.rounds=3",
                                    "method.persistent_private=true", "federation.min_replies=1",
                                    "federation.reply_timeout=60"])
    config_file = tmp_path / "experiment.toml"
    config_file.write_text(config_mod.dumps(config))
    home = tmp_path / "flwr-home"
    env = dep.flower_env(home)
    logs = tmp_path / "logs"
    link_port = _free_port()
    started.append(dep.start("superlink", dep.superlink_command(link_port, tmp_path / "link"), env, logs))
    _wait_for_port(link_port)
    commands = [dep.supernode_command(f"127.0.0.1:{link_port}", _free_port(), tmp_path / f"node-{i}",
                                      client_id=f"clinic-{i}", data_file=str(f)) for i, f in
                enumerate(_client_files(tmp_path, write_instruction_file))]
    for i, command in enumerate(commands):
        started.append(dep.start(f"supernode-{i}", command, env, logs))
    dep.write_connection(home, f"127.0.0.1:{link_port}")
    run_dir = tmp_path / "run"
    subprocess.run(dep.submit_command(dep.write_app(tmp_path / "app"), config_file, run_dir, clients=2, stream=False),
                   env=env, capture_output=True, text=True, timeout=120, check=True)
    _wait_for_commit(run_dir, 1)
    started[-1].process.kill()  # clinic-1's SuperNode dies (SIGKILL) before it can answer round 2 ...
    started[-1].process.wait()
    started.append(dep.start("supernode-1-restarted", commands[1], env, logs))  # ... and comes back
    status = dep.wait_for_run(run_dir, timeout=400)
    assert status["status"] == "complete", status
    rounds = {r["round"]: r for r in RunDir(run_dir).metrics() if r["kind"] == "round"}
    assert sorted(rounds[2]["clients"]) == ["clinic-0"] and "clinic-1" in rounds[2]["dropped"]
    assert sorted(rounds[3]["clients"]) == ["clinic-0", "clinic-1"]
    assert rounds[3]["clients"]["clinic-1"]["state_from_round"] == 1, "the restarted node resumed its private state"
    assert rounds[3]["clients"]["clinic-0"]["state_from_round"] == 2


def test_submit_sends_the_config_with_its_overrides(tmp_path, monkeypatch):
    """`fedpit flower submit CONFIG --set ...` must run exactly what was asked: the ServerApp reads a
    file, so the submitted file carries the overrides (it once carried the bare CONFIG)."""
    import fedpit.runtimes.flower.deployment as deployment
    from fedpit.cli import main

    sent = []
    monkeypatch.setattr(deployment, "run_foreground", lambda command, env, **kw: sent.append(command) or 0)
    monkeypatch.setattr(deployment, "wait_for_run", lambda run_dir, timeout: {"status": "complete"})
    monkeypatch.setattr(deployment, "check_superlink", lambda *args, **kwargs: None)  # no SuperLink here
    assert main(["flower", "--flwr-home", str(tmp_path / "home"), "submit", "configs/demo.toml", "--set",
                 "federation.rounds=2", "--set", "method.beta=0.25", "--superlink", "127.0.0.1:9", "--run-dir",
                 str(tmp_path / "run")]) == 0
    run_config = sent[0][sent[0].index("--run-config") + 1]
    submitted = config_mod.load(json.loads(run_config.split("config=", 1)[1].split(" run-dir=")[0]))
    assert submitted.federation.rounds == 2 and submitted.method.options["beta"] == 0.25


@pytest.mark.parametrize("ending", ["ctrl-c", "timeout", "bad timeout"])
def test_submit_stops_following_the_run_at_once_on_ctrl_c_or_its_timeout(tmp_path, monkeypatch, capsys, ending):
    """Ctrl-C on `fedpit flower submit` ends it at once (128 + SIGINT) without waiting for the run's
    status; after --timeout it says so and fails; a --timeout that is not positive is refused first."""
    import signal

    import fedpit.runtimes.flower.deployment as deployment
    from fedpit.cli import main

    def follow(command, env, timeout=None, received=None, timed_out=None, **kw):
        if ending == "ctrl-c":
            received.append(signal.SIGINT)
        else:
            timed_out.append(time.monotonic())
        return 0
    waited = []
    monkeypatch.setattr(deployment, "run_foreground", follow)
    monkeypatch.setattr(deployment, "wait_for_run", lambda run_dir, timeout: waited.append(run_dir))
    monkeypatch.setattr(deployment, "check_superlink", lambda *args, **kwargs: None)  # no SuperLink here
    timeout = {"ctrl-c": "60", "timeout": "0.2", "bad timeout": "0"}[ending]
    code = main(["flower", "--flwr-home", str(tmp_path / "home"), "submit", "configs/demo.toml", "--superlink",
                 "127.0.0.1:9", "--run-dir", str(tmp_path / "run"), "--timeout", timeout])
    err = capsys.readouterr().err
    assert waited == []
    if ending == "ctrl-c":
        assert code == 128 + signal.SIGINT and "stopped following the run" in err
    elif ending == "timeout":
        assert code == 1 and "no result after --timeout 0.2 s" in err
    else:
        assert code != 0 and "--timeout 0" in err and "must be positive" in err


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _descendants(pid: int) -> set[int]:
    found, frontier = set(), {pid}
    while frontier:
        frontier = set(_children_of(frontier)) - found
        found |= frontier
    return found


def test_sigterm_to_the_superlink_helper_stops_every_flower_process(tmp_path):
    """A service manager stops `fedpit flower superlink` with SIGTERM: flower-superlink and the
    flower-superexec processes it started must end too, not linger orphaned."""
    import signal
    import sys

    port = _free_port()
    helper = subprocess.Popen([str(Path(sys.executable).parent / "fedpit"), "flower", "--flwr-home",
                               str(tmp_path / "home"), "superlink", "--port", str(port), "--host", "127.0.0.1",
                               "--state-dir", str(tmp_path / "link")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    spawned: set[int] = set()
    try:
        _wait_for_port(port)
        deadline = time.monotonic() + 20
        while len(_descendants(helper.pid)) < 2 and time.monotonic() < deadline:  # superlink + superexec
            time.sleep(0.5)
        spawned = _descendants(helper.pid)
        assert len(spawned) >= 2, spawned
        helper.send_signal(signal.SIGTERM)
        assert helper.wait(timeout=60) is not None
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in spawned) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [pid for pid in spawned if _alive(pid)], "an orphaned Flower process is left"
    finally:
        if helper.poll() is None:
            helper.kill()
        for pid in spawned | _descendants(helper.pid):  # only what this test started, by PID
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_flower_process_that_ignores_a_stop_signal_is_terminated_then_killed(tmp_path):
    """Ctrl-C reaches the helper, which forwards it; a Flower process that does not end on it (the
    SuperLink's web server waiting for a streaming client to hang up) gets SIGTERM `grace` seconds later,
    and SIGKILL after another `grace`, so the helper, and a script waiting for it, ends."""
    import signal
    import sys

    stubborn = ("import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(120)")
    helper_code = ("import os, sys; from fedpit.runtimes.flower.deployment import run_foreground; "
                   f"sys.exit(run_foreground([sys.executable, '-c', {stubborn!r}], dict(os.environ), grace=1.0) & 255)")
    helper = subprocess.Popen([sys.executable, "-c", helper_code], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    spawned: set[int] = set()
    try:
        assert helper.stdout.readline().strip() == "ready"
        spawned = _descendants(helper.pid)
        assert spawned
        began = time.monotonic()
        helper.send_signal(signal.SIGINT)
        code = helper.wait(timeout=30)
        assert time.monotonic() - began < 15
        assert code == -signal.SIGKILL & 255  # the leader's own end: killed, as it ignored INT and TERM
        assert not [pid for pid in spawned if _alive(pid)]
    finally:
        if helper.poll() is None:
            helper.kill()
        for pid in spawned:  # only what this test started, by PID
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("sleeps,timeout", [(0.3, 30.0), (60.0, 1.0)])
def test_a_timeout_is_recorded_when_it_stops_the_process_and_only_then(sleeps, timeout):
    """`timed_out` is the wait's own record that its deadline stopped the group, which `fedpit flower submit`
    reports as "no result after --timeout"; a run that ends by itself is never one, however late it ends."""
    import signal
    import sys

    from fedpit.runtimes.flower.deployment import run_foreground

    timed_out: list[float] = []
    began = time.monotonic()
    code = run_foreground([sys.executable, "-c", f"import time; time.sleep({sleeps})"], dict(os.environ),
                          grace=1.0, timeout=timeout, timed_out=timed_out)
    if sleeps < timeout:
        assert code == 0 and timed_out == []
    else:
        assert code == -signal.SIGTERM and len(timed_out) == 1 and time.monotonic() - began < 15


# ------------------------------------------------------------------ TLS, node authentication, SecAgg+
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _fedpit_cli() -> str:
    import sys

    return str(Path(sys.executable).parent / "fedpit")


def _certs(folder: Path, *nodes: str) -> Path:
    subprocess.run(["bash", str(SCRIPTS / "make-certs.sh"), str(folder), "localhost", "127.0.0.1",
                    *(["--nodes", *nodes] if nodes else [])], check=True, capture_output=True)
    return folder


def _cli(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """A `fedpit ...` helper in its own process group; one that outlives `timeout` is killed (its
    group, by the PID we started) and reported as rc None."""
    import signal

    process = subprocess.Popen([_fedpit_cli(), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        return subprocess.CompletedProcess(process.args, None, out)
    return subprocess.CompletedProcess(process.args, process.returncode, out)


@pytest.fixture
def tls_link(tmp_path, started):
    """A SuperLink with TLS and SuperNode authentication, certificates from scripts/make-certs.sh."""
    certs = _certs(tmp_path / "certs", "clinic-0", "clinic-1", "stranger")
    home = tmp_path / "flwr-home"
    env = dep.flower_env(home)
    port = _free_port()
    started.append(dep.start("superlink", dep.superlink_command(port, tmp_path / "link", certs=certs, auth=True),
                             env, tmp_path / "logs"))
    _wait_for_port(port)
    return {"certs": certs, "address": f"127.0.0.1:{port}", "env": env, "home": home}


def _register(link: dict, key: str) -> None:
    done = _cli(["flower", "--flwr-home", str(link["home"]), "register", str(link["certs"] / f"{key}.pub"),
                 "--superlink", link["address"], "--root-certificates", str(link["certs"] / "ca.crt")], link["env"])
    assert done.returncode == 0, done.stdout


def test_a_tls_superlink_refuses_what_it_must_with_a_clear_message(tmp_path, tls_link):
    link, home = tls_link, str(tls_link["home"])
    _register(link, "clinic-0")
    node = ["flower", "--flwr-home", home, "supernode", "--superlink", link["address"], "--port", str(_free_port()),
            "--state-dir", str(tmp_path / "node"), "--partition-id", "0"]
    ca = str(link["certs"] / "ca.crt")

    unregistered = _cli([*node, "--root-certificates", ca, "--auth-key", str(link["certs"] / "stranger")], link["env"])
    assert unregistered.returncode not in (0, None), unregistered.stdout
    assert "public key of" in unregistered.stdout and "is not registered" in unregistered.stdout

    other_ca = _certs(tmp_path / "other")
    wrong_ca = _cli([*node, "--root-certificates", str(other_ca / "ca.crt"),
                     "--auth-key", str(link["certs"] / "clinic-0")], link["env"], timeout=60)
    assert wrong_ca.returncode not in (0, None) and "is not signed by the CA" in wrong_ca.stdout, wrong_ca.stdout

    plaintext = _cli(node, link["env"], timeout=60)  # Flower alone would retry this forever
    assert plaintext.returncode not in (0, None) and "uses TLS" in plaintext.stdout, plaintext.stdout

    submit = _cli(["flower", "--flwr-home", home, "submit", "configs/demo.toml", "--superlink", link["address"],
                   "--run-dir", str(tmp_path / "run")], link["env"], timeout=60)
    assert submit.returncode not in (0, None) and "uses TLS" in submit.stdout, submit.stdout
    assert not (tmp_path / "run").exists(), "nothing was submitted"


def _demo(tmp_path: Path, config_file: Path, *extra: str) -> subprocess.Popen:
    import sys

    env = {**os.environ, "FEDPIT_BIN": str(Path(sys.executable).parent), "FEDPIT_DEMO_CONFIG": str(config_file),
           "FEDPIT_DEMO_PORT": str(_free_port())}
    return subprocess.Popen(["bash", str(SCRIPTS / "federation-demo.sh"), str(tmp_path / "demo"), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _watch(process: subprocess.Popen, timeout: float, until: str | None = None) -> tuple[str, set[int]]:
    """The script's output (up to the line containing `until`, or its end) and every process it had
    started meanwhile, sampled every line and every second. The deadline holds even when the script
    prints nothing (its lines are read by a thread): then it gets TERM, so its trap stops what it started."""
    import queue
    import signal
    import threading

    if not hasattr(process, "lines"):  # one reader per script, across calls
        process.lines = queue.Queue()

        def read() -> None:
            for line in process.stdout:
                process.lines.put(line)
            process.lines.put(None)
        threading.Thread(target=read, daemon=True).start()
    lines, seen = [], set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen |= _descendants(process.pid)
        try:
            line = process.lines.get(timeout=1.0)
        except queue.Empty:
            continue
        if line is None:
            return "".join(lines), seen
        lines.append(line)
        if until and until in line:
            return "".join(lines), seen
    os.killpg(process.pid, signal.SIGTERM)
    return "".join(lines), seen


def _reap(process: subprocess.Popen, spawned: set[int]) -> list[int]:
    """After a walkthrough, passed or failed: the script stopped (KILL to its group if still there) and
    whatever it started that is still alive a minute later killed by PID; returns what was left."""
    import signal

    if process.poll() is None:
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    return _left_running(spawned)


def _left_running(pids: set[int]) -> list[int]:
    """What is still alive of `pids` after a minute; those are then killed (by PID), so a failing test
    leaves nothing behind either."""
    import signal

    deadline = time.monotonic() + 60
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [p for p in pids if _alive(p)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left


@pytest.mark.slow
def test_the_federation_walkthrough_runs_three_institutions_with_tls_auth_and_secure_aggregation(
    tmp_path, tiny_overrides
):
    """scripts/federation-demo.sh as the docs show it: certificates, a SuperLink with TLS and SuperNode
    authentication, three registered SuperNodes with their own exported data files, FedPIT submitted
    with the CA and SecAgg+, two rounds, the report printed, every process it started stopped."""
    config = config_mod.load(None, [*tiny_overrides, "federation.rounds=2", "federation.reply_timeout=300",
                                    "flower.secure_aggregation=true"])
    config_file = tmp_path / "experiment.toml"
    config_file.write_text(config_mod.dumps(config))
    process = _demo(tmp_path, config_file)
    spawned: set[int] = set()
    try:
        output, spawned = _watch(process, timeout=900)
    finally:
        left = _reap(process, spawned | _descendants(process.pid))  # before any assertion: nothing left running
    code = process.returncode
    assert code == 0, output[-4000:]
    assert "run complete" in output and "stopped 4 processes" in output, output[-2000:]
    run_dir = tmp_path / "demo" / "run"
    rounds = [r for r in RunDir(run_dir).metrics() if r["kind"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["secure_aggregation"]["contributors"] == 3 and len(r["clients"]) == 3 for r in rounds)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file() and (run_dir / "report.md").is_file()
    for file in (tmp_path / "demo" / "data").glob("*.jsonl"):  # each institution's state stayed on its side
        assert list((tmp_path / "demo" / "nodes" / file.stem / "state").glob("round-*.json"))
    assert len(spawned) > 8, spawned  # helpers, flower-superlink, flower-supernode, superexec ...
    assert left == [], "the walkthrough left a process running"


def test_the_walkthrough_stops_everything_it_started_on_ctrl_c(tmp_path, tiny_overrides):
    import signal

    config = config_mod.load(None, [*tiny_overrides, "flower.secure_aggregation=true"])
    config_file = tmp_path / "experiment.toml"
    config_file.write_text(config_mod.dumps(config))
    process = _demo(tmp_path, config_file)
    spawned: set[int] = set()
    output = rest = ""
    try:
        output, spawned = _watch(process, timeout=300, until="5. submit")
        time.sleep(5)
        spawned |= _descendants(process.pid)
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C sends to the foreground process group
        rest, _ = _watch(process, timeout=120)
    finally:
        left = _reap(process, spawned | _descendants(process.pid))  # before any assertion: nothing left running
    code = process.returncode
    assert code != 0
    assert "stopped 4 processes" in rest, output + rest
    assert len(spawned) > 8 and left == [], "Ctrl-C left a process running"


@pytest.mark.slow
def test_a_secure_round_survives_a_client_killed_mid_round(tmp_path, tiny_overrides, started,
                                                           write_instruction_file):
    """Three SuperNodes under SecAgg+ (three shares, two rebuild a secret); clinic-2's ClientApp is
    SIGKILLed after training, before its masked upload leaves. The round completes, and its global
    adapter is the weighted mean of the two others' uploads (recomputed here), within the bound."""
    from fedpit.data.federation import load_client_file
    from fedpit.engines.training import learning_rate_for_round
    from fedpit.methods import build_method
    from fedpit.model import load_model
    from fedpit.prompts import make_format
    from fedpit.runtimes.client import ClientRunner
    from fedpit.seeding import derive_seed

    config = config_mod.load(None, [*tiny_overrides, "data.partition.num_clients=3", "federation.rounds=1",
                                    "method.name='fedavg'", "federation.reply_timeout=90",
                                    "federation.min_replies=2", "flower.secure_aggregation=true"])
    config_file = tmp_path / "experiment.toml"
    config_file.write_text(config_mod.dumps(config))
    everything = write_instruction_file(tmp_path / "all.jsonl", 36).read_text().splitlines()
    files = []
    for i, share in enumerate((everything[:8], everything[8:18], everything[18:])):  # 8, 10, 18 examples
        files.append(tmp_path / f"clinic-{i}.jsonl")
        files[-1].write_text("\n".join(share))
    home = tmp_path / "flwr-home"
    env = dep.flower_env(home)
    port = _free_port()
    started.append(dep.start("superlink", dep.superlink_command(port, tmp_path / "link"), env, tmp_path / "logs"))
    _wait_for_port(port)
    for i, data_file in enumerate(files):
        command = dep.supernode_command(f"127.0.0.1:{port}", _free_port(), tmp_path / f"node-{i}",
                                        client_id=f"clinic-{i}", data_file=str(data_file))
        node_env = {**env, "FEDPIT_FAILPOINT": "after_client_update"} if i == 2 else env
        started.append(dep.start(f"supernode-{i}", command, node_env, tmp_path / "logs"))
    dep.write_connection(home, f"127.0.0.1:{port}")
    run_dir = tmp_path / "run"
    subprocess.run(dep.submit_command(dep.write_app(tmp_path / "app"), config_file, run_dir, clients=3, stream=False),
                   env=env, capture_output=True, text=True, timeout=120, check=True)
    status = dep.wait_for_run(run_dir, timeout=600)
    assert status["status"] == "complete", status
    record = next(r for r in RunDir(run_dir).metrics() if r["kind"] == "round")
    assert sorted(record["clients"]) == ["clinic-0", "clinic-1"] and "clinic-2" in record["dropped"]
    assert record["secure_aggregation"]["contributors"] == 2

    # the two survivors' uploads, recomputed in this process from the same inputs
    handle = load_model(config.model, config.lora, seed=config.seed)
    method, fmt = build_method(config), make_format(config.prompt.template, handle.tokenizer)
    initial = handle.fresh_adapter(derive_seed(config.seed, "lora-init"))
    lr = learning_rate_for_round(config.train.learning_rate, config.train.min_learning_rate, config.train.schedule,
                                 1, 1)
    uploads = []
    for i, data_file in enumerate(files):
        examples = load_client_file(config, handle.tokenizer, str(data_file), f"clinic-{i}")
        runner = ClientRunner(config, method, handle, fmt, tmp_path / "recomputed")
        uploads.append(runner.run_round(f"clinic-{i}", examples, 1, initial, lr, {}).upload)

    def mean(chosen):
        total = sum(u.num_examples for u in chosen)
        return {k: sum(u.tensors[k].double() * u.num_examples for u in chosen) / total for k in initial}

    got = RunDir(run_dir).load_checkpoint(1)
    survivors, everyone = mean(uploads[:2]), mean(uploads)
    assert got.keys() == survivors.keys()

    def distance(a):
        return max(float((got[k].double() - a[k]).abs().max()) for k in a)

    tolerance = record["secure_aggregation"]["error_bound"] + 1e-5  # + fp32 across processes
    assert distance(survivors) <= tolerance
    assert distance(everyone) > 10 * tolerance, "the dropped client's upload is not in the mean"
