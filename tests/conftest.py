"""Suite-wide setup. Under pytest-xdist (`make test` runs two workers), each worker gets its own
persistent XLA compile cache: JAX writes cache entries non-atomically, so two processes compiling
the same program at once could read each other's half-written file. Subprocesses that tests start
inherit the worker's directory. An explicit $JAXLLM_COMPILE_CACHE is left alone."""
import os

_worker = os.environ.get("PYTEST_XDIST_WORKER")
if _worker and "JAXLLM_COMPILE_CACHE" not in os.environ:
    os.environ["JAXLLM_COMPILE_CACHE"] = os.path.join(
        os.path.expanduser("~"), ".cache", "jaxllm", f"xla-test-{_worker}")


def pytest_collection_modifyitems(session, config, items):
    """The longest modules first (tests/parallel's subprocess modules, then the SmolLM2 end to
    end), so under `make test`'s two workers (--dist loadfile --no-loadscope-reorder) the run
    does not end waiting on one of them. A stable sort: the order within each group is kept."""
    def rank(item) -> int:
        path = str(item.fspath)
        if path.endswith("/tests/parallel/test_tp_engine.py"):  # the longest of all
            return 0
        return 1 if "/tests/parallel/" in path else 2 if "/tests/e2e/" in path else 3
    items.sort(key=rank)
