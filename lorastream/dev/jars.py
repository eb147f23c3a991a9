"""The local broker's jars: the Kafka version that ``kafka/pom.xml`` declares, and the one
fetch of its runtime dependencies from Maven Central (:mod:`lorastream.dev.maven`)."""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from pathlib import Path

from lorastream.dev import maven
from lorastream.dev.errors import BrokerError
from lorastream.dev.files import tail_text

__all__ = ["KAFKA_VERSION", "POM", "fetch_kafka_jars"]

POM = Path(__file__).parent / "kafka" / "pom.xml"


def _pom_kafka_version(pom: Path) -> str:
    root = ET.parse(pom).getroot()
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    node = root.find("m:properties/m:kafka.version", ns)
    if node is None or not (node.text or "").strip():
        raise RuntimeError(f"{pom} has no <kafka.version> property")
    return (node.text or "").strip()


KAFKA_VERSION: str = _pom_kafka_version(POM)
"""The ``<kafka.version>`` of the pom: the broker that runs, and what ``status`` says."""


def fetch_kafka_jars(jars_dir: Path, mvn_log: Path) -> Path:
    """``jars_dir`` holding the broker's runtime jars, running Maven if needed.

    The marker file names the pom's digest and is written only after a complete copy, so
    an interrupted download or a changed pom means a fresh copy; otherwise Maven is not
    run at all. Maven's output goes to ``mvn_log``.
    """
    try:
        return maven.fetch(
            jars_dir,
            ["dependency:copy-dependencies", "-DincludeScope=runtime"],
            pom=POM,
            stamp=_pom_digest(),
            expect="kafka_2.13-*.jar",
            what="assemble Kafka",
            log=mvn_log,
        )
    except maven.MavenFailed as exc:
        raise BrokerError(
            f"cannot assemble Kafka {KAFKA_VERSION}: mvn exited {exc.returncode} "
            f"(full output in {mvn_log}):\n{tail_text(exc.output, 40)}"
        ) from None


def _pom_digest() -> str:
    return f"kafka {KAFKA_VERSION} pom sha256 {hashlib.sha256(POM.read_bytes()).hexdigest()}"
