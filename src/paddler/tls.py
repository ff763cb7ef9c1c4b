"""TLS contexts: the balancer's two ports (servers), and the agent and dashboard (clients).

Both come from the standard library's ``ssl.create_default_context``, which sets the protocol
floor (TLS 1.2) and the cipher list of the Python build; nothing is tuned by hand. A client
verifies the balancer's certificate and host name against ``--management-ca-file``, or against
the system's store without one.

Every problem with the files is a ``TlsError`` of one line that names the flag and the file.
"""

from __future__ import annotations

import ssl
from pathlib import Path


class TlsError(ValueError):
    """A certificate, key or CA file that cannot be used; the message says which and why."""


def _readable(path: Path, flag: str) -> str:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError as error:
        raise TlsError(f"{flag} {path}: cannot read it: {error.strerror or error}") from None


def server_context(cert: Path, key: Path, *, flags: str) -> ssl.SSLContext:
    """A server context for ``cert`` (PEM, with its chain) and its private ``key`` (PEM).

    ``flags`` names the pair in errors, e.g. ``--reverseproxy-tls``.
    """
    cert_flag, key_flag = f"{flags}-cert", f"{flags}-key"
    if "-----BEGIN CERTIFICATE-----" not in _readable(cert, cert_flag):
        raise TlsError(f"{cert_flag} {cert}: not a PEM certificate")
    if "PRIVATE KEY-----" not in _readable(key, key_flag):
        raise TlsError(f"{key_flag} {key}: not a PEM private key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            raise TlsError(
                f"{key_flag} {key} is not the private key of the certificate in {cert_flag} {cert}"
            ) from None
        raise TlsError(f"{cert_flag} {cert} / {key_flag} {key}: {error.reason or error}") from None
    return context


def client_context(ca_file: Path | None, *, flag: str = "--management-ca-file") -> ssl.SSLContext:
    """A client context that trusts ``ca_file`` (PEM), or the system's store if None."""
    if ca_file is None:
        return ssl.create_default_context()
    if "-----BEGIN CERTIFICATE-----" not in _readable(ca_file, flag):
        raise TlsError(f"{flag} {ca_file}: not a PEM certificate")
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except ssl.SSLError as error:
        raise TlsError(f"{flag} {ca_file}: {error.reason or error}") from None
