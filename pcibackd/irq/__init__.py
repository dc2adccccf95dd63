"""The interrupt broker: PIRQs for MSI/MSI-X, mapped on a worker's behalf by the supervisor.

Mapping a PIRQ takes ``/dev/xen/privcmd`` (any dom0 hypercall), so workers never
hold it: a worker asks the broker over its supervisor link, the broker checks
the request against what the supervisor told it (which guest holds which
function, the function's MSI-X table as captured at seize) and performs the
hypercalls and the control-register writes Xen leaves to dom0
(docs/interrupts.md).

* :mod:`.function` the registers and the seize-time record of a function;
* :mod:`.messages` what crosses the worker -> supervisor boundary, and the
  worker's client;
* :mod:`.ports`    the injected effects (:class:`~.ports.Physdev`) and journal protocol;
* :mod:`.broker`   validation, the table of live mappings, the effects, replay after a crash;
* :mod:`.journal`  the durable record of live PIRQs (one file per guest).
"""
