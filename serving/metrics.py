"""Metrics export for the server (no jax): the engine's stats as Prometheus text, and the
periodic stats log line.

``ServingMetrics`` owns one dedicated ``CollectorRegistry`` (never the process-global default),
attaches the stat loggers to the engine once it is built and warm (on the engine thread, so
warm-up is not counted and ``jaxllm:xla_compiles_since_warmup`` starts at 0), and serves the
registry on ``--metrics-port`` from prometheus-client's own threaded HTTP server (any path answers;
``/metrics`` is the usual one). ``metrics_app(registry)`` is the same registry as an ASGI app, for
mounting ``/metrics`` on an HTTP front door: ``app.mount("/metrics", metrics_app(m.registry))``.

Probes are not traffic (vLLM's HTTP instrumentator excludes ``/health`` and ``/metrics``): the
health monitor's synthetic requests (ids ``PROBE_PREFIX...``) are left out of the request-level
series through ``engine.exclude_from_stats``, and ``/health``, ``/metrics`` and gRPC health checks
never reach the engine or any series.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, make_asgi_app, start_http_server

from jaxllm.metrics.loggers import LoggingStatLogger
from jaxllm.metrics.prometheus import PrometheusStatLogger
from serving.config import ServerConfig
from serving.frontdoor import PROBE_PREFIX

log = logging.getLogger(__name__)


def metrics_app(registry: CollectorRegistry):
    """An ASGI app answering Prometheus text for ``registry`` (for an HTTP app's ``/metrics``)."""
    return make_asgi_app(registry)


def model_name(engine: Any) -> str:
    config = getattr(engine, "config", None)
    return str(getattr(config, "model", "") or "smollm2-135m")


class ServingMetrics:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.prometheus: PrometheusStatLogger | None = None
        self.port: int | None = None  # bound metrics port, once started
        self._httpd = None

    @property
    def prometheus_wanted(self) -> bool:
        """The series are served on --metrics-port and on the HTTP door's /metrics."""
        return self.config.metrics_port is not None or self.config.http_port is not None

    @property
    def enabled(self) -> bool:
        return self.prometheus_wanted or self.config.log_stats

    def attach(self, engine: Any) -> None:
        """Attach the stat loggers to a built (and warmed-up) engine; call on the engine thread."""
        if not self.enabled:
            return
        add = getattr(engine, "add_stat_logger", None)
        if add is None:
            log.warning("serving: %s records no stats: --metrics-port serves no jaxllm:* series and "
                        "there is no stats log", type(engine).__name__)
            return
        exclude = getattr(engine, "exclude_from_stats", None)
        if exclude is not None:  # the health probes are not requests anyone sent
            exclude(PROBE_PREFIX)
        else:
            log.warning("serving: %s cannot leave the health probes out of its stats: they are counted",
                        type(engine).__name__)
        cfg = getattr(engine, "config", None)
        if self.prometheus_wanted:
            self.prometheus = PrometheusStatLogger(
                self.registry, model_name(engine),
                max_model_len=getattr(cfg, "max_model_len", None) or 131072,
                max_num_batched_tokens=getattr(cfg, "max_num_batched_tokens", None) or 8192,
                num_speculative_tokens=getattr(getattr(engine, "speculative", None), "num_speculative_tokens", 0))
            add(self.prometheus)
        if self.config.log_stats:
            add(LoggingStatLogger(self.config.log_stats_interval))

    def start(self) -> int | None:
        """Listen on ``--metrics-port`` (0 = any free port); returns the bound port, None when off.
        Raises OSError naming the flag when the port cannot be bound."""
        cfg = self.config
        if cfg.metrics_port is None:
            return None
        tls = dict(certfile=cfg.tls_cert, keyfile=cfg.tls_key) if cfg.tls_cert else {}
        try:
            self._httpd, _ = start_http_server(cfg.metrics_port, addr=cfg.host, registry=self.registry, **tls)
        except OSError as e:
            raise OSError(f"--host {cfg.host} --metrics-port {cfg.metrics_port}: cannot listen: "
                          f"{e.strerror or e}") from None
        self.port = self._httpd.server_port
        return self.port

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
