"""simdom0: a simulated Xen dom0 for pcibackd's demo, tests and benchmarks.

It lives beside the tests, never inside the installed ``pcibackd`` package
(compare Xen's ``tools/tests/vpci``): the real oxenstored with a preload stub
(``xenstored``, ``native/``), a platform of shared-memory grants and socket
event channels (``platform``, ``evtchn``), PCI functions modelled from real
config-space dumps (``hostpci``; the writable-bit model in ``hwspec``,
``hwtables``, ``hwmodel``; ``dumps/``), a Python pcifront with Linux's
semantics (``pcifront``, ``guest``), an lspci-style renderer (``lspci``) and
the harness that ties them to a running daemon (``dom0``, ``demo``).
The daemon reaches it only through the platform spec ``sim:DIR``.
"""
