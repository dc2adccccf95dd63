"""One worker cannot speak for another: the supervisor takes a worker message
only from the process the kernel says sent it, whatever the message claims."""

from __future__ import annotations

import zmq

from pcibackd.worker.link import WorkerReport
from pcibackd.worker.main import pidfile_path
from waiting import wait_until


def test_a_forged_beat_with_the_right_pid_and_token_is_ignored(dom0):
    dom0.add_device("edu", "0000:00:05.0")
    dom0.create_guest(1, ["0000:00:05.0"])
    dom0.frontend(1).connect()
    wait_until(lambda: (g := dom0.guest_status(1)) and g["worker_state"] == "RUNNING", what="dom1 RUNNING")
    # everything a uid-0 process can learn: the worker's pid and token from its pid file
    pid, _started, token = pidfile_path(dom0.runtime, 1).read_text().split()
    forged = WorkerReport(domid=1, pid=int(pid), token=token, final=True, spurious=424242).to_json()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"dom1")          # what the worker used to be routed by
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{dom0.runtime / 'workers.sock'}")
    try:
        sock.send(forged)
        wait_until(lambda: "a message for domain 1 from pid" in dom0.log_tail(400),
                   what="the supervisor to refuse the forged beat")
    finally:
        sock.close(0)
        ctx.term()
    g = dom0.guest_status(1)
    assert g["worker_state"] == "RUNNING" and g["pid"] == int(pid)
    assert g.get("spurious") != 424242
    assert "424242" not in str(g)
