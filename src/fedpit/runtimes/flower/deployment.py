"""Thin helpers around Flower's deployment engine: one SuperLink, one SuperNode per institution,
and the submission of a run. They build the command lines (with fedpit's settings: no run-time
dependency installation, no telemetry, a project FLWR_HOME) and start processes whose PIDs the
caller owns; nothing here stops a process it did not start.

    fedpit flower superlink --port 9091 --state-dir /srv/fedpit/link
    fedpit flower supernode --superlink link.example.org:9091 --port 9094 \\
        --client-id clinic-a --data-file /data/clinic-a.jsonl --state-dir /var/lib/fedpit
    fedpit flower submit configs/demo.toml --superlink link.example.org:9091 --run-dir runs/federated

TLS: give the SuperLink `--certs DIR` (ca.crt, server.pem, server.key; made by
scripts/make-certs.sh) and each SuperNode / submitter `--root-certificates DIR/ca.crt`; with
`--auth` the SuperLink only admits SuperNodes whose public key was registered
(`fedpit flower register KEY.pub`), each started with `--auth-key KEY`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedpit.errors import FedpitError
from fedpit.runs import private_dir

APP_NAME = "fedpit-app"
CONNECTION = "fedpit"
APP_PYPROJECT = """\
# Written by `fedpit flower app`: a Flower App whose components are fedpit's ServerApp and ClientApp.
# fedpit itself must be installed where the SuperLink and SuperNodes run (no run-time installs).
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "{version}"
description = "fedpit: privacy-preserving few-shot federated instruction tuning"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedpit"

[tool.flwr.app.components]
serverapp = "fedpit.runtimes.flower.server_app:app"
clientapp = "fedpit.runtimes.flower.client_app:app"

[tool.flwr.app.config]
config = ""
run-dir = ""
resume = false
clients = 0
"""


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment every Flower process gets: a project FLWR_HOME, no telemetry or update
    checks, no dependency installation at run time, and this venv's scripts on PATH (the SuperLink
    and SuperNodes start `flower-superexec` by name)."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            raise FedpitError(f"'{name}' not found; install fedpit with `make setup` (it brings flwr)")
        return found
    return str(path)


CERT_FILES = ("ca.crt", "server.pem", "server.key")


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise FedpitError(f"'{address}' is not HOST:PORT (e.g. link.example.org:9091)")
    return host.strip("[]"), int(port)


def check_superlink(address: str, root_certificates: Path | None, timeout: float = 10.0,
                    must_answer: bool = True) -> None:
    """Say, before Flower starts and in words, why a connection to the SuperLink cannot work: nothing
    listens; it speaks TLS and we were given no CA (or the reverse); its certificate is not signed by
    the CA we were given, or does not name the host we dial. Flower itself retries a plaintext
    connection to a TLS port forever and reports a wrong CA as a numbered exit code. A SuperNode may
    start before its SuperLink (`must_answer=False`): then only a warning, and Flower retries."""
    host, port = _split_address(address)
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        message = f"nothing answers at {address} ({exc.strerror or exc}): start the SuperLink, or check --superlink"
        if must_answer:
            raise FedpitError(f"{message} and the firewall") from None
        print(f"fedpit: {message}; the SuperNode keeps retrying", file=sys.stderr)
        return
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname, probe.verify_mode = False, ssl.CERT_NONE
    probe.set_alpn_protocols(["h2"])
    try:
        with probe.wrap_socket(raw, server_hostname=host):
            speaks_tls = True
    except (ssl.SSLError, OSError):
        speaks_tls = False
    finally:
        raw.close()
    if speaks_tls and root_certificates is None:
        raise FedpitError(f"the SuperLink at {address} uses TLS, and this side has no CA to check it with: pass "
                          f"--root-certificates CA.crt (the federation's ca.crt from scripts/make-certs.sh)")
    if not speaks_tls and root_certificates is not None:
        raise FedpitError(f"the SuperLink at {address} does not speak TLS: start it with --certs DIR, or (loopback "
                          f"tests only) connect without --root-certificates")
    if root_certificates is None:
        return
    if not Path(root_certificates).is_file():
        raise FedpitError(f"--root-certificates '{root_certificates}' is not a file; pass the federation's ca.crt")
    verify = ssl.create_default_context(cafile=str(root_certificates))
    verify.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                verify.wrap_socket(raw, server_hostname=host):
            return
    except ssl.SSLCertVerificationError as exc:
        if "match" in str(exc.verify_message or exc).lower() or "hostname" in str(exc).lower():
            raise FedpitError(f"the SuperLink's certificate does not name '{host}': dial it by a name or IP the "
                              f"certificate lists, or remake it with `scripts/make-certs.sh DIR {host}`") from None
        raise FedpitError(f"the SuperLink's certificate is not signed by the CA in '{root_certificates}' "
                          f"({exc.verify_message}): pass the ca.crt the SuperLink's server.pem was made with") from None


def diagnose_supernode(auth_key: Path | None) -> Callable[[str], str | None]:
    """Reads a SuperNode's log lines; names the cause of a refused activation (TLS was checked before
    start, so a refusal is the key)."""

    def watch(line: str) -> str | None:
        if "Failed to activate SuperNode" not in line:
            return None
        if auth_key is None:
            return ("the SuperLink refused this SuperNode: it admits only registered SuperNodes (--auth); start this "
                    "one with --auth-key KEY and register KEY.pub on the server with `fedpit flower register KEY.pub`")
        return (f"the SuperLink refused this SuperNode: the public key of '{auth_key}' is not registered; on the "
                f"server run `fedpit flower register {auth_key}.pub --superlink ... --root-certificates CA.crt`")

    return watch


def superlink_command(port: int, state_dir: Path, host: str = "127.0.0.1", certs: Path | None = None,
                      auth: bool = False) -> list[str]:
    state_dir = Path(state_dir).resolve()
    if certs is not None:
        missing = [name for name in CERT_FILES if not (Path(certs) / name).is_file()]
        if missing:
            raise FedpitError(f"--certs '{certs}' lacks {', '.join(missing)}; make them with "
                              f"`scripts/make-certs.sh {certs} HOST`")
    private_dir(state_dir)
    command = [_tool("flower-superlink"), "--host", host, "--port", str(port),
               "--database", str(state_dir / "superlink.db"), "--disable-runtime-dependency-installation"]
    if certs is None:
        if auth:
            raise FedpitError("SuperNode authentication needs TLS: pass --certs DIR (see scripts/make-certs.sh)")
        return [*command, "--insecure"]
    command += ["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
                "--ssl-keyfile", str(certs / "server.key")]
    return [*command, "--enable-supernode-auth"] if auth else command


def supernode_command(superlink: str, port: int, state_dir: Path, *, client_id: str = "", data_file: str = "",
                      partition_id: int | None = None, host: str = "127.0.0.1", root_certificates: Path | None = None,
                      auth_key: Path | None = None) -> list[str]:
    if bool(data_file) == (partition_id is not None):
        raise FedpitError("a SuperNode needs exactly one of --data-file (its own data) or --partition-id")
    private_dir(Path(state_dir).resolve())
    node = {"state-dir": str(Path(state_dir).resolve())}
    if data_file:
        node |= {"client-id": client_id or Path(data_file).stem, "data-file": str(Path(data_file).resolve())}
    else:
        node["partition-id"] = partition_id
    node_config = " ".join(f"{k}={json.dumps(v)}" if isinstance(v, str) else f"{k}={v}" for k, v in node.items())
    command = [_tool("flower-supernode"), "--superlink", superlink, "--host", host, "--port", str(port),
               "--node-config", node_config]
    if root_certificates is None:
        return [*command, "--insecure"]
    if not Path(root_certificates).is_file():
        raise FedpitError(f"--root-certificates '{root_certificates}' is not a file; pass the federation's ca.crt")
    command += ["--root-certificates", str(root_certificates)]
    if auth_key is None:
        return command
    if not Path(auth_key).is_file():
        raise FedpitError(f"--auth-key '{auth_key}' is not a file; make keys with "
                          f"`scripts/make-certs.sh DIR --nodes NAME` and pass the private one (not .pub)")
    return [*command, "--auth-supernode-private-key", str(auth_key)]


def write_app(folder: Path) -> Path:
    """The Flower App folder `flwr run` packages: only a pyproject naming fedpit's components."""
    from importlib.metadata import version

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(APP_PYPROJECT.format(name=APP_NAME, version=version("fedpit")))
    return folder


def write_connection(flwr_home: Path, superlink: str, root_certificates: Path | None = None) -> None:
    """`flwr` finds SuperLinks by connection name in FLWR_HOME/config.toml; ours is 'fedpit'."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{superlink}"\n{security}\n')


def write_submission(flwr_home: Path, run_dir: Path, config_toml: str) -> Path:
    """The resolved config (file plus every --set) as the ServerApp must run it: `flwr run` passes a
    path, so the overrides have to be in a file, or the ServerApp would run the file without them."""
    folder = Path(flwr_home).resolve() / "submitted"
    private_dir(folder)
    path = folder / f"{Path(run_dir).resolve().name}-{time.strftime('%Y%m%d-%H%M%S')}.toml"
    path.write_text(config_toml, encoding="utf-8")
    return path


def submit_command(app_dir: Path, config: Path, run_dir: Path, clients: int, resume: bool = False,
                   stream: bool = True) -> list[str]:
    paths = {"config": str(Path(config).resolve()), "run-dir": str(Path(run_dir).resolve())}
    run_config = " ".join(f"{k}={json.dumps(v)}" for k, v in paths.items())
    run_config += f" clients={clients} resume={'true' if resume else 'false'}"
    command = [_tool("flwr"), "run", str(app_dir), CONNECTION, "--run-config", run_config]
    return [*command, "--stream"] if stream else command


def run_foreground(command: list[str], env: dict[str, str], grace: float = 15.0,
                   diagnose: Callable[[str], str | None] | None = None, timeout: float | None = None,
                   received: list[int] | None = None, timed_out: list[float] | None = None) -> int:
    """Run a Flower process in the foreground as the leader of its own process group, and pass SIGTERM
    (what a service manager sends) and SIGINT (Ctrl-C) on to that whole group: flower-superlink and
    flower-supernode start flower-superexec processes that would otherwise outlive a stopped helper.
    Waits for the group to end; what is still there `grace` seconds after the leader ended is killed.
    A leader that has not ended `grace` seconds after a forwarded signal gets SIGTERM, and SIGKILL
    `grace` later: the SuperLink's web server, told to stop, waits for open connections to close, and
    a `flwr run` streaming its log from it keeps one open, so without this a Ctrl-C could leave the
    helper, and a script waiting for it, waiting forever. After `timeout` seconds the group gets SIGTERM
    the same way, and `timed_out` gets the time it happened: whether the run ended or was stopped is the
    wait's own record, not a guess from the clock afterwards. The handlers are installed even where the
    signals were ignored at startup (a background job of a script ignores SIGINT). `received` collects the
    signals the helper was sent.
    With `diagnose`, the output passes through it line by line, and the cause it names is printed
    when the process fails."""
    if diagnose is None:
        process = subprocess.Popen(command, env=env, start_new_session=True)
        causes: list[str] = []
    else:
        process = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1)
        causes = []
        reader = threading.Thread(target=_relay, args=(process, diagnose, causes), daemon=True)
        reader.start()

    forwarded: list[float] = []  # when a stop signal was last sent to the group

    def forward(signum: int) -> None:
        forwarded.append(time.monotonic())
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            pass

    def on_signal(signum: int, _frame) -> None:
        if received is not None:
            received.append(signum)
        forward(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = _wait_escalating(process, forwarded, grace, forward,
                                None if timeout is None else time.monotonic() + timeout, timed_out)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        forward(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _group_alive(process.pid):
            time.sleep(0.2)
        if _group_alive(process.pid):
            forward(signal.SIGKILL)
    if code != 0 and causes:
        print(f"fedpit: {causes[-1]}", file=sys.stderr)
    return code


def _wait_escalating(process: subprocess.Popen, forwarded: list[float], grace: float,
                     send: Callable[[int], None], deadline: float | None, timed_out: list[float] | None = None) -> int:
    """The leader's exit code; while it runs, a stop signal `grace` seconds old is followed by SIGTERM,
    and that by SIGKILL (`send` forwards to the group and notes the time), and a passed `deadline`
    counts as a SIGTERM (noted in `timed_out`)."""
    escalation = [signal.SIGTERM, signal.SIGKILL]
    while True:
        try:
            return process.wait(timeout=0.2)  # a forwarded signal does not interrupt the wait (PEP 475)
        except subprocess.TimeoutExpired:
            pass
        if not forwarded and deadline is not None and time.monotonic() > deadline:
            if timed_out is not None:
                timed_out.append(time.monotonic())
            send(signal.SIGTERM)
        elif forwarded and escalation and time.monotonic() - forwarded[-1] > grace:
            send(escalation.pop(0))


def _relay(process: subprocess.Popen, diagnose: Callable[[str], str | None], causes: list[str]) -> None:
    for line in process.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        cause = diagnose(line)
        if cause:
            causes.append(cause)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class Started:
    """A process this session started, stoppable by its PID only."""

    name: str
    process: subprocess.Popen
    log: Path

    def stop(self, grace: float = 10.0) -> None:
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=grace)


def start(name: str, command: list[str], env: dict[str, str], log_dir: Path) -> Started:
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    handle = open(log, "ab")  # noqa: SIM115 - the child owns it for its lifetime
    process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
    return Started(name=name, process=process, log=log)


def wait_for_run(run_dir: Path, timeout: float, poll: float = 2.0) -> dict:
    """Poll the run directory (the ServerApp writes its status there) until complete or failed."""
    deadline = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < deadline:
        file = Path(run_dir) / "run.json"
        if file.is_file():
            try:
                status = json.loads(file.read_text())
            except json.JSONDecodeError:
                status = {}
            if status.get("status") in ("complete", "failed"):
                return status
        time.sleep(poll)
    raise FedpitError(f"the run in '{run_dir}' did not finish within {timeout:.0f}s (status {status.get('status')})")
