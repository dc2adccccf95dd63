"""What the supervisor knows of its control endpoint (pcibackctl's socket).

The daemon never imports the control package (it ranks above): ``pcibackd run``
hands the supervisor an :data:`OpenControl` that makes the endpoint once the
supervisor's ZeroMQ context exists, and the supervisor polls it in its loop.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import zmq

from pcibackd.worker.link import WorkerReply


class ControlEndpoint(Protocol):
    sock: zmq.Socket                       # polled by the supervisor's loop
    endpoints: dict[str, str | None]       # where it listens, by transport (shown by status)

    def handle_ready(self) -> None:
        """Answer the requests waiting on :attr:`sock`."""

    def worker_reply(self, reply: WorkerReply) -> None:
        """A worker answered a command the endpoint sent it."""

    def flush_pending(self) -> None:
        """Answer requests whose workers all replied or whose time is up."""

    def next_deadline(self) -> float | None:
        """Monotonic time the next waiting request times out, if any."""

    def close(self) -> None: ...


# (zmq context, the supervisor) -> endpoint; the supervisor is what the
# endpoint's commands act on.
OpenControl = Callable[[zmq.Context, Any], ControlEndpoint]
