"""A real single-node Apache Kafka broker (KRaft), assembled from Maven Central.

``LocalBroker(home)`` manages one broker whose whole state lives in ``home``:
``server.properties`` (written at each start), ``cluster.id``, ``data/``,
``broker.pid`` and ``broker.log`` (the JVM's stdout and stderr, appended).
The jars come from ``lorastream/dev/kafka/pom.xml`` through
``mvn dependency:copy-dependencies``, run once; no Docker, no Apache download
site. The broker runs as ``java -cp 'jars/*' kafka.Kafka server.properties`` in
its own session, so it outlives the process that started it (the CLI).

Every failure the caller can do something about is a :class:`BrokerError`
whose message says what failed and which log to read.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from lorastream.dev.errors import BrokerError
from lorastream.dev.files import locked, read_stripped, tail_text, write_atomic
from lorastream.dev.jars import KAFKA_VERSION, fetch_kafka_jars
from lorastream.dev.probe import answers_api_versions, kafka_answers
from lorastream.dev.process import signal_pgid, start_group
from lorastream.dev.secure import SecureFiles, client_exports, client_ssl_context

__all__ = [
    "KAFKA_VERSION",
    "BrokerError",
    "BrokerStatus",
    "LocalBroker",
    "kafka_answers",
    "kernel_kill_lines",
]

_LOG4J2 = Path(__file__).parent / "kafka" / "log4j2.properties"
_HOST = "127.0.0.1"
_LOG_TAIL = 30


@dataclass(frozen=True)
class BrokerStatus:
    """What ``LocalBroker.status()`` found; ``pid`` is None when not running."""

    running: bool
    pid: int | None
    bootstrap: str
    kafka_version: str
    log_path: Path


class LocalBroker:
    """One KRaft broker+controller (node 1) on 127.0.0.1, its state under ``home``.

    Every method is safe to call in any state and from several processes: a
    lock file in ``home`` serialises start and stop, and the pid file is only
    believed when ``/proc/<pid>/cmdline`` is ``kafka.Kafka`` with this home's
    ``server.properties``.
    """

    def __init__(
        self,
        home: Path,
        *,
        port: int = 9092,
        controller_port: int = 9093,
        heap: str = "512m",
        jars_dir: Path | None = None,
        secure: bool = False,
    ) -> None:
        if port == controller_port:
            raise ValueError(f"port and controller_port must differ (both {port})")
        if not re.fullmatch(r"\d+[kKmMgG]?", heap):
            raise ValueError(f"heap must look like 512m or 1g, got {heap!r}")
        # Absolute, so that the path in the JVM's cmdline identifies this home.
        self.home = Path(home).expanduser().resolve()
        self.port = port
        self.controller_port = controller_port
        self.heap = heap
        self.jars_dir = (
            Path(jars_dir).expanduser().resolve()
            if jars_dir is not None
            else self.home / f"kafka-{KAFKA_VERSION}" / "libs"
        )
        self.config_path = self.home / "server.properties"
        self.data_dir = self.home / "data"
        self.pid_path = self.home / "broker.pid"
        self.log_path = self.home / "broker.log"
        self._proc: subprocess.Popen[bytes] | None = None
        # SASL/SCRAM over TLS (lorastream.dev.secure): certificates and passwords in home/secure.
        self.secure = SecureFiles(self.home / "secure") if secure else None

    @property
    def bootstrap(self) -> str:
        """``"127.0.0.1:<port>"``, the address clients connect to."""
        return f"{_HOST}:{self.port}"

    def client_exports(self) -> str:
        """For a secure broker, the ``export KAFKA_...`` line that points clients at it."""
        if self.secure is None:
            raise ValueError("client_exports() is for a broker started with secure=True")
        return client_exports(self.secure, self.bootstrap)

    # ── jars ────────────────────────────────────────────────────────────────

    def ensure_jars(self) -> Path:
        """Return ``jars_dir`` holding the broker's runtime jars, running Maven if needed.

        The marker file names the pom's digest and is written only after a
        complete copy, so an interrupted download or a changed pom means a
        fresh copy; otherwise Maven is not run at all.
        """
        return fetch_kafka_jars(self.jars_dir, self.home / "mvn.log")

    # ── lifecycle ───────────────────────────────────────────────────────────

    def status(self) -> BrokerStatus:
        """Whether this home's broker process is alive (it may still be starting)."""
        pid = self._find_pid()
        return BrokerStatus(
            running=pid is not None,
            pid=pid,
            bootstrap=self.bootstrap,
            kafka_version=KAFKA_VERSION,
            log_path=self.log_path,
        )

    def start(self, timeout: float = 90.0) -> str:
        """Start the broker unless it runs, wait until it answers a Kafka request, return ``bootstrap``.

        Idempotent. Formats ``data/`` on the first start only. ``timeout``
        bounds the wait for the JVM to answer, not the one-off Maven download
        before it. Raises :class:`BrokerError` when a port is taken by another
        process, when Maven or the storage format fails, when the broker exits
        while starting, or when it does not answer within ``timeout`` seconds
        (it is then stopped, not left half-started).
        """
        self.home.mkdir(parents=True, exist_ok=True)
        with locked(self.home / ".lock"):
            pid = self._find_pid()
            if pid is None:
                self._check_ports_free()
                jars = self.ensure_jars()
                if self.secure is not None:
                    self.secure.sasl_password(
                        create=not (self.data_dir / "meta.properties").exists()
                    )
                    self.secure.make_certificates(_HOST)
                    self.secure.announce_key()  # made on the first secure start, then kept
                self._write_config()
                self._format(jars)
                pid = self._spawn(jars)
            else:
                self._check_running_port()
        self._wait_answering(pid, time.monotonic() + timeout, timeout)
        return self.bootstrap

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the broker cleanly (SIGTERM, then SIGKILL after ``timeout``); True if it was running."""
        self.home.mkdir(parents=True, exist_ok=True)
        with locked(self.home / ".lock"):
            pid = self._find_pid()
            if pid is None:
                self.pid_path.unlink(missing_ok=True)
                return False
            # SIGTERM runs Kafka's controlled shutdown, which flushes and closes the logs.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not self._wait_dead(pid, timeout):
                # Known by its pid file only (maybe another process's child); it leads its
                # own session, so its group is its pid.
                signal_pgid(pid, signal.SIGKILL)
                if not self._wait_dead(pid, 10.0):
                    raise BrokerError(
                        f"Kafka broker pid {pid} survived SIGKILL; see {self.log_path}"
                    )
            if self._proc is not None and self._proc.pid == pid:
                # It may have died between a poll and /proc saying "Z": reap the zombie.
                self._proc.wait(timeout=5)
            self.pid_path.unlink(missing_ok=True)
            self._proc = None
            return True

    # ── internals ───────────────────────────────────────────────────────────

    def _is_ours(self, pid: int) -> bool:
        if self._proc is not None and self._proc.pid == pid and self._proc.poll() is not None:
            return False
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):
            return False
        if state in ("Z", "X"):
            return False
        args = [a.decode(errors="replace") for a in argv]
        try:
            i = args.index("kafka.Kafka")
        except ValueError:
            return False
        return args[i + 1 : i + 2] == [str(self.config_path)]

    def _find_pid(self) -> int | None:
        text = read_stripped(self.pid_path)
        if text and text.isdigit() and self._is_ours(int(text)):
            return int(text)
        # A lost pid file must not make us start a second broker on the same data.
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and self._is_ours(int(entry.name)):
                return int(entry.name)
        return None

    def _check_ports_free(self) -> None:
        for what, port in (("listener", self.port), ("controller", self.controller_port)):
            with socket.socket() as sock:
                # Like the JVM's server socket, so TIME_WAIT leftovers don't count as taken.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((_HOST, port))
                except OSError as exc:
                    raise BrokerError(
                        f"cannot start Kafka: {what} port {_HOST}:{port} is taken by another "
                        f"process, not by the broker in {self.home} ({exc.strerror}); "
                        f"choose other ports or stop that process"
                    ) from None

    def _check_running_port(self) -> None:
        text = read_stripped(self.config_path) or ""
        match = re.search(r"^advertised\.listeners=([A-Z_]+)://[^:]+:(\d+)$", text, re.M)
        if match and (match.group(1) == "SASL_SSL") != (self.secure is not None):
            raise BrokerError(
                f"the broker in {self.home} already runs with a {match.group(1)} listener; "
                f"stop it first (log: {self.log_path})"
            )
        if match and int(match.group(2)) != self.port:
            raise BrokerError(
                f"the broker in {self.home} already runs on port {match.group(2)}, "
                f"not {self.port}; stop it first (log: {self.log_path})"
            )

    def _write_config(self) -> None:
        settings = {
            "process.roles": "broker,controller",
            "node.id": "1",
            # Static quorum: formats without --standalone on 3.9 and 4.x alike.
            "controller.quorum.voters": f"1@{_HOST}:{self.controller_port}",
            "listeners": f"PLAINTEXT://{_HOST}:{self.port},CONTROLLER://{_HOST}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{_HOST}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": "1",
            # One node: every internal topic must live with one replica, and
            # few partitions make the coordinators load fast on small machines.
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # lorastream creates its topics explicitly; a typo must not create one.
            "auto.create.topics.enable": "false",
        }
        if self.secure is not None:
            settings.update(self.secure.server_settings(_HOST, self.port, self.controller_port))
        body = "".join(f"{k}={v}\n" for k, v in settings.items())
        write_atomic(self.config_path, f"# written by lorastream.dev.broker\n{body}")
        if self.secure is not None:  # it holds the keystore and SCRAM passwords
            os.chmod(self.config_path, 0o600)

    def _java_cmd(self, jars: Path, *args: str) -> list[str]:
        java_home = os.environ.get("JAVA_HOME")
        java = (
            str(Path(java_home) / "bin" / "java")
            if java_home and (Path(java_home) / "bin" / "java").exists()
            else shutil.which("java")
        )
        if java is None:
            raise BrokerError("cannot start Kafka: no java on PATH (Kafka 4 needs Java 17+)")
        return [java, f"-Dlog4j2.configurationFile={_LOG4J2}", "-cp", f"{jars}/*", *args]

    def _format(self, jars: Path) -> None:
        if (self.data_dir / "meta.properties").exists():
            return
        cluster_file = self.home / "cluster.id"
        cluster_id = read_stripped(cluster_file)
        if not cluster_id:
            # A Kafka uuid is 22 url-safe base64 characters alone on its line.
            found = re.findall(r"^[A-Za-z0-9_-]{22}$", self._run_tool(jars, "random-uuid"), re.M)
            if not found:
                raise BrokerError(
                    f"Kafka StorageTool random-uuid printed no cluster id; see {self.log_path}"
                )
            cluster_id = found[-1]
            write_atomic(cluster_file, cluster_id + "\n")
        scram = ["--add-scram", self.secure.scram_argument()] if self.secure is not None else []
        self._run_tool(
            jars, "format", "-t", cluster_id, "-c", str(self.config_path), "--ignore-formatted",
            *scram,
        )  # fmt: skip

    def _run_tool(self, jars: Path, *args: str) -> str:
        cmd = self._java_cmd(jars, "kafka.tools.StorageTool", *args)
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=self.home)
        with self.log_path.open("a") as log:
            log.write(f"\n=== lorastream: StorageTool {' '.join(args)} ===\n")
            log.write(done.stdout + done.stderr)
        if done.returncode != 0:
            raise BrokerError(
                f"Kafka StorageTool {args[0]} failed with exit {done.returncode} in {self.home} "
                f"(log: {self.log_path}):\n{tail_text(done.stdout + done.stderr, _LOG_TAIL)}"
            )
        return done.stdout

    def _spawn(self, jars: Path) -> int:
        cmd = self._java_cmd(
            jars,
            "kafka.Kafka",
            str(self.config_path),
        )
        cmd[1:1] = [f"-Xmx{self.heap}", f"-Xms{self.heap}", "-Djava.awt.headless=true"]
        with self.log_path.open("ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"\n=== lorastream: starting Kafka {KAFKA_VERSION} at {stamp} ===\n".encode())
        # A new session: Ctrl-C in the starting terminal must not reach the broker.
        self._proc = start_group(cmd, log=self.log_path, cwd=self.home)
        write_atomic(self.pid_path, f"{self._proc.pid}\n")
        return self._proc.pid

    def _wait_answering(self, pid: int, deadline: float, timeout: float) -> None:
        while True:
            if not self._is_ours(pid):
                code = None
                if self._proc is not None and self._proc.pid == pid:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        code = self._proc.wait(timeout=5)
                self.pid_path.unlink(missing_ok=True)
                kernel = kernel_kill_lines(pid) if code is None or code < 0 else []
                said = "".join(f"\nthe kernel's log: {line}" for line in kernel)
                raise BrokerError(
                    f"Kafka broker (pid {pid}) exited while starting{_how(code)};{said}\n"
                    f"last lines of {self.log_path}:\n{self._log_tail()}"
                )
            context = client_ssl_context(self.secure) if self.secure is not None else None
            if answers_api_versions(_HOST, self.port, timeout=2.0, ssl_context=context):
                return
            if time.monotonic() >= deadline:
                tail = self._log_tail()
                self.stop()
                raise BrokerError(
                    f"Kafka broker (pid {pid}) did not answer on {self.bootstrap} within "
                    f"{timeout:g}s and was stopped; last lines of {self.log_path}:\n{tail}"
                )
            time.sleep(0.25)

    def _wait_dead(self, pid: int, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._proc is not None and self._proc.pid == pid:
                # Our own child: reap it, or it lingers as a zombie that looks alive.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=0.1)
            if not self._is_ours(pid):
                return True
            time.sleep(0.1)
        return not self._is_ours(pid)

    def _log_tail(self) -> str:
        try:
            return tail_text(self.log_path.read_text(errors="replace"), _LOG_TAIL)
        except OSError:
            return "(no log)"


def kernel_kill_lines(pid: int, dmesg: str | None = None) -> list[str]:
    """The kernel log's lines that say it killed ``pid`` (the out-of-memory killer's), where
    that log can be read (``dmesg``; often it cannot without privileges): a broker whose log
    just stops was killed, and these say by whom."""
    if dmesg is None:
        try:
            dmesg = subprocess.run(
                ["dmesg"], capture_output=True, text=True, timeout=5, check=False
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return []
    victim = re.compile(rf"((Killed|reaped) process {pid}\b|[,: ]pid={pid}[,\s])")
    return [line.strip() for line in dmesg.splitlines() if victim.search(line)]


def _how(code: int | None) -> str:
    """How a broker process ended, for the error that says it did: a signal is named,
    since a log that just stops means the broker was killed, not that it failed."""
    if code is None:
        return " (it was still exiting 5 s later)"
    if code >= 0:
        return f" with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    if -code == signal.SIGKILL:
        return f", killed by {name} (the kernel's out-of-memory killer, or kill -9)"
    return f", killed by {name}"
