"""A real S3-compatible server for tests and trials: S3Proxy, from Maven Central.

``LocalS3(home)`` fetches ``org.gaul:s3proxy`` (the ``jar-with-dependencies``)
once with Maven, as the broker's jars are fetched, and runs it on the JDK that
runs the broker, with a filesystem backend under ``home/data`` and one
identity and credential. A bucket is a directory of the backend:
:meth:`LocalS3.bucket` makes one. :meth:`LocalS3.environment` gives the AWS_*
variables that point a client (lorastream's adapter store, obstore, boto3) at
it. Requests are signed (AWS v2 or v4), as on S3.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from lorastream.dev import maven
from lorastream.dev.errors import BrokerError
from lorastream.dev.ports import free_port
from lorastream.dev.process import start_group, stop_group

__all__ = ["S3PROXY_VERSION", "LocalS3"]

S3PROXY_VERSION = "2.6.0"
_ARTIFACT = f"org.gaul:s3proxy:{S3PROXY_VERSION}:jar:jar-with-dependencies"
_JAR = f"s3proxy-{S3PROXY_VERSION}-jar-with-dependencies.jar"
_HOST = "127.0.0.1"
IDENTITY = "lorastream"
CREDENTIAL = "lorastream-secret"


class LocalS3:
    """One S3Proxy on 127.0.0.1, its jar and data under ``home``."""

    def __init__(self, home: Path, port: int | None = None, jars: Path | None = None) -> None:
        self.home = Path(home).resolve()
        self.port = port or free_port()
        self.jars = Path(jars) if jars is not None else self.home / "jars"
        self.data = self.home / "data"
        self.log_path = self.home / "s3proxy.log"
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
        """Start it and wait until it answers; the endpoint URL."""
        jar = self.ensure_jar()
        self.data.mkdir(parents=True, exist_ok=True)
        config = self.home / "s3proxy.conf"
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

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s; nothing if it does not run."""
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_group(proc, timeout=15)
