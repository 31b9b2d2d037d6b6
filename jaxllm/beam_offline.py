"""The offline beam-search driver: ``LLM.beam_search``'s loop, stepping an ``LLMEngine`` itself until
every ``BeamSearchRun`` (jaxllm/beam_search.py, one per prompt) is done. The server's driver, on
another thread than its engine, is serving/beam.py. Host only, no jax.
"""

from __future__ import annotations

from jaxllm.beam_search import BeamSearchRun
from jaxllm.lora.loader import LoRALoadError


def run_offline(engine, runs: list[BeamSearchRun], limit: int, bar=None) -> None:
    """Step ``engine`` until every run of ``runs`` is done, feeding each its requests' outputs; at
    most ``limit`` runs are searched at once, a finished one making room for the next. ``bar``: a
    progress bar updated once per finished run, or None. A request error raises (a LoRALoadError
    as it is, others as RuntimeError naming the request); on any error every request the runs
    added and still hold is aborted (no KV block stays held)."""
    # A fork needs the step before it read back: with a step in flight (async scheduling) every
    # depth would take two steps and continued beams would decode a token ahead for nothing. The
    # offline engine runs nothing else meanwhile, so the search steps it synchronously.
    # Requests are step-gated as on the server: when a step's token budget splits a depth over
    # two steps, the beams already answered wait for the depth's decision instead of decoding on.
    was_async = getattr(engine, "async_scheduling", False) and not engine.has_unfinished_requests()
    if was_async:
        engine.async_scheduling = False
    owner: dict[str, BeamSearchRun] = {}
    started = 0  # runs[:started] have begun; a finished one makes room for the next
    try:
        while True:
            while started < len(runs) and sum(not r.done for r in runs[:started]) < limit:
                started += 1
            for run in runs[:started]:
                for rid, ids, sp, fork_of in run.take_adds():
                    kw = {} if run.lora_request is None else {"lora_request": run.lora_request}
                    engine.add_request(rid, {"prompt_token_ids": ids}, sp, fork_of=fork_of, step_gate=True, **kw)
                    owner[rid] = run
                aborts = run.take_aborts()
                if aborts:
                    engine.abort_request(aborts)
                    for rid in aborts:
                        owner.pop(rid, None)
                for rid in run.take_releases():
                    engine.release_step(rid)
            if all(run.done for run in runs):
                break
            if not engine.has_unfinished_requests():
                raise RuntimeError("engine has no unfinished requests but a beam search waits for "
                                   "its outputs")
            outs = engine.step()
            errors = {r: e for r, e in engine.take_request_errors().items() if r in owner}
            if errors:
                rid, exc = next(iter(errors.items()))
                if isinstance(exc, LoRALoadError):
                    raise exc
                raise RuntimeError(f"beam request {rid} failed: {type(exc).__name__}: {exc}") from exc
            for out in outs:
                run = owner.get(out.request_id)
                if run is not None:
                    run.feed(out.request_id, out)
            for run in runs[:started]:
                while run.ready():
                    run.advance()
                    if run.done and bar is not None:
                        bar.update(1)
    except BaseException:
        engine.abort_request(list(owner))
        raise
    finally:
        if was_async:
            engine.async_scheduling = True
