"""``lorastream s3 start|status|stop``: a local S3Proxy that outlives the command, and the
exports that point lorastream at it (#22).

Each test has its own ``LORASTREAM_HOME`` and a free port, so it shares nothing with
another test; S3Proxy's jar is the one the ``s3`` fixture uses (fetched once).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lorastream.dev.ports import free_port
from lorastream.dev.workers import LORASTREAM
from lorastream.settings import default_home

pytestmark = pytest.mark.integration  # a real S3Proxy (Java, its jar from Maven)


def _run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LORASTREAM, "s3", *args],
        env={**os.environ, "LORASTREAM_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=600,  # the first start on a machine fetches the jar
    )


def _exports(stdout: str) -> dict[str, str]:
    line = next(line for line in stdout.splitlines() if line.startswith("export "))
    return dict(word.split("=", 1) for word in shlex.split(line.removeprefix("export ")))


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# Put and get an object with the exports alone, as the adapter store opens its bucket.
_ROUND_TRIP = """
import os, obstore
from obstore.store import from_url
store = from_url(os.environ["LORASTREAM_ADAPTER_DIR"])
obstore.put(store, "probe/hello.txt", b"hello")
print(bytes(obstore.get(store, "probe/hello.txt").bytes()).decode())
"""


@pytest.fixture
def home(tmp_path: Path) -> Path:
    jars = default_home() / "s3proxy"
    jars.mkdir(parents=True, exist_ok=True)
    (tmp_path / "s3proxy").symlink_to(jars)
    return tmp_path


def test_s3_start_outlives_the_command_prints_working_exports_and_stop_ends_it(
    home: Path,
) -> None:
    port = free_port()
    started = _run(home, "start", "--port", str(port))
    assert started.returncode == 0, started.stderr
    exports = _exports(started.stdout)
    assert exports["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{port}"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        assert exports[name], name
    assert exports["LORASTREAM_ADAPTER_DIR"].startswith("s3://")
    try:
        # The command has exited; the server still answers, with the exports alone.
        clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        used = subprocess.run(
            [sys.executable, "-c", _ROUND_TRIP],
            env={**clean, **exports},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert used.returncode == 0 and used.stdout.strip() == "hello", used.stderr

        status = _run(home, "status")
        assert status.returncode == 0, status.stderr
        assert f"http://127.0.0.1:{port}" in status.stdout
        pid = int(status.stdout.split("pid ", 1)[1].split()[0])
        assert _alive(pid)

        again = _run(home, "start")  # another port asked, the running one kept
        assert again.returncode == 0, again.stderr
        assert _exports(again.stdout)["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{port}"
        assert f"pid {pid} " in _run(home, "status").stdout
    finally:
        stopped = _run(home, "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stderr, stopped.stderr
    assert not _alive(pid)
    after = _run(home, "status")
    assert after.returncode == 1 and "not running" in after.stdout
    assert "not running" in _run(home, "stop").stderr


def test_s3_start_on_a_taken_port_is_one_line_naming_it(home: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _run(home, "start", "--port", str(port))
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert f"127.0.0.1:{port}" in done.stderr and "--port" in done.stderr
    assert _run(home, "status").returncode == 1


def test_s3_start_refuses_a_bucket_name_that_would_leave_its_data(home: Path) -> None:
    done = _run(home, "start", "--bucket", "../elsewhere", "--port", str(free_port()))
    assert done.returncode == 2
    assert "bucket name" in done.stderr
    assert not (home / "s3" / "elsewhere").exists()
