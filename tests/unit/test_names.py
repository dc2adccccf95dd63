"""Domain names (daemon/names.py): printable, and followed through renames with one watch per guest."""

from __future__ import annotations

from types import SimpleNamespace

from pcibackd.daemon.names import TOKEN, NameWatch, clean_name


class FakeXs:
    def __init__(self, names):
        self.names, self.watches, self.reads = names, set(), []

    def watch(self, path, token):
        if (path, token) in self.watches:
            raise OSError(17, "EEXIST")
        self.watches.add((path, token))

    def unwatch(self, path, token):
        self.watches.discard((path, token))

    def read(self, path):
        self.reads.append(path)
        return self.names.get(path)


def test_names_are_followed_through_renames_and_only_named_events_read():
    xs = FakeXs({"/local/domain/3/name": "web"})
    names = NameWatch(xs)
    guests = {3: SimpleNamespace(name=names.follow(3))}
    assert guests[3].name == "web" and xs.watches == {("/local/domain/3/name", TOKEN)}
    assert names.follow(3) == "web"                           # followed already: still answers
    xs.reads.clear()
    names.renamed([("/local/domain/3/name", TOKEN)], guests)      # the watch's registration event
    assert xs.reads == []                                         # (the name was read after registering)
    xs.names["/local/domain/3/name"] = "db"
    names.renamed([("/local/domain/3/name", TOKEN), ("/local/domain/0/backend/pci/3/0/state", "backends"),
                   ("/local/domain/4/name", TOKEN), ("/local/domain/3/name/x", TOKEN),
                   ("/local/domain/99999999/name", TOKEN)], guests)
    assert guests[3].name == "db"
    assert xs.reads == ["/local/domain/3/name"]               # not the unknown guest, not the odd paths
    names.forget(3)
    assert xs.watches == set()


def test_names_are_printable():
    assert clean_name("web 1\x07") == "web?1?" and clean_name(None) == "" and len(clean_name("x" * 100)) == 64
