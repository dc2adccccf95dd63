"""Which watch events can change whether a backend is present (its ``frontend`` node)."""

from __future__ import annotations

from pcibackd.daemon.backends import CachedReads, presence_touched

ROOT = "/local/domain/0/backend/pci"


def test_only_the_directories_and_the_frontend_node_touch_presence():
    assert presence_touched([f"{ROOT}/5/0/state", f"{ROOT}/5/0/state-0", f"{ROOT}/5/0/num_devs",
                             f"{ROOT}/5/0/vdev-0", f"{ROOT}/5/0/root_num"]) == set()
    assert presence_touched([f"{ROOT}/5", f"{ROOT}/6/0", f"{ROOT}/7/0/frontend", f"{ROOT}/8/0/state"]) == {5, 6, 7}


def test_names_that_are_no_domid_and_other_trees_are_ignored():
    assert presence_touched([ROOT, f"{ROOT}/evil/0", f"{ROOT}/123456/0", "/local/domain/5/device/pci/0"]) == set()


class CountingXs:
    def __init__(self, nodes):
        self.nodes, self.reads = nodes, 0

    def read(self, path):
        self.reads += 1
        return self.nodes.get(path)


def test_cached_reads_read_again_only_what_an_event_named():
    be = f"{ROOT}/5/0"
    xs = CountingXs({f"{be}/num_devs": "1", f"{be}/dev-0": "0000:00:05.0", f"{be}/state-0": "1"})
    reads = CachedReads(xs)
    for key in ("num_devs", "dev-0", "state-0"):
        reads.read(f"{be}/{key}")
    xs.nodes[f"{be}/state-0"] = "3"
    reads.forget_nodes([f"{be}/state-0"])
    assert [reads.read(f"{be}/{k}") for k in ("num_devs", "dev-0", "state-0")] == ["1", "0000:00:05.0", "3"]
    assert xs.reads == 4
    reads.forget_nodes([be])                    # the directory itself: every node of the domain
    reads.read(f"{be}/num_devs")
    reads.read(f"{be}/dev-0")
    assert xs.reads == 6
