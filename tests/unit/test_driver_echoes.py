"""The xenbus driver reads xenstore again only for news: the events of its own
writes and of its watch registrations are echoes, anything else brings a re-read
that sees every change."""

from __future__ import annotations

from pcibackd.wire.pciif import XenbusState as S
from pcibackd.worker.driver import Driver
from pcibackd.worker.xenbus import BackendMachine

BE, FE = "/local/domain/0/backend/pci/3/0", "/local/domain/3/device/pci/0"


class FakeXs:
    """A flat xenstore that fires events like xenstored does (one per node written, one per
    new watch) and counts the reads."""

    def __init__(self, nodes: dict[str, str]):
        self.nodes = dict(nodes)
        self.watches: list[str] = []
        self.events: list[str] = []
        self.reads = 0

    def _fire(self, path: str) -> None:
        if any(path == w or path.startswith(w + "/") for w in self.watches):
            self.events.append(path)

    def read(self, path):
        self.reads += 1
        return self.nodes.get(path)

    def ls(self, path):
        self.reads += 1
        return sorted({p[len(path) + 1:].split("/")[0] for p in self.nodes if p.startswith(path + "/")})

    def write(self, path, value):
        self.nodes[path] = value
        self._fire(path)

    def rm(self, path):
        if self.nodes.pop(path, None) is not None:
            self._fire(path)

    def watch(self, path, token):
        self.watches.append(path)
        self.events.append(path)

    def unwatch(self, path, token):
        self.watches.remove(path)

    def run_transaction(self, fn):
        return fn(self)

    def take_events(self) -> list[str]:
        out, self.events = self.events, []
        return out


class Actions:
    def export(self, placement, opts, resume=False):
        pass

    def remove(self, hosts):
        pass

    def map_ring(self, gref, port):
        pass

    def unmap_ring(self):
        pass


def fresh() -> tuple[FakeXs, Driver]:
    xs = FakeXs({f"{BE}/frontend": FE, f"{BE}/frontend-id": "3", f"{BE}/online": "1", f"{BE}/state": "1",
                 f"{BE}/num_devs": "1", f"{BE}/dev-0": "0000:00:05.0", f"{BE}/key-0": "0000:00:05.0",
                 f"{BE}/state-0": "1", f"{FE}/state": "1", f"{FE}/backend": BE})
    driver = Driver(xs, 3, BE, BackendMachine(), Actions())
    driver.start()
    return xs, driver


def test_own_writes_and_watch_registrations_are_not_read_again():
    xs, driver = fresh()
    assert driver.machine.state == S.Initialised and xs.nodes[f"{BE}/state"] == "3"
    echoes = xs.take_events()
    assert BE in echoes and FE in echoes and f"{BE}/root_num" in echoes
    xs.reads = 0
    driver.on_watch(echoes)
    assert xs.reads == 0


def test_news_among_echoes_bring_a_full_read():
    xs, driver = fresh()
    echoes = xs.take_events()
    # the guest publishes its ring and says Initialised; the echoes of our writes come in the same batch
    for key, value in (("pci-op-ref", "8"), ("event-channel", "5"), ("magic", "7"), ("state", "3")):
        xs.write(f"{FE}/{key}", value)
    driver.on_watch(echoes + xs.take_events())
    assert driver.machine.state == S.Connected and xs.nodes[f"{BE}/state"] == "4"
    # the toolstack's hot-plug write of our own state node is news, though we wrote that node too
    driver.on_watch(xs.take_events())          # our Connected echo: nothing to read
    xs.nodes[f"{BE}/state"] = "7"
    xs.reads = 0
    driver.on_watch([f"{BE}/state"])
    assert xs.reads > 0 and driver.machine.state == S.Reconfiguring


def test_a_foreign_write_of_a_node_we_wrote_is_not_lost():
    """Two events for one node (ours and the toolstack's, in either order): one is news."""
    xs, driver = fresh()
    driver.on_watch(xs.take_events())
    for key, value in (("pci-op-ref", "8"), ("event-channel", "5"), ("magic", "7"), ("state", "3")):
        xs.write(f"{FE}/{key}", value)
    driver.on_watch(xs.take_events())          # we write Connected: one echo of state due
    assert driver.machine.state == S.Connected
    xs.write(f"{BE}/state", "7")                # the toolstack's event comes before our echo
    batch = xs.take_events()
    assert batch.count(f"{BE}/state") == 2
    driver.on_watch(batch[:1] + batch[2:])      # the first one alone: taken for our echo
    driver.on_watch(batch[1:2])                 # the second is news: the re-read sees 7
    assert driver.machine.state == S.Reconfiguring


def test_frontend_keys_are_read_again_only_when_named():
    xs, driver = fresh()
    driver.on_watch(xs.take_events())
    xs.write(f"{FE}/magic", "7")
    xs.reads = 0
    driver.on_watch(xs.take_events())
    assert xs.reads == 1                       # magic only
    assert driver.machine.frontend.untrusted_magic == "7"
    assert driver.machine.frontend.untrusted_state == "1"     # kept from the first read
