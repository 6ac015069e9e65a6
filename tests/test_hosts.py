"""Host-header parsing shared by the labeling app and `rlhfkit serve` (rlhfkit/core/hosts.py): what is compared
with the allowed hosts, so a rebinding page's Host never matches a loopback name by accident."""

import pytest

from rlhfkit.core.hosts import host_name, normalise_hosts


@pytest.mark.parametrize("header, name", [
    ("127.0.0.1:8000", "127.0.0.1"), ("LocalHost", "localhost"), ("localhost.:80", "localhost"),
    ("[::1]:8000", "::1"), ("[::1]", "::1"), (" example.org ", "example.org"),
])
def test_host_name_reads_the_host_part(header, name):
    assert host_name(header) == name


@pytest.mark.parametrize("header", [None, "", "localhost:80x", "[::1", "[::1]x", "[::1]:", ":80"])
def test_host_name_refuses_a_malformed_header(header):
    assert host_name(header) is None


def test_normalise_hosts_writes_names_as_host_name_does():
    assert normalise_hosts(["LocalHost.", "[::1]", " ", "", None, "Example.org"]) == {"localhost", "::1", "example.org"}
