"""Engine metrics (host only, no jax): per-step stats records and the loggers that consume them.

``stats``: what the engine produces after every step (``SchedulerStats``, ``IterationStats``,
``FinishedRequestStats``: vLLM V1's shape). ``loggers``: the periodic one-line log.
``prometheus``: the ``jaxllm:*`` Prometheus series on a dedicated ``CollectorRegistry``.
"""

from jaxllm.metrics.loggers import LoggingStatLogger, StatLogger
from jaxllm.metrics.stats import FinishedRequestStats, IterationStats, SchedulerStats

__all__ = ["FinishedRequestStats", "IterationStats", "LoggingStatLogger", "SchedulerStats", "StatLogger"]
