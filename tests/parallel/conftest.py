"""tests/parallel run on 8 fake CPU devices, which XLA only creates if
XLA_FLAGS=--xla_force_host_platform_device_count=8 is set before the CPU backend starts. Other
test modules in the same pytest process start it first, so each test module here runs in its own
subprocess (`python -m pytest <module>` with the flag set): in the parent, a module collects as
one item that runs that child and reports its output; in the child (JAXLLM_TP_CHILD=1), the
module's tests run normally.
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


class ModuleInSubprocess(pytest.Item):
    def runtest(self):
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--durations=5",
               str(self.path)]
        r = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=900)
        self.add_report_section("call", "child pytest", r.stdout[-20000:] + r.stderr[-5000:])
        if r.returncode != 0:
            raise SubprocessFailed(f"{' '.join(cmd)} exited {r.returncode}\n{r.stdout[-20000:]}\n{r.stderr[-5000:]}")

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, SubprocessFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, 0, f"{self.path.name} (subprocess, {NUM_DEVICES} CPU devices)"


class ModuleFile(pytest.File):
    def collect(self):
        item = ModuleInSubprocess.from_parent(self, name=f"{self.path.stem}[{NUM_DEVICES} cpu devices]")
        if "pytest.mark.slow" in self.path.read_text():  # so -m "not slow" skips SmolLM2 modules
            item.add_marker("slow")
        yield item


def pytest_pycollect_makemodule(module_path, parent):
    if IN_CHILD:
        return None  # collect normally
    return ModuleFile.from_parent(parent, path=module_path)


if IN_CHILD:
    import jax

    if len(jax.devices()) < NUM_DEVICES:
        raise RuntimeError(f"tests/parallel child sees {len(jax.devices())} devices, expected {NUM_DEVICES}")
