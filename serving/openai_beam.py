"""Beam search on /v1/completions and /v1/chat/completions (vLLM's extra fields ``use_beam_search``
and ``length_penalty``; no jax).

As vLLM: ``n`` is the beam width and the number of choices returned, best first; ``temperature``
unset is 1.0 (vLLM's default on this path: the sampled token joins each beam's candidates);
``max_tokens``, ``ignore_eos`` and ``include_stop_str_in_output`` are honoured; a choice's text is
its generated tokens without a final EOS. A streamed beam search answers as vLLM's does: one chunk
per choice with the whole text once the search ends, then ``[DONE]``. Fields the search cannot
honour (stop strings, stop ids, logit bias, structured outputs, tools, echo, prompt logprobs,
min_tokens) are refused in one line instead of being ignored.

Each prompt runs as a ``BeamSearchRun`` (jaxllm/beam_search.py) whose engine requests go through
the front door like any request (admission, drain, abort when the client leaves).
"""

from __future__ import annotations

import asyncio
from typing import Any

from jaxllm.beam_search import BeamSearchParams, BeamSearchRun
from jaxllm.engine.intake import validate_prompt_ids
from jaxllm.outputs import CompletionOutput, RequestOutput

from serving.frontdoor import Code, FrontDoor, FrontDoorError, invalid

_REFUSED = ("stop", "stop_token_ids", "logit_bias", "response_format", "structured_outputs", "prompt_logprobs",
            "min_tokens", "tools")


def beam_params(job, body) -> None:
    """Check a ``use_beam_search`` body and give ``job`` its BeamSearchParams and prompt ids."""
    for name in _REFUSED:
        v = getattr(body, name, None)
        if v not in (None, 0, [], "") and not (name == "response_format" and v.type == "text"):
            raise invalid(f"{name} is invalid with use_beam_search=true: beam search honours n, max_tokens, "
                          f"temperature, length_penalty, ignore_eos and include_stop_str_in_output", name)
    if getattr(body, "echo", False):
        raise invalid("echo=true is invalid with use_beam_search=true", "echo")
    if job.reasoning is not None:
        raise invalid("use_beam_search=true is invalid under --reasoning-parser: the reasoning split "
                      "applies to sampled outputs only", "use_beam_search")
    p = job.params
    try:
        job.beam = BeamSearchParams(
            beam_width=p.n, max_tokens=p.max_tokens, ignore_eos=p.ignore_eos,
            temperature=1.0 if body.temperature is None else body.temperature,
            length_penalty=body.length_penalty, include_stop_str_in_output=p.include_stop_str_in_output)
    except ValueError as exc:
        field = "n" if str(exc).startswith("beam_width") else None
        raise invalid(str(exc).replace("beam_width=", "n="), field) from None
    info = job.info
    ids = []
    for k, prompt in enumerate(job.prompts):
        try:
            if isinstance(prompt, str):
                ids.append(list(info.tokenizer.encode(prompt)))
            else:
                ids.append(list(prompt["prompt_token_ids"]))
            validate_prompt_ids(ids[-1], info.vocab_size, info.max_model_len)
        except ValueError as exc:
            raise invalid(str(exc), "prompt" if job.kind == "completion" else "messages") from None
    job.beam_prompt_ids = ids


class BeamRequest:
    """One prompt's beam search, shaped like a front-door ``Request`` for the response writers:
    ``next_batch()`` runs the search and returns ``[RequestOutput]`` with its ``n`` best beams;
    ``aclose()`` aborts whatever engine requests are left (client gone, error)."""

    def __init__(self, door: FrontDoor, job, k: int):
        info = job.info
        self.door = door
        self.job = job
        self.finished = False
        self.prompt = job.prompts[k]
        self.prompt_ids = job.beam_prompt_ids[k]
        self.eos = set(getattr(info.tokenizer, "eos_token_ids", ()) or ())
        self.run = BeamSearchRun(f"{job.id}-{k}", self.prompt_ids, job.beam, self.eos,
                                 info.max_model_len, info.lora)
        self._open: dict[str, tuple[Any, Any]] = {}  # rid -> (door.request context, its Request)

    async def next_batch(self) -> list:
        if self.finished:
            return []
        run = self.run
        while True:
            for rid, ids, sp, fork_of in run.take_adds():  # added (parents still running) before the aborts
                cm = self.door.request(rid, {"prompt_token_ids": ids}, sp, run.lora_request, self.job.priority,
                                       fork_of=fork_of)
                self._open[rid] = (cm, await cm.__aenter__())
            for rid in run.take_aborts():
                await self._close(rid)
            if run.done:
                break
            while not run.ready():
                lagging = run.lagging_request_ids()
                batches = await asyncio.gather(*(self._open[rid][1].next_batch() for rid in lagging))
                for rid, batch in zip(lagging, batches):
                    if not batch:
                        raise FrontDoorError(Code.INTERNAL, f"beam request {rid} ended before the search needed it")
                    run.feed(rid, batch[-1])
            run.advance()
        self.finished = True
        return [self._final()]

    async def _close(self, rid: str) -> None:
        cm, _ = self._open.pop(rid)
        await cm.__aexit__(None, None, None)

    async def aclose(self) -> None:
        for rid in list(self._open):
            await self._close(rid)

    def _final(self) -> RequestOutput:
        job, n0 = self.job, len(self.prompt_ids)
        tok = job.info.tokenizer
        best = self.run.output(tok).sequences
        outs = []
        for i, s in enumerate(best):
            gen = s.tokens[n0:]
            shown = gen[:-1] if gen and gen[-1] in self.eos and not job.beam.ignore_eos else gen
            outs.append(CompletionOutput(
                index=i, text=tok.decode(shown, skip_special_tokens=False), token_ids=gen,
                cumulative_logprob=s.cum_logprob,
                logprobs=s.logprobs if job.params.logprobs is not None else None,
                finish_reason=s.finish_reason, stop_reason=s.stop_reason))
        text = self.prompt if isinstance(self.prompt, str) else self.prompt.get("prompt")
        return RequestOutput(request_id=f"{job.id}-beam", prompt=text, prompt_token_ids=self.prompt_ids,
                             outputs=outs, finished=True)
