"""TLS flags: both halves of a pair, https only with a certificate, and one clear line for a
file that cannot serve, before anything listens."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from paddler.cli import cli
from tests.support.tls import make_pki


def balancer(*arguments: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["balancer", *arguments])
    return result.exit_code, result.output


@pytest.mark.parametrize("port", ["reverseproxy", "management"])
def test_a_certificate_without_its_key_is_refused(port: str, tmp_path: Path) -> None:
    """Half a pair is a usage error that names both flags."""
    pki = make_pki(tmp_path)
    code, output = balancer(f"--{port}-tls-cert={pki.cert_file}")
    assert code == 2
    assert f"--{port}-tls-cert and --{port}-tls-key go together" in output


@pytest.mark.parametrize("port", ["reverseproxy", "management"])
def test_the_https_scheme_needs_a_certificate(port: str) -> None:
    """--X-scheme https alone would promise TLS that the port does not speak."""
    code, output = balancer(f"--{port}-scheme=https")
    assert code == 2
    assert f"--{port}-scheme https needs --{port}-tls-cert" in output


def test_a_key_of_another_certificate_is_refused_in_one_line(tmp_path: Path) -> None:
    """A mismatched key names both files; no traceback."""
    first, second = make_pki(tmp_path, "first"), make_pki(tmp_path, "second")
    code, output = balancer(
        f"--reverseproxy-tls-cert={first.cert_file}", f"--reverseproxy-tls-key={second.key_file}"
    )
    assert code == 1
    assert output.strip() == (
        f"Error: --reverseproxy-tls-key {second.key_file} is not the private key of the "
        f"certificate in --reverseproxy-tls-cert {first.cert_file}"
    )


def test_a_file_that_is_not_a_certificate_is_refused_in_one_line(tmp_path: Path) -> None:
    """The CA's key given as the certificate, say."""
    pki = make_pki(tmp_path)
    code, output = balancer(
        f"--management-tls-cert={pki.key_file}", f"--management-tls-key={pki.key_file}"
    )
    assert code == 1
    assert output.strip() == f"Error: --management-tls-cert {pki.key_file}: not a PEM certificate"


def test_a_missing_certificate_file_is_refused(tmp_path: Path) -> None:
    """click names the flag and the path."""
    code, output = balancer(
        f"--reverseproxy-tls-cert={tmp_path / 'none.pem'}",
        f"--reverseproxy-tls-key={tmp_path / 'none.key'}",
    )
    assert code == 2
    assert "--reverseproxy-tls-cert" in output and "does not exist" in output


def test_a_malformed_keys_file_stops_the_balancer_before_it_listens(tmp_path: Path) -> None:
    """The file and the line are named, the key is not."""
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("fine-key\nsecret with spaces\n")
    code, output = balancer(f"--api-keys-file={keys_file}")
    assert code == 1
    assert f"{keys_file} line 2" in output
    assert "secret" not in output.replace(str(tmp_path), "")


@pytest.mark.parametrize("command", ["agent", "dashboard"])
def test_a_ca_file_needs_the_https_scheme(command: str, tmp_path: Path) -> None:
    """Without https there is no certificate to verify: the CA file would be ignored."""
    pki = make_pki(tmp_path)
    result = CliRunner().invoke(cli, [command, f"--management-ca-file={pki.ca_file}"])
    assert result.exit_code == 2
    assert "--management-ca-file needs --management-scheme https" in result.output
