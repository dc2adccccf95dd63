"""What SIGHUP (``systemctl reload``) does to a running supervisor.

The config file is read again with the same flags on top: the settings a
running daemon can change (config.LIVE) take effect, the others are reported
as needing a restart.  Then the config-space policy is reloaded in every
running worker (as ``pcibackctl policy reload`` does, without waiting for
answers), and xenstore is scanned again.  A malformed file changes nothing.
"""

from __future__ import annotations

from loguru import logger

from pcibackd.common import logs
from pcibackd.confspace import PolicyError, read_policy_text
from pcibackd.daemon import systemd
from pcibackd.daemon.config import ConfigError
from pcibackd.daemon.states import RestartPolicy


def reload_config_and_policy(sup, running: list[int]) -> None:
    """Apply the config file and the policy file again to supervisor ``sup``;
    ``running``: the domids whose workers are RUNNING."""
    systemd.notify("RELOADING=1")
    try:
        applied, frozen = sup.cfg.apply(sup.cfg.reload())
    except ConfigError as exc:
        logger.error("SIGHUP: config not reloaded: {}", exc)
        applied, frozen = [], []
    if frozen:
        logger.warning("SIGHUP: {} changed in {}: takes effect when pcibackd restarts",
                       ", ".join(frozen), sup.cfg.source)
    if applied:
        logger.info("SIGHUP: config {}: {}", sup.cfg.source, logs.kv({k: getattr(sup.cfg, k) for k in applied}))
        sup.policy = RestartPolicy(max_failures=sup.cfg.restart_max_failures,
                                   stable_after=sup.cfg.restart_stable_after)
    if "log_level" in applied:
        sup.set_log_level(sup.cfg.log_level)
        for domid in running:
            sup.send_worker(domid, "log-level", {"level": sup.cfg.log_level})
    if not applied and not frozen:
        logger.info("SIGHUP: config {}: unchanged", sup.cfg.source)
    try:
        text = read_policy_text(sup.cfg.policy_path)     # sent along: a worker may not open the file
    except PolicyError as exc:
        logger.error("SIGHUP: policy not reloaded: {}", exc)
    else:
        args = {} if text is None else {"text": text}
        sent = sum(sup.send_worker(domid, "policy-reload", args) for domid in running)
        logger.info("SIGHUP: policy {} sent to {} worker(s)", sup.cfg.policy_path or "(built-in)", sent)
    sup.scan()
    systemd.notify("READY=1")
