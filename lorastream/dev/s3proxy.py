"""A real S3-compatible server for tests and trials: S3Proxy, from Maven Central.

``LocalS3(home)`` fetches ``org.gaul:s3proxy`` (the ``jar-with-dependencies``)
once with Maven, as the broker's jars are fetched, and runs it on the JDK that
runs the broker, with a filesystem backend under ``home/data`` and one
identity and credential. A bucket is a directory of the backend:
:meth:`LocalS3.bucket` makes one. :meth:`LocalS3.environment` gives the AWS_*
variables that point a client (lorastream's adapter store, obstore, boto3) at
it. Requests are signed (AWS v2 or v4), as on S3.

The tests run one for their session; ``lorastream s3 start`` runs one that
outlives the command, known by ``home/s3proxy.pid`` (believed only while that
pid is a java process reading this home's ``s3proxy.conf``, as the broker's pid
file is), so that ``s3 status`` and ``s3 stop`` find it later.
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from lorastream.dev import maven
from lorastream.dev.errors import BrokerError
from lorastream.dev.ports import free_port
from lorastream.dev.process import signal_pgid, start_group, stop_group

__all__ = ["S3PROXY_VERSION", "LocalS3", "S3Status"]

S3PROXY_VERSION = "2.6.0"
_ARTIFACT = f"org.gaul:s3proxy:{S3PROXY_VERSION}:jar:jar-with-dependencies"
_JAR = f"s3proxy-{S3PROXY_VERSION}-jar-with-dependencies.jar"
_HOST = "127.0.0.1"
IDENTITY = "lorastream"
CREDENTIAL = "lorastream-secret"


@dataclass(frozen=True)
class S3Status:
    """What :meth:`LocalS3.status` found; ``pid`` is None when it does not run."""

    pid: int | None
    endpoint: str
    data: Path
    log_path: Path


class LocalS3:
    """One S3Proxy on 127.0.0.1, its jar and data under ``home``."""

    def __init__(self, home: Path, port: int | None = None, jars: Path | None = None) -> None:
        self.home = Path(home).resolve()
        self.port = port or free_port()
        self.jars = Path(jars) if jars is not None else self.home / "jars"
        self.data = self.home / "data"
        self.log_path = self.home / "s3proxy.log"
        self.config_path = self.home / "s3proxy.conf"
        self.pid_path = self.home / "s3proxy.pid"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{_HOST}:{self.port}"

    def environment(self) -> dict[str, str]:
        """The AWS_* variables that point a client at this server."""
        return {
            "AWS_ACCESS_KEY_ID": IDENTITY,
            "AWS_SECRET_ACCESS_KEY": CREDENTIAL,
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
        }

    def client_exports(self, adapter_dir: str) -> str:
        """The ``export`` line a user pastes to keep adapters in this server, at
        ``adapter_dir`` (an ``s3://`` URL); AWS_DEFAULT_REGION too, for other clients."""
        values = {
            **self.environment(),
            "AWS_DEFAULT_REGION": "us-east-1",
            "LORASTREAM_ADAPTER_DIR": adapter_dir,
        }
        return "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in values.items())

    def ensure_jar(self) -> Path:
        """The jar under ``jars``, fetched with Maven (once, locked and staged) if missing."""
        jar = self.jars / _JAR
        if jar.is_file():
            return jar
        try:
            maven.fetch(
                self.jars,
                ["-q", "dependency:copy", f"-Dartifact={_ARTIFACT}"],
                stamp=_ARTIFACT,
                expect=_JAR,
                what="fetch S3Proxy",
                timeout=600,
            )
        except maven.MavenFailed as exc:
            tail = "\n".join(exc.output.splitlines()[-20:])
            raise BrokerError(
                f"cannot fetch {_ARTIFACT} with Maven (exit {exc.returncode}):\n{tail}"
            ) from None
        return jar

    def start(self, timeout: float = 60.0) -> str:
        """Start it and wait until it answers; the endpoint URL. One that runs already
        from this home (``s3 start`` twice) is left running, on the port it has."""
        running = self.running_pid()
        if running is not None:
            self.port = self._configured_port() or self.port
            return self.endpoint
        self._check_port_free()
        jar = self.ensure_jar()
        self.data.mkdir(parents=True, exist_ok=True)
        config = self.config_path
        config.write_text(
            "\n".join(
                [
                    f"s3proxy.endpoint={self.endpoint}",
                    "s3proxy.authorization=aws-v2-or-v4",
                    f"s3proxy.identity={IDENTITY}",
                    f"s3proxy.credential={CREDENTIAL}",
                    "jclouds.provider=filesystem",
                    f"jclouds.filesystem.basedir={self.data}",
                ]
            )
            + "\n"
        )
        java = shutil.which("java") or "java"
        self._proc = start_group(
            [java, "-Xmx256m", "-jar", str(jar), "--properties", str(config)], log=self.log_path
        )
        self.pid_path.write_text(f"{self._proc.pid}\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(
                    f"S3Proxy exited with {self._proc.returncode}; see {self.log_path}"
                )
            try:
                with socket.create_connection((_HOST, self.port), timeout=0.5):
                    return self.endpoint
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise BrokerError(f"S3Proxy did not answer at {self.endpoint} in {timeout:.0f}s")

    def bucket(self, name: str) -> str:
        """Make the bucket ``name`` (a directory of the filesystem backend); its s3:// URL."""
        (self.data / name).mkdir(parents=True, exist_ok=True)
        return f"s3://{name}"

    def stop(self) -> bool:
        """SIGTERM, then SIGKILL after 15 s; True if it ran. It may have been started by
        another process (``s3 start``): then it is found by its pid file."""
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_group(proc, timeout=15)
            self.pid_path.unlink(missing_ok=True)
            return True
        pid = self.running_pid()
        if pid is None:
            self.pid_path.unlink(missing_ok=True)
            return False
        signal_pgid(pid, signal.SIGTERM)  # it leads its own session: its group is its pid
        if not self._wait_dead(pid, 15.0):
            signal_pgid(pid, signal.SIGKILL)
            if not self._wait_dead(pid, 10.0):
                raise BrokerError(f"S3Proxy pid {pid} survived SIGKILL; see {self.log_path}")
        self.pid_path.unlink(missing_ok=True)
        return True

    def status(self) -> S3Status:
        """Whether this home's S3Proxy runs, and where."""
        pid = self.running_pid()
        if pid is not None:
            self.port = self._configured_port() or self.port
        return S3Status(pid=pid, endpoint=self.endpoint, data=self.data, log_path=self.log_path)

    def running_pid(self) -> int | None:
        """The pid in the pid file, if that process is this home's S3Proxy (a pid file
        left by a crash may name another process by now)."""
        try:
            text = self.pid_path.read_text().strip()
        except OSError:
            return None
        if not text.isdigit():
            return None
        pid = int(text)
        return pid if self._is_ours(pid) else None

    def _is_ours(self, pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):
            return False
        return state not in ("Z", "X") and str(self.config_path).encode() in argv

    def _wait_dead(self, pid: int, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self._is_ours(pid):
                return True
            time.sleep(0.1)
        return not self._is_ours(pid)

    def _configured_port(self) -> int | None:
        """The port the running server was started on, from its configuration."""
        with contextlib.suppress(OSError, ValueError):
            for line in self.config_path.read_text().splitlines():
                if line.startswith("s3proxy.endpoint="):
                    return int(line.rsplit(":", 1)[1])
        return None

    def _check_port_free(self) -> None:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((_HOST, self.port))
            except OSError as exc:
                raise BrokerError(
                    f"cannot start S3Proxy: port {_HOST}:{self.port} is taken by another "
                    f"process ({exc.strerror}); choose another with --port"
                ) from None
