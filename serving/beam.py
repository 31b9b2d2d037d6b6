"""Beam search through the front door, whatever the transport (no jax): the HTTP door's
``use_beam_search`` (serving/openai_beam.py) and the gRPC door's ``SamplingParams.use_beam_search``
(serving/servicer.py) share the checks and ``BeamRequest`` here.

As vLLM: ``n`` is the beam width and the number of beams returned, best first; ``temperature``
unset is 1.0 (vLLM's default on this path: the sampled token joins each beam's candidates);
``max_tokens``, ``ignore_eos`` and ``include_stop_str_in_output`` are honoured; a beam's text is
its generated tokens without a final EOS. The sampling fields a search cannot honour (``REFUSED``)
are refused in one line naming the field instead of being ignored.

Each prompt runs as a ``BeamSearchRun`` (jaxllm/beam_search.py) whose engine requests go through
the front door like any request (admission, drain, abort when the client leaves), step-gated
(``step_gate=True``): the engine computes a beam's next token only once this driver has decided the
depth and released it (``release_step``), so no beam decodes tokens the search drops and a fork
always finds its parent's partial block to copy.
"""

from __future__ import annotations

import asyncio
from typing import Any

from jaxllm.beam_search import BeamSearchParams, BeamSearchRun
from jaxllm.engine.intake import validate_prompt_ids
from jaxllm.outputs import CompletionOutput, RequestOutput
from jaxllm.sampling_params import SamplingParams

from serving.frontdoor import Code, FrontDoor, FrontDoorError, ModelInfo, invalid

# SamplingParams fields (same names on the HTTP body and the proto) a beam search cannot honour
REFUSED = ("stop", "stop_token_ids", "logit_bias", "structured_outputs", "prompt_logprobs", "min_tokens")
HONOURED = "beam search honours n, max_tokens, temperature, length_penalty, ignore_eos and include_stop_str_in_output"


def refused(name: str) -> FrontDoorError:
    return invalid(f"{name} is invalid with use_beam_search=true: {HONOURED}", name)


def is_set(value: Any) -> bool:
    """A refused field counts as set unless it is empty, 0 or None (0 prompt logprobs included)."""
    return value not in (None, 0, [], "", {})


def refuse_params(params: SamplingParams) -> None:
    """Refuse (INVALID_ARGUMENT naming the field) a REFUSED field set on ``params``."""
    for name in REFUSED:
        if is_set(getattr(params, name)):
            raise refused(name)


def search_params(params: SamplingParams, temperature: float | None, length_penalty: float) -> BeamSearchParams:
    """The BeamSearchParams of checked ``params`` (``n`` = the beam width); ``temperature`` None (the
    request's unset) = ``params``' own: the model's generation config default, else 1.0 (vLLM's). A bad
    value is INVALID_ARGUMENT naming the request's field (``n``, not beam_width)."""
    try:
        return BeamSearchParams(
            beam_width=params.n, max_tokens=params.max_tokens, ignore_eos=params.ignore_eos,
            temperature=params.temperature if temperature is None else temperature, length_penalty=length_penalty,
            include_stop_str_in_output=params.include_stop_str_in_output)
    except ValueError as exc:
        msg = str(exc)
        field = "n" if msg.startswith("beam_width") else msg.split("=", 1)[0]
        raise invalid(msg.replace("beam_width=", "n="), field) from None


def prompt_ids(prompts: list[Any], info: ModelInfo, field: str) -> list[list[int]]:
    """Each prompt (a str or ``{"prompt_token_ids": [...]}``) as checked token ids; a bad one is
    INVALID_ARGUMENT naming ``field``."""
    ids = []
    for prompt in prompts:
        try:
            if isinstance(prompt, str):
                ids.append(list(info.tokenizer.encode(prompt)))
            else:
                ids.append(list(prompt["prompt_token_ids"]))
            validate_prompt_ids(ids[-1], info.vocab_size, info.max_model_len)
        except ValueError as exc:
            raise invalid(str(exc), field) from None
    return ids


class BeamRequest:
    """One prompt's beam search, shaped like a front-door ``Request`` for the response writers:
    ``next_batch()`` runs the search and returns ``[RequestOutput]`` with its ``n`` best beams
    (``request_id`` = ``request_id``); ``aclose()`` aborts whatever engine requests are left
    (client gone, error). The engine requests are ``f"{rid_prefix}.{i}"``."""

    step_gate = True  # False: the ungated driver (beams run ahead of it), for bench/beam_overhead.py only

    def __init__(self, door: FrontDoor, info: ModelInfo, rid_prefix: str, request_id: str, prompt: Any,
                 prompt_ids: list[int], beam: BeamSearchParams, priority: int = 0, logprobs: bool = False):
        self.door = door
        self.info = info
        self.request_id = request_id
        self.beam = beam
        self.priority = priority
        self.logprobs = logprobs
        self.finished = False
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.eos = set(getattr(info.tokenizer, "eos_token_ids", ()) or ())
        self.run = BeamSearchRun(rid_prefix, prompt_ids, beam, self.eos, info.max_model_len, info.lora,
                                 step_gate=self.step_gate)
        self._open: dict[str, tuple[Any, Any]] = {}  # rid -> (door.request context, its Request)

    async def next_batch(self) -> list:
        if self.finished:
            return []
        run = self.run
        while True:
            for rid, ids, sp, fork_of in run.take_adds():  # added (parents still running) before the aborts
                cm = self.door.request(rid, {"prompt_token_ids": ids}, sp, run.lora_request, self.priority,
                                       fork_of=fork_of, step_gate=self.step_gate)
                self._open[rid] = (cm, await cm.__aenter__())
            for rid in run.take_aborts():
                await self._close(rid)
            for rid in run.take_releases():  # after the forks: they found their parents unmoved
                self.door.async_engine.release_step(rid)
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
        n0, tok = len(self.prompt_ids), self.info.tokenizer
        best = self.run.output(tok).sequences
        outs = []
        for i, s in enumerate(best):
            gen = s.tokens[n0:]
            shown = gen[:-1] if gen and gen[-1] in self.eos and not self.beam.ignore_eos else gen
            outs.append(CompletionOutput(
                index=i, text=tok.decode(shown, skip_special_tokens=False), token_ids=gen,
                cumulative_logprob=s.cum_logprob, logprobs=s.logprobs if self.logprobs else None,
                finish_reason=s.finish_reason, stop_reason=s.stop_reason))
        text = self.prompt if isinstance(self.prompt, str) else self.prompt.get("prompt")
        return RequestOutput(request_id=self.request_id, prompt=text, prompt_token_ids=self.prompt_ids,
                             outputs=outs, finished=True)
