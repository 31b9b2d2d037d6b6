"""Suite-wide setup. Under pytest-xdist (`make test` runs two workers), each worker gets its own
persistent XLA compile cache: JAX writes cache entries non-atomically, so two processes compiling
the same program at once could read each other's half-written file. Subprocesses that tests start
inherit the worker's directory. An explicit $JAXLLM_COMPILE_CACHE is left alone."""
import os

_worker = os.environ.get("PYTEST_XDIST_WORKER")
if _worker and "JAXLLM_COMPILE_CACHE" not in os.environ:
    os.environ["JAXLLM_COMPILE_CACHE"] = os.path.join(
        os.path.expanduser("~"), ".cache", "jaxllm", f"xla-test-{_worker}")
