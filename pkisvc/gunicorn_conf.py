"""gunicorn settings for `pkisvc serve` (`gunicorn -c python:pkisvc.gunicorn_conf ...`)."""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from pkisvc.settings import Settings

_settings = Settings.load()

# Request metrics are summed over workers through files in this directory (one per server).
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="pkisvc-metrics-")

bind = [_settings.bind]
workers = _settings.workers
# gthread's thread pool and keep-alive, with each whole request (TLS handshake, line, headers,
# body) read in the worker's poller within a deadline before a thread sees it: slow clients
# cannot hold the threads (docs/decisions.md, "Serving: slow clients").
worker_class = "pkisvc.worker.BufferedThreadWorker"
threads = 4
timeout = 60
graceful_timeout = 10
# gunicorn 27 opens a per-user control socket by default; instances would share it.
control_socket_disable = True
# Off unless asked for (`access_log: true`): it costs a fifth of the read throughput.
accesslog = "-" if _settings.access_log else None
# No request bodies, query strings or headers: tokens stay out of the log.
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(b)s %(M)sms'
errorlog = "-"
loglevel = _settings.log_level
if _settings.tls.cert and _settings.tls.key:
    certfile = _settings.tls.cert
    keyfile = _settings.tls.key


def _pkisvc_logs_to(server: Any) -> None:
    """Send pkisvc's own log lines (the `pkisvc` logger and its children, Flask's app logger
    among them) to gunicorn's error log, in its format: the service log holds both."""
    import logging

    target = logging.getLogger("pkisvc")
    target.handlers = list(server.log.error_log.handlers)
    target.setLevel(server.log.error_log.level or logging.INFO)
    target.propagate = False


def on_starting(server: Any) -> None:
    _pkisvc_logs_to(server)


def post_fork(server: Any, worker: Any) -> None:
    _pkisvc_logs_to(server)


def worker_exit(server: Any, worker: Any) -> None:
    """A worker that stops lets go of its backend: a Vault token it logged in for (AppRole)
    is revoked, as a CLI run's is, rather than left to its TTL."""
    store = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("pkisvc")
    close = getattr(getattr(store, "backend", None), "close", None)  # optional Backend method
    if close is not None:
        try:
            close()
        except Exception as e:
            server.log.info("worker %s: backend not closed: %s", worker.pid, e)


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    if os.path.basename(path).startswith("pkisvc-metrics-"):
        shutil.rmtree(path, ignore_errors=True)
