"""tests/parallel run on 8 fake CPU devices, which XLA only creates if
XLA_FLAGS=--xla_force_host_platform_device_count=8 is set before the CPU backend starts. Other
test modules in the same pytest process start it first, so the modules here run in subprocesses
(`python -m pytest <modules>` with the flag set): in the parent, a module collects as one item that
runs that child and reports its output; in the child (JAXLLM_TP_CHILD=1), the tests run normally.

When a whole group of CHILD_GROUPS is collected (`make test`, `pytest tests/parallel`), its modules
run in ONE child, reported as its first module's item: they share the child's imports (torch,
transformers, jax on 8 devices) and in-memory compiles (132 s in one child vs 199 s in four for the
MoE/int4 group, 2026-12-03). A module collected alone, or outside any group, runs in its own child.
Modules marked slow (test_multihost) stay alone, so `-m "not slow"` deselects only them.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHILD_ENV = "JAXLLM_TP_CHILD"
NUM_DEVICES = 8
IN_CHILD = os.environ.get(CHILD_ENV) == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child_env() -> dict:
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={NUM_DEVICES}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env[CHILD_ENV] = "1"
    return env


class SubprocessFailed(Exception):
    pass


# two groups of about equal time (one per `make test` worker), heaviest first within each
CHILD_GROUPS = (
    ("test_ep_moe.py", "test_tp_moe.py", "test_tp_int4.py", "test_tp_gguf_q8.py", "test_tp_moe_int4.py",
     "test_tp_fp8_checkpoint.py"),
    ("test_tp_logits.py", "test_tp_archs.py", "test_tp_lora.py", "test_tp_engine.py", "test_tp_gemma.py",
     "test_tp_cache_in_place.py", "test_layout.py"),
)


class ModuleInSubprocess(pytest.Item):
    modules: tuple = ()  # the modules its child runs (set at collection: its own, or its group's)

    def runtest(self):
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--durations=5",
               *map(str, self.modules or (self.path,))]
        r = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=1800)
        self.add_report_section("call", "child pytest", r.stdout[-20000:] + r.stderr[-5000:])
        if r.returncode != 0:
            raise SubprocessFailed(f"{' '.join(cmd)} exited {r.returncode}\n{r.stdout[-20000:]}\n{r.stderr[-5000:]}")

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, SubprocessFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        more = f" + {len(self.modules) - 1} modules" if len(self.modules) > 1 else ""
        return self.path, 0, f"{self.path.name}{more} (subprocess, {NUM_DEVICES} CPU devices)"


class ModuleFile(pytest.File):
    def collect(self):
        item = ModuleInSubprocess.from_parent(self, name=f"{self.path.stem}[{NUM_DEVICES} cpu devices]")
        if "pytest.mark.slow" in self.path.read_text():  # so -m "not slow" skips SmolLM2 modules
            item.add_marker("slow")
        yield item


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
    """Each CHILD_GROUPS group whose every module was collected becomes one item (its first module's)
    running them all in one child; the others' items go."""
    if IN_CHILD:
        return
    by_name = {item.path.name: item for item in items if isinstance(item, ModuleInSubprocess)}
    gone = set()
    for group in CHILD_GROUPS:
        members = [by_name.get(name) for name in group]
        if None in members or any(m.get_closest_marker("slow") for m in members):
            continue
        members[0].modules = tuple(m.path for m in members)
        gone.update(id(m) for m in members[1:])
    items[:] = [item for item in items if id(item) not in gone]


def pytest_pycollect_makemodule(module_path, parent):
    if IN_CHILD:
        return None  # collect normally
    return ModuleFile.from_parent(parent, path=module_path)


if IN_CHILD:
    import jax

    if len(jax.devices()) < NUM_DEVICES:
        raise RuntimeError(f"tests/parallel child sees {len(jax.devices())} devices, expected {NUM_DEVICES}")
