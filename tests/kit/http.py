"""The HTTPS front: certificates, a real ``jobspool serve``, clients.

The server is the installed console script in a subprocess, on a free
loopback port, with a certificate chain the test made (a CA and a server
certificate for 127.0.0.1 and localhost); clients verify it against that CA.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.kit.process import COMMAND, DEADLINE, clean_environ, wait_for

# --- certificates ------------------------------------------------------------------


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """``ca.pem``, ``cert.pem`` (for 127.0.0.1 and localhost, signed by the CA), ``key.pem``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jobspool test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = (
        directory / "ca.pem",
        directory / "cert.pem",
        directory / "key.pem",
    )
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


def free_port() -> int:
    """A loopback port no one listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --- the server ----------------------------------------------------------------------


@dataclass
class Server:
    """A running ``jobspool -c CONFIG serve [ARGS]``; its stderr (the JSON log) in a file.

    ``env`` adds to :func:`~tests.kit.process.clean_environ` (a site's
    :meth:`~tests.kit.site.Site.env` will do).
    """

    config: Path
    port: int
    ca: Path | None
    env: dict[str, str]
    args: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    stderr: Path = field(init=False)

    def __post_init__(self) -> None:
        self.stderr = self.config.parent / f"serve-{self.port}.log"

    @property
    def url(self) -> str:
        return f"{'https' if self.ca else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> Server:
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                [*COMMAND, "-c", str(self.config), "serve", *self.args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env={**clean_environ(), **self.env},
            )
        proc = self.proc
        wait_for(lambda: proc.poll() is not None or self.listening(), "the server to listen")
        assert proc.poll() is None, self.stderr.read_text()
        return self

    def listening(self) -> bool:
        return any(line.get("event") == "listening" for line in self.log())

    def stop(self) -> int:
        """SIGTERM, and the exit status once it has stopped."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("the server did not stop on SIGTERM") from None

    def log(self) -> list[dict[str, Any]]:
        """Every JSON line the server wrote so far."""
        out = []
        for line in self.stderr.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": "not json", "line": line})
        return out

    def requests(self) -> list[dict[str, Any]]:
        return [line for line in self.log() if line.get("event") == "request"]

    def ssl_context(self) -> ssl.SSLContext:
        assert self.ca is not None
        return ssl.create_default_context(cafile=str(self.ca))

    def client(
        self, user: str | None = None, password: str | None = None, **kw: Any
    ) -> httpx.Client:
        auth = (user, password or "") if user is not None else None
        return httpx.Client(
            base_url=self.url,
            verify=self.ssl_context() if self.ca else False,
            auth=auth,
            timeout=DEADLINE,
            **kw,
        )

    def tls_socket(self) -> ssl.SSLSocket:
        """A raw TLS connection, for clients that misbehave."""
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=DEADLINE)
        return self.ssl_context().wrap_socket(raw, server_hostname="localhost")


def basic(user: str, password: str) -> str:
    """An ``Authorization`` header's value for HTTP basic authentication."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def read_response(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes (or ``limit`` seconds pass), and when."""
    start = time.monotonic()
    sock.settimeout(0.2)
    data = b""
    while time.monotonic() - start < limit:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ssl.SSLWantReadError):
            continue
        except (ConnectionError, ssl.SSLError):
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - start


def chunks(*parts: bytes) -> Iterator[bytes]:
    """A body with no Content-Length (chunked), for httpx."""
    yield from parts
