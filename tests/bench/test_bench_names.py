"""`python bench/x.py` puts bench/ on sys.path (after the repo root the scripts insert), so a bench
module named like a top-level module shadows it for everything the script imports: a bench/kernels.py
made transformers 5.25 (which imports the PyPI `kernels` package whenever `find_spec("kernels")` finds
one) fail inside every bench that loads HF. No bench module may share a name with an importable module
or with an optional one our dependencies probe for."""
from __future__ import annotations

import importlib.util
import os
import sys

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench")
ROOT = os.path.dirname(BENCH)
PROBED = {"kernels"}  # transformers.integrations.hub_kernels imports it when present


def _where(name: str) -> str | None:
    """Where `name` imports from without bench/ on the path (None: nowhere)."""
    old = sys.path[:]
    sys.path[:] = [p for p in old if os.path.abspath(p or ".") != BENCH]
    try:
        spec = importlib.util.find_spec(name)
    finally:
        sys.path[:] = old
    if spec is None:
        return None
    return spec.origin if spec.origin not in (None, "namespace") else next(iter(spec.submodule_search_locations), "")


def test_no_bench_module_shadows_another():
    names = sorted(f[:-3] for f in os.listdir(BENCH) if f.endswith(".py") and f != "__init__.py")
    assert "attention_kernels" in names  # the check sees the bench scripts
    clashes = {n: _where(n) for n in names if n in PROBED or (_where(n) or ROOT).split(os.sep)[:len(ROOT.split(os.sep))]
               != ROOT.split(os.sep)}
    assert not clashes, f"bench modules named like other importable modules (rename them): {clashes}"
