"""Test certificates: a CA of the test's own (``trustme``), and files for the balancer's flags."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class Pki:
    """A CA's certificate, and a server certificate and key it issued, as PEM files."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


def make_pki(
    directory: Path, name: str = "pki", hosts: tuple[str, ...] = ("127.0.0.1", "localhost")
) -> Pki:
    """A new CA, and a certificate it signed for ``hosts``, in ``directory/name``."""
    ca = trustme.CA()
    server = ca.issue_cert(*hosts)
    folder = directory / name
    folder.mkdir()
    paths = Pki(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    ca.cert_pem.write_to_path(str(paths.ca_file))
    server.private_key_pem.write_to_path(str(paths.key_file))
    with open(paths.cert_file, "wb") as file:
        for blob in server.cert_chain_pems:
            file.write(blob.bytes())
    return paths
