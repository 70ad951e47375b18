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
# gthread keeps connections alive (sync workers close after every response).
worker_class = "gthread"
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


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    if os.path.basename(path).startswith("pkisvc-metrics-"):
        shutil.rmtree(path, ignore_errors=True)
