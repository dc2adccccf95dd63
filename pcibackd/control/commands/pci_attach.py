"""Give a running (or paused) guest a host function, like xl pci-attach.

DOMAIN: a domid or a name.  SPEC: xl-pci-configuration(5),
``BDF[@VSLOT][,permissive=1][,seize=1][,name=NAME]``; msitranslate, power_mgmt
and rdm_policy are HVM-only and refused unless at their defaults.  The function
must be assignable (or seize=1) and not quarantined (its last reset failed:
refused unless --force, which clears the quarantine).  A running guest gets it
by xenbus hot-plug (reconfigure); pcibackctl waits until the guest has it (10 s,
or --timeout if longer).

  {"command": "pci-attach", "args": {"domain": "guest1", "spec": "03:00.0,permissive=1", "force": false}}
"""

from __future__ import annotations

from pcibackd.control.commands import devcmd
from pcibackd.control.commands.base import Arg
from pcibackd.control.face import DaemonFace

NAME = "pci-attach"
ARGS = (Arg("domain", str, "domid or name", metavar="DOMAIN"),
        Arg("spec", str, "xl PCI spec", metavar="SPEC"),
        Arg("force", bool, "attach a quarantined function too (its last reset failed)", flags=("--force",)))


def execute(face: DaemonFace, args: dict) -> dict:
    return devcmd.run(face.lifecycle.attach, args["domain"], args["spec"], args["force"])


def follow(result: dict, call, timeout: float) -> str | None:
    """A hot-plug is done when the backend is Connected again with every function published."""
    if not result["hotplug"]:
        return None
    want = set(result["functions"])

    def done(listing: dict) -> bool:
        published = {d["dev"] for d in listing["devices"] if d["vdev"]}
        return listing["backend_state"] == "4" and want <= published
    return devcmd.wait_for(call, str(result["domid"]), done, "pci-attach", timeout)


def render(result: dict) -> str:
    how = "hot-plugged" if result["hotplug"] else "attached (the guest sees it when it connects)"
    who = f"domain {result['domid']}" + (f" ({result['name']})" if result["name"] else "")
    return f"{who}: {', '.join(result['functions'])} {how}"
