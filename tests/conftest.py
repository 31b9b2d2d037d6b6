"""Suite-wide setup. Under pytest-xdist (`make test` runs two workers), each worker gets its own
persistent XLA compile cache: JAX writes cache entries non-atomically, so two processes compiling
the same program at once could read each other's half-written file. Subprocesses that tests start
inherit the worker's directory. An explicit $JAXLLM_COMPILE_CACHE is left alone."""
import os
import sys

import pytest

_worker = os.environ.get("PYTEST_XDIST_WORKER")
if _worker and "JAXLLM_COMPILE_CACHE" not in os.environ:
    os.environ["JAXLLM_COMPILE_CACHE"] = os.path.join(
        os.path.expanduser("~"), ".cache", "jaxllm", f"xla-test-{_worker}")


# tests/parallel items longest first: the two module groups that each run in one child
# (tests/parallel/conftest.py CHILD_GROUPS: ~130 s each alone on this box, 2026-12-03), then the slow one
# that runs alone (test_multihost ~25 s); any module outside a group keeps its collection order after.
PARALLEL_LONGEST = ("test_ep_moe.py", "test_tp_logits.py", "test_multihost.py")


def pytest_collection_modifyitems(session, config, items):
    """The longest modules first (tests/parallel's subprocess modules, the longest of them first,
    then the SmolLM2 end to end), so under `make test`'s two workers (--dist loadfile
    --no-loadscope-reorder) the run does not end waiting on one of them. A stable sort: the order
    within each group is kept."""
    def rank(item) -> tuple[int, int]:
        path = str(item.fspath)
        if "/tests/parallel/" in path:
            name = os.path.basename(path)
            return 0, PARALLEL_LONGEST.index(name) if name in PARALLEL_LONGEST else len(PARALLEL_LONGEST)
        return (1 if "/tests/e2e/" in path else 2), 0
    items.sort(key=rank)
    _OPTIMIZED_MODULES.update(str(item.fspath) for item in items if item.get_closest_marker("slow")
                              and os.path.basename(str(item.fspath)) not in COMPILE_BOUND_SLOW)


# XLA's CPU backend spends most of a tiny model's test in LLVM (compiling, not running): with LLVM's
# optimizations off (jax's `jax_disable_most_optimizations`: backend optimization level 0, no expensive
# passes; the HLO passes, fusion and buffer assignment are unchanged) a tiny-model module compiles
# ~25-35 % faster. A real model's compute is another matter (the SmolLM2 end to end took 3.5x longer
# unoptimized), so modules with a test marked `slow` (they run SmolLM2) compile as users do, but for
# COMPILE_BOUND_SLOW.
_OPTIMIZED_MODULES: set[str] = set()
# Modules with a `slow` test whose time is compiling, not computing: test_multihost (a tiny dummy model in
# three processes) compiles unoptimized like the tiny modules (alone, optimized -> unoptimized, loaded
# box: 143 -> 95 s; bench/RESULTS.md "Suite time, eleventh pass").
COMPILE_BOUND_SLOW = ("test_multihost.py",)
_DMO = "JAX_DISABLE_MOST_OPTIMIZATIONS"
_DMO_OUTSIDE = os.environ.get(_DMO)  # set outside pytest: every module follows it


@pytest.fixture(scope="module", autouse=True)
def _llvm_optimizations_for_real_models_only(request):
    """Set before the module's other module-scoped fixtures (autouse first in a scope) build engines.
    The environment variable reaches jax in subprocesses (tests/parallel children, servers, benches)
    and a jax imported later; a jax already imported is switched through its config. $JAX_DISABLE_MOST_
    OPTIMIZATIONS set outside pytest wins (0 runs every module optimized)."""
    want = _DMO_OUTSIDE if _DMO_OUTSIDE is not None else (
        "0" if str(request.node.fspath) in _OPTIMIZED_MODULES else "1")
    before = os.environ.get(_DMO)
    os.environ[_DMO] = want
    if "jax" in sys.modules:
        sys.modules["jax"].config.update("jax_disable_most_optimizations", want == "1")
    yield
    if before is None:
        os.environ.pop(_DMO, None)
    else:
        os.environ[_DMO] = before



@pytest.fixture(autouse=True)
def _hypothesis_draws_independent_of_imports():
    """Hypothesis (>= 6.13x) mixes literals it finds in every imported local module into its draws
    (hypothesis.internal.conjecture.providers._get_local_constants), so a fixed-seed (derandomized)
    test drew other examples when another test file of the same worker had imported more of the code
    first: the HTTP fuzz's /tokenize then saw no 200 after test_serving_security.py. Every test runs
    with an empty local pool (hypothesis's own constants stay), so its draws depend on its seed only."""
    try:
        from hypothesis.internal.conjecture import providers
        from hypothesis.internal.constants_ast import Constants
    except ImportError:  # another hypothesis layout: nothing to pin
        yield
        return
    if not hasattr(providers, "_get_local_constants"):
        yield
        return
    real, empty = providers._get_local_constants, Constants()
    providers._get_local_constants = lambda: empty
    providers.CONSTANTS_CACHE.cache.clear()
    try:
        yield
    finally:
        providers._get_local_constants = real
        providers.CONSTANTS_CACHE.cache.clear()


@pytest.fixture(autouse=True)
def _restore_jaxllm_environment():
    """Every test ends with the $JAXLLM_* environment it started with. Bench entry points that tests
    call in-process set switches as their CLIs do (bench/step_memory.py sets JAXLLM_LAYER_LOOP), and a
    leaked `scan` made later tests of that worker build Gemma / windowed-Qwen models (unroll only) or
    read per-layer weights of a stacked model."""
    before = {k: v for k, v in os.environ.items() if k.startswith("JAXLLM_")}
    yield
    for k in [k for k in os.environ if k.startswith("JAXLLM_") and k not in before]:
        del os.environ[k]
    os.environ.update(before)
