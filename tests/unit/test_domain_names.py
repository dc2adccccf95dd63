"""Domain names from xenstore are shown, never trusted: printable and bounded."""

from __future__ import annotations

import pytest

from pcibackd.daemon.names import MAX_NAME, clean_name, domain_name


@pytest.mark.parametrize("untrusted,shown", [
    ("web-1", "web-1"), (None, ""), ("", ""), ("a b", "a?b"), ("x\n\x1b[31m", "x??[31m"),
    ("é", "?"), ("n" * 500, "n" * MAX_NAME), (5, ""),
])
def test_clean_name(untrusted, shown):
    assert clean_name(untrusted) == shown


class FakeXs:
    def __init__(self, value=None, exc=None):
        self.value, self.exc, self.paths = value, exc, []

    def read(self, path):
        self.paths.append(path)
        if self.exc:
            raise self.exc
        return self.value


def test_domain_name_reads_the_toolstack_node():
    xs = FakeXs("db")
    assert domain_name(xs, 7) == "db" and xs.paths == ["/local/domain/7/name"]
    assert domain_name(FakeXs(exc=PermissionError(13, "denied")), 7) == ""
    assert domain_name(FakeXs(None), 7) == ""
