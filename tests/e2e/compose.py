"""compose.yaml, read and run as local processes: the end-to-end tests' harness.

``Compose`` reads the file the way docker compose does (YAML merge keys,
``${VAR:-default}`` interpolation from the environment, ``$$`` for a literal
``$``) and is strict where compose only warns: an unset variable without a
default is an error here. ``LocalApp`` then runs each application service's own
``command`` as a local process, with the ``environment`` compose would give it,
translated to this machine:

* the infrastructure services (those with an ``image`` and no ``build``) are the
  machine's own RabbitMQ and PostgreSQL: ``amqp://...@rabbitmq:5672/`` becomes
  the given broker URI (a fresh vhost), ``postgresql://...@postgres:5432/<db>``
  the given server with ``<prefix>_<db>`` (a fresh database set, created from
  the postgres service's ``APP_DATABASES`` as its init script does);
* each container port a service ``expose``s gets a free local port, rewritten
  wherever ``:<port>`` appears in its command, environment and healthcheck (each
  replica its own);
* each named volume becomes a local folder, rewritten wherever its mount path
  appears (``/data/storage``), shared by every service mounting it.

Services start in ``depends_on`` order; a one-shot one (``service_completed_
successfully``) must exit 0, the others must pass their healthcheck, run with its
own ``test`` command. A broken command, variable or healthcheck fails the test.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg2
import yaml

from framework.testing.utils import find_free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.yaml"
BIN_DIR = Path(sys.executable).parent

HEALTHY = "service_healthy"
COMPLETED = "service_completed_successfully"
STARTED = "service_started"

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, $NAME, $$
_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 0.000001}
_URL = re.compile(r"\b(?:amqps?|postgres(?:ql)?|https?)(?:\+\w+)?://[^\s'\",}]+")


class ComposeError(Exception):
    """compose.yaml cannot be read or run as written."""


def interpolate(text: str, env: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        name = match.group("braced") or match.group("named")
        op, arg = match.group("op"), match.group("arg")
        value = env.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return value if value is not None else arg
        if op in (":?", "?"):
            missing = not value if op == ":?" else value is None
            if missing:
                raise ComposeError(f"variable {name} is required: {arg}")
            return value or ""
        if value is None:
            raise ComposeError(f"variable {name} is not set and has no default")
        return value

    return _VARIABLE.sub(replace, text)


def _interpolate_all(value: Any, env: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return interpolate(value, env)
    if isinstance(value, list):
        return [_interpolate_all(item, env) for item in value]
    if isinstance(value, dict):
        return {key: _interpolate_all(item, env) for key, item in value.items()}
    return value


def duration(text: str | int | float | None, default: float) -> float:
    """Compose's durations (``1m30s``, ``10s``, ``500ms``) in seconds."""
    if text is None:
        return default
    if isinstance(text, int | float):
        return float(text)
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ComposeError(f"not a duration: {text!r}")
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


@dataclass
class ComposeService:
    name: str
    spec: dict[str, Any]

    @property
    def is_infrastructure(self) -> bool:
        """Provided by the machine here (RabbitMQ, PostgreSQL), not run by us."""
        return "build" not in self.spec

    @property
    def command(self) -> list[str]:
        command = self.spec.get("command")
        if command is None:
            raise ComposeError(f"service {self.name} has no command")
        if isinstance(command, str):
            return shlex.split(command)
        return [str(part) for part in command]

    @property
    def environment(self) -> dict[str, str]:
        env = self.spec.get("environment") or {}
        if isinstance(env, list):
            pairs = (item.split("=", 1) for item in env)
            return {key: value for key, value in pairs}
        return {key: "" if value is None else str(value) for key, value in env.items()}

    @property
    def depends_on(self) -> dict[str, str]:
        deps = self.spec.get("depends_on") or {}
        if isinstance(deps, list):
            return {name: STARTED for name in deps}
        return {
            name: (spec or {}).get("condition", STARTED) for name, spec in deps.items()
        }

    @property
    def healthcheck(self) -> list[str] | None:
        """The healthcheck's command as argv, or None without one."""
        check = self.spec.get("healthcheck") or {}
        if check.get("disable"):
            return None
        test = check.get("test")
        if test is None:
            return None
        if isinstance(test, str):
            return ["sh", "-c", test]
        kind, *rest = [str(part) for part in test]
        if kind == "NONE":
            return None
        if kind == "CMD":
            return rest
        if kind == "CMD-SHELL":
            return ["sh", "-c", " ".join(rest)]
        raise ComposeError(
            f"service {self.name}: healthcheck test starts with {kind!r}"
        )

    def healthcheck_timing(self) -> tuple[float, float, int, float]:
        """``(interval, timeout, retries, start_period)`` in seconds."""
        check = self.spec.get("healthcheck") or {}
        return (
            duration(check.get("interval"), 30),
            duration(check.get("timeout"), 30),
            int(check.get("retries", 3)),
            duration(check.get("start_period"), 0),
        )

    @property
    def exposed_ports(self) -> list[int]:
        return [int(str(port).split("/")[0]) for port in self.spec.get("expose") or []]

    @property
    def volumes(self) -> list[tuple[str, str]]:
        """``(volume name, mount path)`` for each named volume."""
        found = []
        for volume in self.spec.get("volumes") or []:
            source, _, rest = str(volume).partition(":")
            target = rest.split(":")[0]
            if source and not source.startswith((".", "/")) and target:
                found.append((source, target))
        return found


class Compose:
    def __init__(self, path: Path = COMPOSE_FILE, env: Mapping[str, str] | None = None):
        self.path = path
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        self.raw = raw
        env = dict(os.environ if env is None else env)
        self.services = {
            name: ComposeService(name, _interpolate_all(spec, env))
            for name, spec in raw["services"].items()
        }
        self.volumes = set(raw.get("volumes") or {})

    def __getitem__(self, name: str) -> ComposeService:
        return self.services[name]

    @property
    def application(self) -> list[ComposeService]:
        return [
            service
            for service in self.services.values()
            if not service.is_infrastructure
        ]

    def start_order(self) -> list[str]:
        """Every service after everything it depends on; a cycle is an error."""
        order: list[str] = []
        visiting: set[str] = set()

        def visit(name: str) -> None:
            if name in order:
                return
            if name in visiting:
                raise ComposeError(f"depends_on cycle through {name}")
            if name not in self.services:
                raise ComposeError(f"depends_on names an unknown service {name}")
            visiting.add(name)
            for dependency in self.services[name].depends_on:
                visit(dependency)
            visiting.discard(name)
            order.append(name)

        for name in self.services:
            visit(name)
        return order

    def one_shot(self) -> set[str]:
        """Services some other waits to complete (migrations)."""
        return {
            dependency
            for service in self.services.values()
            for dependency, condition in service.depends_on.items()
            if condition == COMPLETED
        }


# -- running it here ----------------------------------------------------------------------


@dataclass
class Process:
    service: str
    replica: int
    popen: subprocess.Popen[bytes]
    log: Path
    ports: dict[int, int]

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class LocalApp:
    """compose.yaml's application services as processes on this machine."""

    compose: Compose
    amqp_uri: str  # the broker to use, with its vhost
    postgres_server: str  # e.g. postgresql://postgres@127.0.0.1:5432 (no database)
    db_prefix: str
    workdir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    # Where databases are created and dropped: the server itself, even when the
    # services reach it through a proxy that a test may cut.
    admin_server: str | None = None
    processes: dict[str, list[Process]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.volume_dirs = {
            name: self.workdir / "volumes" / name
            for name in sorted(self.compose.volumes)
        }
        for path in self.volume_dirs.values():
            path.mkdir(parents=True, exist_ok=True)

    # -- databases, as the postgres init script makes them ------------------------

    def database_names(self) -> list[str]:
        postgres = self.compose["postgres"].environment
        return postgres.get("APP_DATABASES", "").split()

    def _server_statement(self, statement: str) -> None:
        connection = psycopg2.connect(
            f"{self.admin_server or self.postgres_server}/postgres"
        )
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(statement)
        finally:
            connection.close()

    def create_databases(self) -> None:
        for name in self.database_names():
            self._server_statement(f'CREATE DATABASE "{self.db_prefix}_{name}"')

    def drop_databases(self) -> None:
        for name in self.database_names():
            self._server_statement(
                f'DROP DATABASE IF EXISTS "{self.db_prefix}_{name}" WITH (FORCE)'
            )

    # -- translation ------------------------------------------------------------------

    def _translate_url(self, url: str) -> str:
        parts = urlsplit(url)
        host = parts.hostname
        if parts.scheme.startswith("amqp") and host == "rabbitmq":
            return self.amqp_uri
        if parts.scheme.startswith("postgres") and host == "postgres":
            # compose's user and password are kept (the local server trusts
            # local connections), so what a service sees of them is unchanged.
            server = urlsplit(self.postgres_server)
            userinfo = parts.netloc.rpartition("@")[0]
            address = server.netloc.rpartition("@")[2]
            netloc = f"{userinfo}@{address}" if userinfo else server.netloc
            database = f"{self.db_prefix}_{parts.path.lstrip('/')}"
            return f"{server.scheme}://{netloc}/{database}"
        if parts.scheme.startswith("http") and host == "rabbitmq":
            # The management API of the machine's own broker.
            return parts._replace(
                netloc=parts.netloc.replace("@rabbitmq:", "@127.0.0.1:")
            ).geturl()
        if parts.scheme.startswith("http") and host in self.compose.services:
            # Another service by its compose name: its first replica here.
            replicas = self.processes.get(host) or []
            if replicas and parts.port in replicas[0].ports:
                netloc = f"127.0.0.1:{replicas[0].ports[parts.port]}"
                return parts._replace(netloc=netloc).geturl()
        return url

    def translate(
        self, text: str, ports: Mapping[int, int], mounts: Mapping[str, Path]
    ) -> str:
        text = _URL.sub(lambda match: self._translate_url(match.group(0)), text)
        for container_port, local_port in ports.items():
            text = re.sub(rf"(?<=:){container_port}\b", str(local_port), text)
        for mount, local in mounts.items():
            text = text.replace(mount, str(local))
        return text

    def _mounts(self, service: ComposeService) -> dict[str, Path]:
        return {target: self.volume_dirs[name] for name, target in service.volumes}

    def environment(
        self, service: ComposeService, ports: Mapping[int, int]
    ) -> dict[str, str]:
        mounts = self._mounts(service)
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("PYTEST")
        }
        env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONUNBUFFERED"] = "1"
        for key, value in service.environment.items():
            env[key] = self.translate(value, ports, mounts)
        env.update(self.extra_env)
        return env

    # -- processes --------------------------------------------------------------------

    def start(self, name: str) -> Process:
        """Start one more replica of ``name`` (not waiting for it)."""
        service = self.compose[name]
        replicas = self.processes.setdefault(name, [])
        replica = len(replicas) + 1
        ports = {port: find_free_port() for port in service.exposed_ports}
        mounts = self._mounts(service)
        command = [self.translate(part, ports, mounts) for part in service.command]
        log = self.workdir / "logs" / f"{name}-{replica}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as output:
            popen = subprocess.Popen(
                command,
                cwd=ROOT,
                env=self.environment(service, ports),
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        process = Process(name, replica, popen, log, ports)
        replicas.append(process)
        return process

    def run_to_completion(self, name: str, timeout: float = 180) -> None:
        process = self.start(name)
        try:
            code = process.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            process.popen.kill()
            raise ComposeError(
                f"{name} did not finish within {timeout}s:\n{process.output()}"
            ) from None
        if code != 0:
            raise ComposeError(f"{name} exited with {code}:\n{process.output()}")

    def check_health(self, process: Process) -> subprocess.CompletedProcess[str]:
        service = self.compose[process.service]
        argv = service.healthcheck
        assert argv is not None, f"{process.service} has no healthcheck"
        _, timeout, _, _ = service.healthcheck_timing()
        mounts = self._mounts(service)
        argv = [self.translate(part, process.ports, mounts) for part in argv]
        try:
            return subprocess.run(
                argv,
                cwd=ROOT,
                env=self.environment(service, process.ports),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(argv, 124, "", "healthcheck timed out")

    def wait_healthy(self, process: Process, timeout: float | None = None) -> None:
        """Until the service's healthcheck passes, within compose's own allowance
        (start period plus retries at the interval), at least ``timeout``."""
        service = self.compose[process.service]
        interval, check_timeout, retries, start_period = service.healthcheck_timing()
        allowance = start_period + retries * (interval + check_timeout)
        deadline = time.monotonic() + max(allowance, timeout or 0)
        last = None
        while time.monotonic() < deadline:
            if not process.alive():
                raise ComposeError(
                    f"{process.service} exited with {process.popen.returncode} before "
                    f"it was healthy:\n{process.output()}"
                )
            last = self.check_health(process)
            # Healthy means the check passes and the process is still there: a
            # service that exited is not healthy whatever answers on its port.
            if last.returncode == 0 and process.alive():
                return
            time.sleep(0.5)
        detail = (last.stderr or last.stdout)[-2000:] if last is not None else ""
        raise ComposeError(
            f"{process.service} never passed its healthcheck:\n{detail}\n"
            f"-- its output:\n{process.output()[-5000:]}"
        )

    def up(self, names: Iterable[str] | None = None) -> None:
        """Start ``names`` (default: every application service) and what they need,
        in depends_on order, each waited for as compose would: services whose
        dependencies are met start together, as compose starts them."""
        needed: set[str] = set()

        def need(name: str) -> None:
            if name not in needed:
                needed.add(name)
                for dependency in self.compose[name].depends_on:
                    need(dependency)

        for name in names or [s.name for s in self.compose.application]:
            need(name)
        one_shot = self.compose.one_shot()
        done = {
            name
            for name in needed
            if self.compose[name].is_infrastructure or name in self.processes
        }
        pending = [name for name in self.compose.start_order() if name in needed - done]
        launched: list[Process] = []
        while pending:
            wave = [
                name
                for name in pending
                if all(dep in done for dep in self.compose[name].depends_on)
            ]
            for name in wave:
                if name in one_shot:
                    self.run_to_completion(name)
            started = [self.start(name) for name in wave if name not in one_shot]
            launched.extend(started)
            for process in started:
                if self.compose[process.service].healthcheck is not None:
                    self.wait_healthy(process)
            done.update(wave)
            pending = [name for name in pending if name not in done]
        for process in launched:
            if not process.alive():
                raise ComposeError(
                    f"{process.service} exited with {process.popen.returncode}:\n"
                    f"{process.output()[-5000:]}"
                )

    def replicas(self, name: str) -> list[Process]:
        return [process for process in self.processes.get(name, []) if process.alive()]

    def port(self, name: str, container_port: int, replica: int = 0) -> int:
        return self.replicas(name)[replica].ports[container_port]

    def stop(
        self, process: Process, sig: int = signal.SIGTERM, timeout: float = 60
    ) -> int:
        if process.alive():
            process.popen.send_signal(sig)
        try:
            return process.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            process.popen.kill()
            process.popen.wait()
            raise ComposeError(
                f"{process.service} did not exit within {timeout}s of signal {sig}:\n"
                f"{process.output()[-5000:]}"
            ) from None

    def down(self) -> None:
        running = [p for procs in self.processes.values() for p in procs if p.alive()]
        for process in running:
            process.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 45
        for process in running:
            try:
                process.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait()
