"""LLMEngine's embedding requests (mixin, no jax): admission of a ``PoolingParams`` request and
the step that finishes it. An embedding request is prefilled (chunked under the token budget like
any prompt), its chunks' pooled hidden states are added up on the host (``pooling.EmbedState``),
and it finishes (its KV blocks freed) in the step that computes its last prompt token."""

from __future__ import annotations

import time

from jaxllm.core.request import Request, RequestStatus
from jaxllm.engine.pooling import EmbedState
from jaxllm.outputs import EmbeddingRequestOutput
from jaxllm.pooling_params import PoolingParams
from jaxllm.sampling_params import SamplingParams


class EmbedRequestsMixin:
    def _add_embed_request(self, request_id: str, prompt, params: PoolingParams,
                           arrival_time: float | None, priority: int = 0) -> None:
        params = params.validate()
        activation = None
        if self.task == "classify":
            activation = self._check_classify(params)
        else:
            if params.activation is not None:
                raise ValueError(f"activation={params.activation!r} is invalid for an embedding request: "
                                 f"this engine's task is 'embed' (activation is a classify request's)")
            params = params.resolved(*self.pooling_defaults)
            if params.dimensions is not None:
                self._check_dimensions(params.dimensions)
        text, ids = self._resolve_prompt(prompt)
        if params.truncate_prompt_tokens is not None:
            ids = ids[-params.truncate_prompt_tokens:]
        if not ids:
            raise ValueError("prompt=[] is invalid: the prompt must have at least 1 token")
        if len(ids) > self.max_model_len:
            raise ValueError(f"prompt length={len(ids)} tokens is invalid: must be <= "
                             f"max_model_len={self.max_model_len}")
        from jaxllm.engine.intake import validate_prompt_ids

        validate_prompt_ids(ids, self.vocab_size, self.max_model_len + 1)
        self._check_new_id(request_id)
        # -- everything valid --
        arrival = time.time() if arrival_time is None else arrival_time
        req = Request(request_id, ids, SamplingParams(max_tokens=1), seed=0, arrival_time=arrival,
                      max_output_tokens=0, pooling=params, priority=priority)
        st = self._embeds[request_id] = EmbedState(req, text, arrival, activation)
        st.in_stats = self._in_stats(request_id)
        self.scheduler.add_request(req)
        if st.in_stats:
            self.num_prompt_tokens += len(ids)

    def _check_classify(self, params: PoolingParams) -> str:
        """The activation of a classify request (the model's, vLLM's rule); ValueError naming a field
        a classifier cannot honour (its head reads the last token's final-norm hidden state)."""
        if params.pooling_type not in (None, "LAST"):
            raise ValueError(f"pooling_type={params.pooling_type!r} is invalid for task='classify': the "
                             f"classifier head reads the last token (LAST)")
        for name in ("normalize", "dimensions"):
            if getattr(params, name) is not None:
                raise ValueError(f"{name}={getattr(params, name)!r} is invalid for task='classify': it is an "
                                 f"embedding request's field")
        return self.runner.model_config.classify_activation

    def _check_dimensions(self, d: int) -> None:
        """vLLM's Matryoshka rule: ``dimensions`` only for a Matryoshka model, one of its
        ``matryoshka_dimensions`` when it lists them; ValueError naming the value and the allowed."""
        c = self.config
        mc = getattr(self.runner, "model_config", None)
        size = getattr(mc, "hidden_size", None) or getattr(self.runner, "hidden_size", None)
        if not (c.is_matryoshka or c.matryoshka_dimensions):
            raise ValueError(f"dimensions={d} is invalid: this model is not a Matryoshka model (no is_matryoshka / "
                             f"matryoshka_dimensions in its config), its embeddings are returned whole"
                             + (f" ({size} dimensions)" if size else ""))
        if c.matryoshka_dimensions and d not in c.matryoshka_dimensions:
            raise ValueError(f"dimensions={d} is invalid: must be one of the model's matryoshka_dimensions "
                             f"{sorted(c.matryoshka_dimensions)}")
        if size and d > size:
            raise ValueError(f"dimensions={d} is invalid: must be <= the embedding size {size}")

    def _finish_embeddings(self, out, now: float, it=None) -> list[EmbeddingRequestOutput]:
        """File step ``out``'s pooled chunks; finish (free the blocks of) every embedding request
        whose last prompt chunk it computed (into ``it``, the step's ``IterationStats``, when stats
        are recorded). A request aborted or preempted meanwhile is skipped (a preempted one is
        recomputed from position 0)."""
        chunks = self.runner.take_pooled()
        done = []
        for seq, req in zip(out.seqs, out.requests):
            st = self._embeds.get(seq.request_id)
            if st is None or st.req is not req or not self.scheduler.holds(req):
                continue
            if req.num_computed_tokens < seq.start_pos + len(seq.token_ids):
                continue  # preempted after this step was scheduled: its chunks are recomputed
            if st.add(seq.start_pos, len(seq.token_ids), chunks[seq.request_id]):
                done.append(st)
        outs = []
        for st in done:
            rid = st.req.request_id
            self.scheduler.finish_requests([rid], RequestStatus.FINISHED_STOPPED)
            del self._embeds[rid]
            outs.append(st.output(now))
            if it is not None and st.in_stats:
                it.add_embedding(st.req, "stop", st.arrival_time, now)
        return outs

    def _abort_embedding(self, rid: str, it) -> None:
        """Drop embedding request ``rid`` (no output: an aborted embedding has no vector), free its
        blocks, and file it as "abort" into ``it`` when stats are recorded."""
        st = self._embeds.pop(rid)
        self.scheduler.finish_requests([rid], RequestStatus.FINISHED_ABORTED)
        if it is not None and st.in_stats:
            it.add_embedding(st.req, "abort", st.arrival_time, time.time())
