"""Host flags that name a lookup instead of an address.

``aws:metadata:local-ipv4`` resolves to the instance's private IPv4 address, read from the EC2
instance metadata service (IMDSv2: a session token first, then the value), as the original
Paddler allowed for every host flag. Resolution happens once, at start-up, in the CLI.
"""

from __future__ import annotations

import urllib.error
import urllib.request

AWS_LOCAL_IPV4 = "aws:metadata:local-ipv4"
AWS_METADATA_URL = "http://169.254.169.254"
_TIMEOUT = 2.0


class HostResolutionError(Exception):
    """A host lookup that could not be answered."""


def resolve_host(host: str, metadata_url: str = AWS_METADATA_URL) -> str:
    if host != AWS_LOCAL_IPV4:
        return host
    try:
        token_request = urllib.request.Request(
            f"{metadata_url}/latest/api/token",
            method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"},
        )
        with urllib.request.urlopen(token_request, timeout=_TIMEOUT) as response:
            token = str(response.read().decode()).strip()
        value_request = urllib.request.Request(
            f"{metadata_url}/latest/meta-data/local-ipv4",
            headers={"X-aws-ec2-metadata-token": token},
        )
        with urllib.request.urlopen(value_request, timeout=_TIMEOUT) as response:
            address = str(response.read().decode()).strip()
    except (urllib.error.URLError, OSError) as error:
        raise HostResolutionError(
            f"cannot resolve {AWS_LOCAL_IPV4}: the EC2 metadata service at {metadata_url} "
            f"did not answer ({error})"
        ) from None
    if not address:
        raise HostResolutionError(f"the EC2 metadata service returned no {AWS_LOCAL_IPV4}")
    return address
