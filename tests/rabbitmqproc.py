"""Test helpers: real RabbitMQ 3.10 nodes as plain subprocesses, alone or clustered.

Each `RabbitCluster` lives in one directory with its own HOME (and `.erlang.cookie`),
its own epmd on 127.0.0.1 at a dedicated port (`ERL_EPMD_PORT`, so a system epmd or
another cluster is never touched), and per node its config, plugins file, mnesia and
log directories and free ports. Readiness is `rabbitmqctl wait PIDFILE` with a
deadline; teardown stops every node (SIGTERM, then SIGKILL after a deadline) and the
cluster's own epmd. Nothing sleeps a fixed time. `rabbitmq_gateway` and
`gateway_cluster` are what the RabbitMQ test modules' shared fixtures start: a gateway
with the RabbitMQ profile and a cluster configured from its `rabbitmq config`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.gatewayproc import GatewayProcess, init_gateway, running_gateway

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
PLUGINS = "[rabbitmq_mqtt,rabbitmq_auth_backend_oauth2,rabbitmq_management].\n"
MANAGEMENT_USER = "gatepass-enforcer"
MANAGEMENT_PASSWORD = "enforcer-test-password"
START_TIMEOUT = 90.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class RabbitNode:
    name: str
    base: Path
    mqtt_port: int
    amqp_port: int
    dist_port: int
    management_port: int
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    @property
    def pid_file(self) -> Path:
        return self.base / "node.pid"

    @property
    def log_path(self) -> Path:
        return self.base / "stdout.log"

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.name, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise AssertionError(f"rabbitmqctl {args} failed: {proc.stdout}{proc.stderr}")
        return proc


def node_conf(profile_conf: str, node: RabbitNode) -> str:
    """The profile's lines (from `gatepass-gateway rabbitmq config`) with this node's ports."""
    per_node = ("mqtt.listeners.tcp.default", "management.tcp.port")
    lines = [line for line in profile_conf.splitlines() if not line.startswith(per_node)]
    return "\n".join(
        [
            *lines,
            f"listeners.tcp.default = 127.0.0.1:{node.amqp_port}",
            f"mqtt.listeners.tcp.default = 127.0.0.1:{node.mqtt_port}",
            f"management.tcp.port = {node.management_port}",
            "management.tcp.ip = 127.0.0.1",
            f"default_user = {MANAGEMENT_USER}",
            f"default_pass = {MANAGEMENT_PASSWORD}",
            "default_user_tags.administrator = true",
            # The enforcer's user needs no rights inside the vhost.
            "default_permissions.configure = ^$",
            "default_permissions.read = ^$",
            "default_permissions.write = ^$",
            "log.console = false",
            "log.file.level = info",
            "",
        ]
    )


@dataclass
class RabbitCluster:
    base: Path
    epmd_port: int
    nodes: list[RabbitNode] = field(default_factory=list)

    def _env(self, node_name: str, node_dir: Path, ports: dict[str, int]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(self.base / "home"),
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_NODENAME=node_name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(ports["amqp"]),
            RABBITMQ_DIST_PORT=str(ports["dist"]),
            RABBITMQ_CONFIG_FILE=str(node_dir / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(node_dir / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(node_dir / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(node_dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(node_dir / "log"),
            RABBITMQ_PID_FILE=str(node_dir / "node.pid"),
            RABBITMQ_CONF_ENV_FILE=str(node_dir / "rabbitmq-env.conf"),
        )
        return env

    def add_node(self, short: str, profile_conf: str) -> RabbitNode:
        node_dir = self.base / short
        for sub in ("mnesia", "log"):
            (node_dir / sub).mkdir(parents=True, exist_ok=True)
        ports = {"amqp": free_port(), "dist": free_port()}
        name = f"{short}@localhost"
        node = RabbitNode(
            name=name,
            base=node_dir,
            mqtt_port=free_port(),
            amqp_port=ports["amqp"],
            dist_port=ports["dist"],
            management_port=free_port(),
            env=self._env(name, node_dir, ports),
        )
        (node_dir / "rabbitmq.conf").write_text(node_conf(profile_conf, node))
        (node_dir / "enabled_plugins").write_text(PLUGINS)
        (node_dir / "rabbitmq-env.conf").write_text("")
        self.nodes.append(node)
        return node

    def start(self, nodes: Sequence[RabbitNode]) -> None:
        """Start `nodes` together and wait until every one runs all its plugins."""
        for node in nodes:
            with node.log_path.open("wb") as log:
                node.proc = subprocess.Popen(
                    [str(RABBITMQ_BIN / "rabbitmq-server")],
                    env=node.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        waits = [
            subprocess.Popen(
                [
                    str(RABBITMQ_BIN / "rabbitmqctl"),
                    "-n",
                    node.name,
                    "wait",
                    str(node.pid_file),
                    "--timeout",
                    str(int(START_TIMEOUT)),
                ],
                env=node.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for node in nodes
        ]
        for node, wait in zip(nodes, waits, strict=True):
            out, _ = wait.communicate(timeout=START_TIMEOUT + 10)
            if wait.returncode != 0:
                tail = node.log_path.read_text(errors="replace")[-3000:]
                raise AssertionError(f"{node.name} did not start: {out!r}\n{tail}")

    def join(self, node: RabbitNode, seed: RabbitNode) -> None:
        node.ctl("stop_app")
        node.ctl("join_cluster", seed.name)
        node.ctl("start_app")
        node.ctl("await_startup", "--timeout", "60")

    def stop(self) -> None:
        for node in self.nodes:
            _terminate(node.proc)
        for node in self.nodes:
            _reap(node.proc)
        env = {**os.environ, "ERL_EPMD_PORT": str(self.epmd_port)}
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                ["epmd", "-port", str(self.epmd_port), "-kill"],
                env=env,
                capture_output=True,
                timeout=10,
                check=False,
            )


def _terminate(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)


def _reap(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None:
        return
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    # Helper processes of the node (erl_child_setup, inet_gethost) share its group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def rabbit_cluster(base: Path, profile_conf: str, size: int = 2) -> Iterator[RabbitCluster]:
    """`size` nodes started together; nodes after the first joined to the first."""
    home = base / "home"
    home.mkdir(parents=True)
    cookie = home / ".erlang.cookie"
    cookie.write_text(os.urandom(16).hex().upper())
    cookie.chmod(0o400)
    cluster = RabbitCluster(base=base, epmd_port=free_port())
    try:
        nodes = [cluster.add_node(f"gp{i}", profile_conf) for i in range(size)]
        cluster.start(nodes)
        for node in nodes[1:]:
            cluster.join(node, nodes[0])
        yield cluster
    finally:
        cluster.stop()


@contextlib.contextmanager
def rabbitmq_gateway(base: Path, token_lifetime: int) -> Iterator[GatewayProcess]:
    """A running gateway in `base / "gw"` with the RabbitMQ profile and a generous
    token rate limit (tests fetch many tokens)."""
    root = init_gateway(
        base / "gw",
        "rabbitmq = true",
        f"token_lifetime = {token_lifetime}",
        "token_rate_per_minute = 600.0",
        "token_burst = 100",
    )
    with running_gateway(root) as gateway:
        yield gateway


@contextlib.contextmanager
def gateway_cluster(gw: GatewayProcess, base: Path) -> Iterator[RabbitCluster]:
    """A 2-node cluster in `base`, configured from `gw`'s `rabbitmq config`."""
    conf = gw.admin("rabbitmq", "config", "--out", str(base / "keys")).stdout
    with rabbit_cluster(base, conf) as started:
        yield started
