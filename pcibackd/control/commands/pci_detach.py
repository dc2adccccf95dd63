"""Take a function from a guest, like xl pci-detach; it goes back to the assignable pool.

The guest is asked to let go (xenbus reconfigure) and pcibackctl waits for it
(10 s, or --timeout if longer);
-f removes it without waiting for the guest (a guest that never answers).

  {"command": "pci-detach", "args": {"domain": "3", "spec": "03:00.0", "force": false}}
"""

from __future__ import annotations

from pcibackd.control.commands import devcmd
from pcibackd.control.commands.base import Arg
from pcibackd.control.face import DaemonFace

NAME = "pci-detach"
ARGS = (Arg("domain", str, "domid or name", metavar="DOMAIN"),
        Arg("spec", str, "xl PCI spec (the BDF)", metavar="SPEC"),
        Arg("force", bool, "do not wait for the guest", flags=("-f", "--force")))


def execute(face: DaemonFace, args: dict) -> dict:
    return devcmd.run(face.lifecycle.detach, args["domain"], args["spec"], args["force"])


def follow(result: dict, call, timeout: float) -> str | None:
    if result["state"] != "detaching":
        return None
    gone = set(result["functions"])
    return devcmd.wait_for(call, str(result["domid"]),
                           lambda listing: not gone & {d["dev"] for d in listing["devices"]},
                           "pci-detach (pci-detach -f removes it without the guest)", timeout)


def render(result: dict) -> str:
    return f"domain {result['domid']}: {', '.join(result['functions'])} detached, back in the pool"
