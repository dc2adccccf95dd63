"""Print the daemon's metrics in the Prometheus text format (for node_exporter's textfile collector).

  pcibackctl metrics > /var/lib/prometheus/node-exporter/pcibackd.prom.$$ &&
    mv /var/lib/prometheus/node-exporter/pcibackd.prom.$$ /var/lib/prometheus/node-exporter/pcibackd.prom

Series (labels domid and name, the domain's name, on every per-guest one):
  pcibackd_ops_total{op}                 ops served
  pcibackd_op_errors_total{op,code}      failed answers by symbolic code (XEN_PCI_ERR_*, -E...)
  pcibackd_op_misses_total{op,code}      probe misses (empty slots, the extended-space probe): not errors
  pcibackd_op_service_seconds            op service time histogram
  pcibackd_worker_restarts_total         workers started again
  pcibackd_worker_cpu_seconds_total      CPU time of the guest's workers
  pcibackd_denied_writes_total{bdf}      guest config writes dropped or refused
  pcibackd_guests{state}                 guests by worker state
  pcibackd_xenstore_connected, pcibackd_pool_size, pcibackd_assignable_functions,
  pcibackd_start_time_seconds, pcibackd_info{version,platform,topology}
Counters add up all of a guest's workers (a restart does not reset them).  The
daemon answers from its workers' last reports, never waiting for a worker.
--json prints the data behind them.  Needs prometheus_client (extra 'metrics').

  {"command": "metrics", "args": {}}
"""

from __future__ import annotations

from pcibackd.control.face import DaemonFace
from pcibackd.control.metricsdata import collect

try:
    from pcibackd.control import exposition
except ImportError:                # prometheus_client is an optional extra
    exposition = None

NAME = "metrics"
ARGS = ()


def execute(face: DaemonFace, args: dict) -> dict:
    return collect(face)


def render(result: dict) -> str:
    if exposition is None:
        raise RuntimeError("pcibackctl metrics needs prometheus_client: pip install 'pcibackd[metrics]' "
                           "(Debian: apt install python3-prometheus-client)")
    return exposition.text(result).rstrip("\n")
