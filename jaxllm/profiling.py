"""Wrap N steady-state engine steps in ``jax.profiler.trace(dir)``.

    prof = EngineProfiler(llm.engine, "/tmp/prof", num_steps=20)   # installs itself
    llm.generate(...)                                             # steps 1..k untraced, then N traced
    prof.finish()                                                  # stops the trace if still open

What lands in ``dir``:
- ``plugins/profile/<run>/<host>.trace.json.gz`` (+ ``.xplane.pb``): the trace JAX writes, viewable
  in Perfetto / XProf / TensorBoard; ``perfetto_trace.json.gz`` beside it.
- ``jaxllm_profile.json``: every traced step's wall time measured around ``engine.step()`` (host
  ``perf_counter``), its kind (``decode`` when every scheduled sequence fed one token, ``draft``
  when each fed one plus its speculative drafts, else ``mixed``), sequences, tokens and padded bucket; and the compiled step's ``cost_analysis()``
  (FLOPs, bytes accessed) for the bucket of the last traced step.
- ``step.hlo.txt``: that executable's optimized HLO (op names in the trace are its instruction
  names; ``bench/profile_report.py`` uses the metadata to put each op in a category).

Steady state: with ``mode="decode"`` (default) tracing starts after ``skip`` consecutive
decode-only steps with nothing waiting, so prefills and warm-up stay out of the trace; with
``mode="any"`` after ``skip`` steps of any kind. Each traced step is wrapped in a
``StepTraceAnnotation("engine_step", step_num=i)``.
"""
from __future__ import annotations

import json
import os
import time

import jax

from jaxllm.runner.buckets import Buckets

PROFILE_JSON = "jaxllm_profile.json"
HLO_FILE = "step.hlo.txt"


class EngineProfiler:
    def __init__(self, engine, log_dir: str, num_steps: int = 20, *, mode: str = "decode", skip: int = 2,
                 cost_analysis: bool = True, verbose: bool = True) -> None:
        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps} is invalid: must be >= 1")
        if mode not in ("decode", "any"):
            raise ValueError(f"mode={mode!r} is invalid: must be 'decode' or 'any'")
        self.engine = engine
        self.runner = engine.runner
        self.log_dir = os.path.abspath(log_dir)
        self.num_steps = num_steps
        self.mode = mode
        self.skip = skip
        self.want_cost = cost_analysis
        self.verbose = verbose
        self.state = "waiting"  # → "tracing" → "done"
        self.steps: list[dict] = []
        self._streak = 0  # consecutive qualifying steps seen before tracing
        self._last: dict | None = None  # what execute saw in the current step
        self._last_inputs = None  # StepInputs of the latest traced step
        self._orig_step = engine.step
        self._orig_execute = self.runner.execute
        self._orig_dispatch = getattr(self.runner, "dispatch", None)  # what an async engine calls
        self._orig_run = getattr(self.runner, "_run", None)
        # (object, attribute, the instance attribute it had before, if any) to restore on finish
        self._patched = [(obj, name, vars(obj).get(name)) for obj, name in
                         ((engine, "step"), (self.runner, "execute"), (self.runner, "dispatch"),
                          (self.runner, "_run"))]
        engine.step = self._step
        self.runner.execute = self._execute
        if self._orig_dispatch is not None:
            self.runner.dispatch = self._dispatch
        if self._orig_run is not None:
            self.runner._run = self._run
        self.result: dict | None = None

    # ----- wrappers -----------------------------------------------------------------
    def _execute(self, sched):
        self._note(sched)
        return self._orig_execute(sched)

    def _dispatch(self, sched):
        self._note(sched)
        return self._orig_dispatch(sched)

    def _note(self, sched) -> None:
        """What the engine step launched (with async scheduling: the step dispatched during it)."""
        seqs = sched.seqs
        n_tok = sum(len(s.token_ids) for s in seqs)
        kind = Buckets.kind(seqs) if seqs else "mixed"
        bucket = None
        if seqs and hasattr(self.runner, "buckets"):
            bucket = list(self.runner.buckets.pick_step(seqs))
        self._last = {"kind": kind, "num_seqs": len(seqs), "num_tokens": n_tok,
                      "bucket": bucket}

    def _run(self, inp):
        if self.state == "tracing":
            self._last_inputs = inp
        return self._orig_run(inp)

    def _qualifies(self) -> bool:
        if self.mode == "any":
            return self._last is not None
        sched = self.engine.scheduler
        return self._last is not None and self._last["kind"] == "decode" and sched.num_waiting == 0

    def _step(self):
        if self.state == "waiting" and self._streak >= self.skip:
            self._start()
        if self.state != "tracing":
            self._last = None
            out = self._orig_step()
            self._streak = self._streak + 1 if self._qualifies() else 0
            return out
        i = len(self.steps)
        self._last = None
        with jax.profiler.StepTraceAnnotation("engine_step", step_num=i):
            t0 = time.perf_counter()
            out = self._orig_step()
            wall = time.perf_counter() - t0
        rec = {"step": i, "wall_s": wall, **(self._last or {"kind": "idle", "num_seqs": 0, "num_tokens": 0,
                                                           "bucket": None})}
        self.steps.append(rec)
        if len(self.steps) >= self.num_steps or not self.engine.has_unfinished_requests():
            self.finish()
        return out

    # ----- trace control ------------------------------------------------------------
    def _start(self) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        jax.profiler.start_trace(self.log_dir, create_perfetto_trace=True)
        self.state = "tracing"
        if self.verbose:
            print(f"[jaxllm] profiling {self.num_steps} {self.mode} steps into {self.log_dir}", flush=True)

    def finish(self) -> dict | None:
        """Stop the trace (if running), restore the engine, write jaxllm_profile.json. Idempotent."""
        if self.state == "done":
            return self.result
        was_tracing = self.state == "tracing"
        self.state = "done"
        for obj, name, before in self._patched:
            if before is not None:
                setattr(obj, name, before)
            elif name in vars(obj):
                delattr(obj, name)
        if not was_tracing:
            return None
        jax.profiler.stop_trace()
        result = {"log_dir": self.log_dir, "mode": self.mode, "num_steps": len(self.steps), "steps": self.steps}
        walls = [s["wall_s"] for s in self.steps]
        result["mean_step_s"] = sum(walls) / len(walls) if walls else None
        dec = [s["wall_s"] for s in self.steps if s["kind"] == "decode"]
        result["mean_decode_step_s"] = sum(dec) / len(dec) if dec else None
        if self.want_cost and self._last_inputs is not None:
            try:
                result.update(self._cost_analysis())
            except Exception as e:  # noqa: BLE001 - a report without costs still helps
                result["cost_analysis_error"] = f"{type(e).__name__}: {e}"
        with open(os.path.join(self.log_dir, PROFILE_JSON), "w") as f:
            json.dump(result, f, indent=2, default=str)
        if self.verbose:
            ms = 1e3 * (result["mean_step_s"] or 0)
            print(f"[jaxllm] profile of {len(self.steps)} steps written to {self.log_dir} "
                  f"(mean step {ms:.2f} ms); summarise with: python bench/profile_report.py {self.log_dir}",
                  flush=True)
        self.result = result
        return result

    def _cost_analysis(self) -> dict:
        """Lower + compile the step for the last traced bucket (off the trace): FLOPs, bytes, HLO."""
        r = self.runner
        traces = getattr(r, "num_traces", None)
        t0 = time.perf_counter()
        compiled = r._step_lowering(self._last_inputs).compile()  # the runner knows its step's arguments
        if traces is not None:
            r.num_traces = traces  # lowering for analysis is not a serving-path compile
        ca = compiled.cost_analysis()
        if isinstance(ca, (list, tuple)):
            ca = ca[0] if ca else {}
        ca = {k: float(v) for k, v in (ca or {}).items()
              if k in ("flops", "bytes accessed", "transcendentals", "optimal_seconds", "utilization")
              or k.startswith("bytes accessed")}
        with open(os.path.join(self.log_dir, HLO_FILE), "w") as f:
            f.write(compiled.as_text())
        tokens = int(self._last_inputs.tokens.shape[0])
        return {"cost_analysis": ca, "cost_bucket_tokens": tokens, "hlo_file": HLO_FILE,
                "cost_compile_s": time.perf_counter() - t0}
