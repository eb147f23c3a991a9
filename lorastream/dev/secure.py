"""The secure mode of the local broker: SASL/SCRAM-SHA-512 over TLS.

Everything lives in ``<broker home>/secure/``:

``ca.pem``
    The certificate of a CA made for this broker; the file clients name in
    ``KAFKA_SSL_CAFILE``.
``server.p12``
    The broker's PKCS12 keystore: an EC key and its certificate for
    ``127.0.0.1`` and ``localhost``, signed by the CA.
``truststore.p12``
    The CA alone, which the broker trusts when it connects to itself
    (inter-broker traffic, e.g. transaction markers, runs on the same
    SASL_SSL listener).
``store.password``, ``sasl.password``
    Generated passwords (mode 0600): the keystores', and that of the SCRAM
    user ``lorastream``, which ``kafka-storage format --add-scram`` writes into
    the cluster's metadata when the data directory is first formatted.
``announce.key``
    The key that announcements are signed with (``LORASTREAM_ANNOUNCE_KEY``, mode
    0600): made on the first secure start and kept, so a secure set-up signs and
    checks every announcement (:mod:`trainer.signing`).

The CA and the server certificate are made anew, with the JDK's ``keytool``
(Kafka needs a JDK anyway), each time the broker starts; the SCRAM password is
made once, with the data directory, and kept.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

from lorastream.dev.errors import BrokerError
from lorastream.dev.files import read_stripped

__all__ = [
    "MECHANISM",
    "USERNAME",
    "SecureFiles",
    "client_exports",
    "client_ssl_context",
]

MECHANISM = "SCRAM-SHA-512"
USERNAME = "lorastream"
_LISTENER = "SASL_SSL"
_VALID_DAYS = 825  # the longest validity TLS clients accept for a leaf certificate


@dataclass(frozen=True)
class SecureFiles:
    """Where the secure broker's certificates and passwords live (``<home>/secure``)."""

    dir: Path

    @property
    def ca_pem(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def keystore(self) -> Path:
        return self.dir / "server.p12"

    @property
    def truststore(self) -> Path:
        return self.dir / "truststore.p12"

    @property
    def store_password_file(self) -> Path:
        return self.dir / "store.password"

    @property
    def sasl_password_file(self) -> Path:
        return self.dir / "sasl.password"

    @property
    def announce_key_file(self) -> Path:
        return self.dir / "announce.key"

    def announce_key(self) -> str:
        """The announcement signing key; made (64 hex characters, written 0600) if missing.
        It outlives restarts: versions signed with it stay readable."""
        text = read_stripped(self.announce_key_file)
        if text:
            return text
        key = secrets.token_hex(32)
        _write_secret(self.announce_key_file, key)
        return key

    def sasl_password(self, *, create: bool = False) -> str:
        """The SCRAM user's password; made (and written 0600) when ``create`` and missing."""
        text = read_stripped(self.sasl_password_file)
        if text:
            return text
        if not create:
            raise BrokerError(
                f"the secure broker's SASL password file {self.sasl_password_file} is missing; "
                f"its data was formatted without it: remove {self.dir.parent} to start afresh"
            )
        password = secrets.token_hex(24)
        _write_secret(self.sasl_password_file, password)
        return password

    def scram_argument(self) -> str:
        """The ``--add-scram`` value for ``kafka-storage format``."""
        return f"{MECHANISM}=[name={USERNAME},password={self.sasl_password(create=True)}]"

    def make_certificates(self, host: str) -> None:
        """A fresh CA and server certificate (for ``host`` and localhost) and both keystores."""
        keytool = _keytool()
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        password = read_stripped(self.store_password_file)
        if not password:
            password = secrets.token_hex(16)
            _write_secret(self.store_password_file, password)
        work = self.dir / "work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(mode=0o700)
        ca_store, csr, cert = work / "ca.p12", work / "server.csr", work / "server.pem"
        keystore, truststore, ca_pem = work / "server.p12", work / "truststore.p12", work / "ca.pem"
        store = ["-storetype", "PKCS12", "-storepass", password]
        key = ["-keyalg", "EC", "-groupname", "secp256r1", "-validity", str(_VALID_DAYS)]
        san = f"SAN=ip:{host},dns:localhost" + (",ip:127.0.0.1" if host != "127.0.0.1" else "")
        steps = [
            ["-genkeypair", "-alias", "ca", *key, "-dname", "CN=lorastream local CA",
             "-ext", "bc:c", "-keystore", str(ca_store), *store],
            ["-exportcert", "-rfc", "-alias", "ca", "-file", str(ca_pem),
             "-keystore", str(ca_store), *store],
            ["-genkeypair", "-alias", "server", *key, "-dname", "CN=localhost",
             "-keystore", str(keystore), *store],
            ["-certreq", "-alias", "server", "-file", str(csr), "-keystore", str(keystore), *store],
            ["-gencert", "-rfc", "-alias", "ca", "-infile", str(csr), "-outfile", str(cert),
             "-ext", san, "-ext", "eku=serverAuth,clientAuth", "-validity", str(_VALID_DAYS),
             "-keystore", str(ca_store), *store],
            ["-importcert", "-noprompt", "-alias", "ca", "-file", str(ca_pem),
             "-keystore", str(keystore), *store],
            ["-importcert", "-noprompt", "-alias", "server", "-file", str(cert),
             "-keystore", str(keystore), *store],
            ["-importcert", "-noprompt", "-alias", "ca", "-file", str(ca_pem),
             "-keystore", str(truststore), *store],
        ]  # fmt: skip
        for args in steps:
            done = subprocess.run(
                [keytool, *args], capture_output=True, text=True, check=False, cwd=work
            )
            if done.returncode != 0:
                raise BrokerError(
                    f"keytool {args[0]} failed with exit {done.returncode}: "
                    f"{(done.stdout + done.stderr).strip()}"
                )
        for made, final in ((keystore, self.keystore), (truststore, self.truststore)):
            os.chmod(made, 0o600)
            made.replace(final)
        # The CA certificate is public: clients read it.
        os.chmod(ca_pem, 0o644)
        ca_pem.replace(self.ca_pem)
        shutil.rmtree(work, ignore_errors=True)

    def server_settings(self, host: str, port: int, controller_port: int) -> dict[str, str]:
        """The listener and security lines of ``server.properties`` for the secure broker."""
        password = read_stripped(self.store_password_file) or ""
        jaas = (
            "org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="{USERNAME}" password="{self.sasl_password()}";'
        )
        prefix = f"listener.name.{_LISTENER.lower()}"
        return {
            "listeners": f"{_LISTENER}://{host}:{port},CONTROLLER://{host}:{controller_port}",
            "advertised.listeners": f"{_LISTENER}://{host}:{port}",
            "listener.security.protocol.map": f"CONTROLLER:PLAINTEXT,{_LISTENER}:{_LISTENER}",
            # The broker talks to itself (transaction markers) as the same SCRAM user.
            "inter.broker.listener.name": _LISTENER,
            "sasl.enabled.mechanisms": MECHANISM,
            "sasl.mechanism.inter.broker.protocol": MECHANISM,
            f"{prefix}.{MECHANISM.lower()}.sasl.jaas.config": jaas,
            "ssl.keystore.type": "PKCS12",
            "ssl.keystore.location": str(self.keystore),
            "ssl.keystore.password": password,
            "ssl.key.password": password,
            "ssl.truststore.type": "PKCS12",
            "ssl.truststore.location": str(self.truststore),
            "ssl.truststore.password": password,
            "ssl.client.auth": "none",
        }


def client_ssl_context(files: SecureFiles) -> ssl.SSLContext:
    """A client TLS context that trusts the broker's CA (and checks the host name)."""
    return ssl.create_default_context(cafile=str(files.ca_pem))


def client_exports(files: SecureFiles, bootstrap: str) -> str:
    """The ``export`` line a user pastes to point every command at the secure broker (and
    to sign and check announcements with its key)."""
    values = {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_SECURITY_PROTOCOL": _LISTENER,
        "KAFKA_SASL_MECHANISM": MECHANISM,
        "KAFKA_SASL_USERNAME": USERNAME,
        "KAFKA_SASL_PASSWORD": files.sasl_password(),
        "KAFKA_SSL_CAFILE": str(files.ca_pem),
        "LORASTREAM_ANNOUNCE_KEY": files.announce_key(),
    }
    return "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in values.items())


def _keytool() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "keytool").exists():
        return str(Path(java_home) / "bin" / "keytool")
    found = shutil.which("keytool")
    if found is None:
        raise BrokerError("cannot make the secure broker's certificates: no keytool (JDK) on PATH")
    return found


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text + "\n")
    tmp.replace(path)
