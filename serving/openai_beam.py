"""Beam search on /v1/completions and /v1/chat/completions (vLLM's extra fields ``use_beam_search``
and ``length_penalty``; no jax). The search itself, its field rules and ``BeamRequest`` are the
transport-neutral serving/beam.py (shared with the gRPC door); here are the HTTP body's own
refusals (``response_format``, ``tools``, ``echo``, a ``--reasoning-parser`` split).

A streamed beam search answers as vLLM's does: one chunk per choice with the whole text once the
search ends, then ``[DONE]``.
"""

from __future__ import annotations

from serving.beam import REFUSED, BeamRequest, is_set, prompt_ids, refused, search_params
from serving.frontdoor import FrontDoor, invalid

_REFUSED = REFUSED + ("response_format", "tools")


def beam_params(job, body) -> None:
    """Check a ``use_beam_search`` body and give ``job`` its BeamSearchParams and prompt ids."""
    for name in _REFUSED:
        v = getattr(body, name, None)
        if is_set(v) and not (name == "response_format" and v.type == "text"):
            raise refused(name)
    if getattr(body, "echo", False):
        raise invalid("echo=true is invalid with use_beam_search=true", "echo")
    if job.reasoning is not None:
        raise invalid("use_beam_search=true is invalid under --reasoning-parser: the reasoning split "
                      "applies to sampled outputs only", "use_beam_search")
    job.beam = search_params(job.params, body.temperature, body.length_penalty)
    job.beam_prompt_ids = prompt_ids(job.prompts, job.info, "prompt" if job.kind == "completion" else "messages")


def beam_request(door: FrontDoor, job, k: int) -> BeamRequest:
    """The search of ``job``'s prompt ``k`` (engine requests ``f"{job.engine_id}-{k}.{i}"``)."""
    return BeamRequest(door, job.info, f"{job.engine_id}-{k}", f"{job.id}-beam", job.prompts[k], job.beam_prompt_ids[k],
                       job.beam, job.priority, logprobs=job.params.logprobs is not None)
