"""Prometheus metrics: certificate facts read from the store at scrape, request counters.

Certificate expiry, the current version and rotation counts come from the store on every
scrape, so any worker answers the same.  Request counts and latency are per process; under
gunicorn they are summed across workers through prometheus_client's multiprocess mode
(`PROMETHEUS_MULTIPROC_DIR`, set by pkisvc's gunicorn config).
"""
from __future__ import annotations

import os
from collections import Counter as Tally
from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from pkisvc import hosts
from pkisvc.errors import BackendUnavailable, NotFound
from pkisvc.store import CertStore

REQUESTS = Counter("pkisvc_http_requests_total", "HTTP requests answered.",
                   ["method", "endpoint", "status"], registry=None)
AUTH_REFUSED = Counter("pkisvc_auth_refused_total",
                       "Requests refused for a missing, unknown or insufficient token.",
                       ["endpoint", "status"], registry=None)
STALE = Counter("pkisvc_stale_answers_total",
                "Answers made from memory while the backend could not be reached "
                "(marked with a PKISVC-Stale header).", ["endpoint"], registry=None)
LATENCY = Histogram("pkisvc_http_request_duration_seconds", "Time to answer a request.",
                    ["endpoint"], registry=None,
                    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))


# Labels come from fixed sets only: a label value taken from the request would let any client
# add series without limit (an invented method per request), and every scrape would carry them.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
UNKNOWN_ENDPOINT = "unknown"


def method_label(method: str) -> str:
    """The request method as a label: a known method, else `other`."""
    return method if method in METHODS else "other"


class StoreCollector:
    """Read the store's current generation and history at every scrape."""

    def __init__(self, store: CertStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        cluster = self.store.settings.cluster
        yield from self._chain(cluster)
        up = GaugeMetricFamily("pkisvc_backend_up", "1 when the backend answers.",
                               labels=["cluster"])
        try:
            gen = self.store.read()
            history = self.store.versions()
        except (BackendUnavailable, NotFound) as e:
            up.add_metric([cluster], 0 if isinstance(e, BackendUnavailable) else 1)
            yield up
            return
        up.add_metric([cluster], 1)
        yield up
        expiry = GaugeMetricFamily("pkisvc_certificate_expiration_timestamp_seconds",
                                   "notAfter of each certificate of the current version.",
                                   labels=["cluster", "item"])
        start = GaugeMetricFamily("pkisvc_certificate_not_before_timestamp_seconds",
                                  "notBefore of each certificate of the current version.",
                                  labels=["cluster", "item"])
        renewal = GaugeMetricFamily(
            "pkisvc_certificate_renewal_timestamp_seconds",
            "When renewal becomes due: notAfter less renew_before (ca_warn_before for the CA).",
            labels=["cluster", "item"])
        s = self.store.settings
        for item, rec in gen.record.items.items():
            expiry.add_metric([cluster, item], rec.not_after.timestamp())
            start.add_metric([cluster, item], rec.not_before.timestamp())
            ahead = s.ca_warn_before if item == "ca" else s.renew_before
            renewal.add_metric([cluster, item], rec.not_after.timestamp() - ahead)
        yield expiry
        yield start
        yield renewal
        version = GaugeMetricFamily("pkisvc_generation", "The current version.",
                                    labels=["cluster"])
        version.add_metric([cluster], gen.version)
        yield version
        phase = GaugeMetricFamily("pkisvc_ca_rotation_phase",
                                  "Phase of the open staged CA rotation (0: none).",
                                  labels=["cluster"])
        phase.add_metric([cluster], (gen.record.rotation or {}).get("phase", 0))
        yield phase
        # The service-account key pair ([M]), from the record (no key is read).
        sa_phase = GaugeMetricFamily("pkisvc_sa_rotation_phase",
                                     "Phase of the open service-account key rotation (0: none).",
                                     labels=["cluster"])
        rotations = gen.record.extra.get("key_rotations") or {}
        sa_phase.add_metric([cluster], (rotations.get("sa") or {}).get("phase", 0))
        yield sa_phase
        sa_keys = GaugeMetricFamily("pkisvc_sa_published_keys",
                                    "Public keys in sa.pub (0: no service-account key).",
                                    labels=["cluster"])
        pair = (gen.record.extra.get("key_pairs") or {}).get("sa") or {}
        sa_keys.add_metric([cluster], len(pair.get("published", ())))
        yield sa_keys
        yield self._hosts(cluster)
        ops = CounterMetricFamily("pkisvc_rotations", "Generations made, by operation.",
                                  labels=["cluster", "operation"])
        for op, n in sorted(Tally(r.operation for r in history).items()):
            ops.add_metric([cluster, op], n)
        yield ops


    def _chain(self, cluster: str) -> Iterator[Metric]:
        status = self.store.chain_status
        if status is None:
            return  # not checked yet
        ok = GaugeMetricFamily("pkisvc_audit_chain_ok",
                               "1 when the audit chain held at its last check, 0 on a break.",
                               labels=["cluster"])
        ok.add_metric([cluster], 1 if status["ok"] else 0)
        yield ok
        at = GaugeMetricFamily("pkisvc_audit_chain_checked_timestamp_seconds",
                               "When the audit chain was last checked.", labels=["cluster"])
        at.add_metric([cluster], status["checked_at"].timestamp())
        yield at

    def _hosts(self, cluster: str) -> Metric:
        """Hosts by state ([Q]): counts only (a series per host would not scale)."""
        family = GaugeMetricFamily("pkisvc_hosts", "Known hosts by installed state: "
                                   + ", ".join(hosts.STATES) + ".",
                                   labels=["cluster", "state"])
        try:
            found = self.store.host_page(limit=0)[1]
        except BackendUnavailable:
            return family
        for state, n in found.items():
            family.add_metric([cluster, state], n)
        return family


def render(store: CertStore) -> bytes:
    """The text exposition of every pkisvc metric."""
    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)
    else:
        registry.register(REQUESTS)
        registry.register(AUTH_REFUSED)
        registry.register(STALE)
        registry.register(LATENCY)
    registry.register(StoreCollector(store))
    return generate_latest(registry)
