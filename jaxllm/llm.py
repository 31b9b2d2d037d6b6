"""The offline API: ``LLM(model=..., **engine kwargs).generate(prompts, SamplingParams(...))``.

``LLM`` builds an ``EngineConfig`` from its keyword arguments (named like vLLM's) and the real
engine through ``jaxllm.engine.factory.build_engine(config)`` (imported lazily: this module
imports no jax). Tests, or callers holding an engine already, pass ``engine=``.

``disable_log_stats=False`` (vLLM's flag; default True offline, as vLLM's ``LLM``) attaches a
``LoggingStatLogger``: a one-line throughput / queue / KV-cache summary every
``log_stats_interval`` seconds while generating, and one when a ``generate`` call ends.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

import msgspec

from jaxllm.beam_offline import run_offline
from jaxllm.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchRun
from jaxllm.config import EngineConfig
from jaxllm.lora.loader import LoRALoadError
from jaxllm.metrics.loggers import LoggingStatLogger, validate_interval
from jaxllm.outputs import (ClassificationRequestOutput, EmbeddingRequestOutput, RequestOutput, ScoringOutput,
                            ScoringRequestOutput)
from jaxllm.tokenizer import check_text_parts, parse_tool_call_arguments
from jaxllm.pooling_params import PoolingParams
from jaxllm.sampling_params import RequestOutputKind, SamplingParams


class LLM:
    def __init__(self, model: str = "", *, engine=None, disable_log_stats: bool = True,
                 log_stats_interval: float = 10.0, **engine_kwargs) -> None:
        fields = set(EngineConfig.__struct_fields__)
        for k in engine_kwargs:
            if k not in fields:
                raise ValueError(f"{k}={engine_kwargs[k]!r} is invalid: unknown engine argument; "
                                 f"expected one of {sorted(fields - {'model'})}")
        self.config = EngineConfig(model=model, **engine_kwargs).validate()
        validate_interval(log_stats_interval)
        if engine is None:
            from jaxllm.engine.factory import build_engine  # the real runner: jax lives there
            engine = build_engine(self.config)
        self.engine = engine
        self._ids = itertools.count()
        self.stat_logger: LoggingStatLogger | None = None
        if not disable_log_stats:
            self.stat_logger = LoggingStatLogger(log_stats_interval)
            engine.add_stat_logger(self.stat_logger)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: the SamplingParams that ``generate`` / ``chat`` use when given none: jaxllm's defaults
        with the model's generation_config.json values laid over them (``generation_config``,
        ``override_generation_config``; jaxllm/generation_config.py). A new object each call."""
        defaults = getattr(self.engine, "generation_defaults", None)
        return defaults.sampling_params() if defaults is not None else SamplingParams()

    # ----- generation ---------------------------------------------------------------
    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora_request=None,
                 priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order.

        ``prompts``: one prompt or a list of them; a prompt is a ``str``, a list of token ids
        or a dict with ``prompt_token_ids`` / ``prompt``. ``sampling_params``: one for all, or
        one per prompt; None = ``get_default_sampling_params()`` (the model's generation config).
        ``lora_request``: a ``LoRARequest`` for all, or a list with one per prompt (None entries:
        the base model); needs ``enable_lora=True``. ``priority``: one int per
        prompt (vLLM's), lower runs first; needs ``scheduling_policy="priority"`` unless all are 0."""
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompts), self.get_default_sampling_params)
        return self._run(prompts, params, use_tqdm, _as_lora_list(lora_request, len(prompts)),
                         _as_priority_list(priority, len(prompts)))

    def beam_search(self, prompts, params: BeamSearchParams, lora_request=None,
                    use_tqdm: bool = False, concurrency_limit: int | None = None) -> list[BeamSearchOutput]:
        """vLLM's ``LLM.beam_search``: the best ``params.beam_width`` sequences of every prompt
        (jaxllm/beam_search.py has the algorithm and its cost). ``prompts``: one prompt or a list,
        each a ``str``, a list of token ids or a dict with ``prompt_token_ids`` / ``prompt`` (a chat:
        ``llm.get_tokenizer().chat_prompt(messages)``). ``lora_request``: one for all or one per
        prompt. ``concurrency_limit``: at most this many prompts searched at once (each holds up to
        ``beam_width`` running requests); None = as many as ``max_num_seqs // beam_width`` (at least
        1), so every live beam runs in every step (vLLM's None = all). ``beam_width > max_num_seqs``
        works, slower: the beams of a depth take turns in the slots (held ones are preempted for the
        waiting ones: jaxllm/core/scheduler.py, step gates). Everything is
        validated before the engine sees a request; on any error every request of this call is
        aborted (no KV block stays held)."""
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params of type {type(params).__name__} is invalid: must be a BeamSearchParams")
        params.validate()
        if concurrency_limit is not None and (isinstance(concurrency_limit, bool) or not isinstance(
                concurrency_limit, int) or concurrency_limit < 1):
            raise ValueError(f"concurrency_limit={concurrency_limit!r} is invalid: must be None or an integer >= 1")
        engine = self.engine
        prompts = _as_prompt_list(prompts)
        loras = _as_lora_list(lora_request, len(prompts)) or [None] * len(prompts)
        runs = []
        for prompt, lora in zip(prompts, loras):
            _, ids = engine._resolve_prompt(prompt)
            engine._validate_ids(ids)
            runs.append(BeamSearchRun(f"beam-{next(self._ids)}", ids, params, engine.eos_token_ids,
                                      engine.max_model_len, lora, step_gate=True))
        max_seqs = getattr(getattr(engine, "config", None), "max_num_seqs", None)
        limit = concurrency_limit or (max(1, max_seqs // params.beam_width) if max_seqs else len(runs))
        bar = _progress(len(runs), use_tqdm)
        try:
            run_offline(engine, runs, limit, bar)  # jaxllm/beam_offline.py
        finally:
            if bar is not None:
                bar.close()
        tok = self.get_tokenizer()
        return [run.output(tok) for run in runs]

    # ----- adapters (vLLM's LLMEngine methods) -------------------------------------------
    def add_lora(self, lora_request) -> bool:
        return self.engine.add_lora(lora_request)

    def remove_lora(self, lora_id: int) -> bool:
        return self.engine.remove_lora(lora_id)

    def list_loras(self) -> set[int]:
        return self.engine.list_loras()

    # ----- sleep mode (vLLM's; LLM(enable_sleep_mode=True); jaxllm/engine/sleep_requests.py) ------------
    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        """Free the accelerator: level 1 moves the weights to host RAM and discards the KV cache, level 2
        discards both (after wake_up the weights are zeros until load_weights (every tensor) or
        reload_weights writes them; requests are refused meanwhile). Unfinished requests are aborted (vLLM's mode
        "abort"); the prefix cache is reset. Requests are refused until ``wake_up()``."""
        self.engine.sleep(level, mode)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Restore "weights" and/or "kv_cache" (None: both); nothing compiles again."""
        self.engine.wake_up(tags)

    def is_sleeping(self) -> bool:
        return self.engine.is_sleeping()

    # ----- weight updates in place (vLLM's RLHF calls; jaxllm/engine/weight_requests.py) -------------
    def load_weights(self, weights) -> int:
        """Write ``weights`` ((HF tensor name, numpy / jax / torch CPU array) pairs, a full or partial set)
        into the model in place: same shardings, nothing compiles; the prefix cache is reset. The engine
        must be idle. Returns the number of tensors applied; ValueError naming a refused tensor."""
        return self.engine.load_weights(weights)

    def reload_weights(self, path: str | None = None) -> None:
        """Load the checkpoint directory ``path`` (None: the one the engine was built from) in place."""
        self.engine.reload_weights(path)

    def collective_rpc(self, method, args=(), kwargs=None) -> list:
        """vLLM's ``LLM.collective_rpc`` for ``"reload_weights"`` / ``"load_weights"``; other methods refused."""
        return self.engine.collective_rpc(method, args, kwargs)

    def embed(self, prompts, pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
              use_tqdm: bool = True) -> list[EmbeddingRequestOutput]:
        """Embed every prompt (an engine built with ``task="embed"``, or auto-detected from the
        checkpoint); outputs come back in input order, ``out.outputs.embedding`` a list of
        hidden_size floats. ``pooling_params``: one for all, or one per prompt (None = the
        engine's pooling_type / normalize)."""
        self._need_task("embed", "embed")
        return self._run(*self._pooling_list(prompts, pooling_params), use_tqdm)

    def classify(self, prompts, pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
                 use_tqdm: bool = True) -> list[ClassificationRequestOutput]:
        """Classify every prompt (a *ForSequenceClassification checkpoint: task "classify", auto-detected);
        ``out.outputs.probs``: the num_labels logits of the prompt's last token after the model's
        activation (softmax; sigmoid for one label; ``PoolingParams(activation=False)``: raw)."""
        self._need_task("classify", "classify")
        return self._run(*self._pooling_list(prompts, pooling_params), use_tqdm)

    def score(self, text_1, text_2, truncate_prompt_tokens: int | None = None, use_tqdm: bool = True,
              chat_template: str | None = None, chat_template_kwargs: dict | None = None) -> list[ScoringRequestOutput]:
        """vLLM's ``LLM.score``: ``text_1`` against ``text_2`` (1:1, 1:N or N:N), one output per pair
        in ``text_2``'s order. A cross-encoder (classify, num_labels == 1) scores the pair encoding
        ``tokenizer(text_1, text_2)`` (``text_1 + text_2`` for an LLM as reranker), or with
        ``chat_template`` (a Jinja string, vLLM's score template) the template's rendering of
        ``[{"role": "query", "content": text_1}, {"role": "document", "content": text_2}]`` (and the
        ``chat_template_kwargs`` variables, a jaxllm extension) tokenized as one text: the model's
        score activation (sigmoid) of its logit. An embedding model scores the cosine of the two
        embeddings and ignores the template, as vLLM does (jaxllm/scoring.py). A template that fails
        to render or renders blank is a ValueError naming ``chat_template``."""
        from jaxllm import scoring

        task = getattr(self.engine, "task", "generate")
        if task not in ("embed", "classify"):
            raise ValueError(f"task={task!r} is invalid for score(): build the LLM from an embedding or "
                             f"cross-encoder model")
        t1, t2 = scoring.pair_lists(text_1, text_2)
        params = PoolingParams(truncate_prompt_tokens=truncate_prompt_tokens).validate()
        if task == "classify":
            mc = self.engine.runner.model_config
            scoring.check_cross_encoder(mc)
            template = scoring.score_template(chat_template, "chat_template", chat_template_kwargs)
            ids = scoring.pair_prompts(self.get_tokenizer(), t1, t2, truncate_prompt_tokens, mc.use_sep_token,
                                       template)
            raw = PoolingParams(activation=False)
            outs = self._run(ids, [raw] * len(ids), use_tqdm)
            scores = scoring.cross_encoder_scores([o.outputs.probs for o in outs], mc)
            toks = [o.prompt_token_ids for o in outs]
        else:  # every text embedded once (a 1:N text_1 too), in one batch
            outs = self._run(t1 + t2, [params] * (len(t1) + len(t2)), use_tqdm)
            vecs = [o.outputs.embedding for o in outs]
            scores = scoring.cosine_scores(vecs[:len(t1)], vecs[len(t1):])
            ones = outs[:len(t1)] * (len(t2) // len(t1))
            toks = [a.prompt_token_ids + b.prompt_token_ids for a, b in zip(ones, outs[len(t1):])]
        return [ScoringRequestOutput(request_id=f"score-{next(self._ids)}", outputs=ScoringOutput(score=float(s)),
                                     prompt_token_ids=t) for s, t in zip(scores, toks)]

    def _need_task(self, task: str, method: str) -> None:
        have = getattr(self.engine, "task", "generate")
        if have != task:
            raise ValueError(f"task={have!r} is invalid for {method}(): build the LLM with task={task!r}")

    def _pooling_list(self, prompts, pooling_params) -> tuple[list, list]:
        prompts = _as_prompt_list(prompts)
        if pooling_params is None or isinstance(pooling_params, PoolingParams):
            return prompts, [pooling_params or PoolingParams()] * len(prompts)
        params = list(pooling_params)
        if len(params) != len(prompts):
            raise ValueError(f"pooling_params has {len(params)} entries, which is invalid: must be one "
                             f"PoolingParams or exactly one per prompt ({len(prompts)})")
        return prompts, params

    def chat(self, conversations, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, lora_request=None, add_generation_prompt: bool = True,
             chat_template: str | None = None, continue_final_message: bool = False,
             tools: list[dict] | None = None, chat_template_kwargs: dict | None = None,
             priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """``conversations``: one list of ``{"role", "content"}`` messages, or a list of them. Each
        is rendered with the model's chat template (or ``chat_template``, a Jinja string); the
        outputs' ``prompt`` is the rendered text. ``continue_final_message``: the last message
        (an assistant prefix) is continued instead of a new turn being opened (then pass
        ``add_generation_prompt=False``). ``tools``: OpenAI function tools
        (``[{"type": "function", "function": {"name", "description", "parameters"}}]``), given to
        the template as its ``tools`` variable (rendered only: the output is not parsed, as
        vLLM's ``LLM.chat``); ``chat_template_kwargs``: more template variables.
        ``lora_request``, ``priority``: as in ``generate``."""
        if not isinstance(conversations, (list, tuple)) or not conversations:
            raise ValueError(f"conversations={conversations!r} is invalid: must be a non-empty list "
                             f"of messages or of conversations")
        if isinstance(conversations[0], dict):
            conversations = [conversations]
        tok = self.get_tokenizer()
        prompts = []
        for i, conv in enumerate(conversations):
            if not isinstance(conv, (list, tuple)) or not all(isinstance(m, dict) for m in conv):
                raise ValueError(f"conversations[{i}]={conv!r} is invalid: must be a list of "
                                 f"message dicts")
            kw = {k: v for k, v in (("tools", tools), ("chat_template_kwargs", chat_template_kwargs)) if v}
            check_text_parts(conv, f"conversations[{i}]")
            conv = parse_tool_call_arguments(list(conv), f"conversations[{i}]")
            prompts.append(tok.chat_prompt(conv, add_generation_prompt, chat_template=chat_template,
                                           continue_final_message=continue_final_message, **kw))
        params = _as_params_list(sampling_params, len(prompts), self.get_default_sampling_params)
        return self._run(prompts, params, use_tqdm, _as_lora_list(lora_request, len(prompts)),
                         _as_priority_list(priority, len(prompts)))

    def _run(self, prompts: list, params: list, use_tqdm: bool, loras: list | None = None,
             priorities: list[int] | None = None) -> list:
        engine = self.engine
        ids: list[str] = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                rid = f"llm-{next(self._ids)}"
                kw = {}  # engines without adapters or priorities need not take the keywords
                if loras is not None and loras[i] is not None:
                    kw["lora_request"] = loras[i]
                if priorities is not None and priorities[i] != 0:
                    kw["priority"] = priorities[i]
                if isinstance(p, SamplingParams) and p.output_kind != RequestOutputKind.FINAL_ONLY:
                    p = p.clone(output_kind=RequestOutputKind.FINAL_ONLY)  # only finals are read (as vLLM's LLM)
                engine.add_request(rid, prompt, p, **kw)
                ids.append(rid)
        except BaseException:
            engine.abort_request(ids)  # all or nothing: nothing half-submitted keeps running
            raise
        pending = set(ids)
        finals: dict[str, RequestOutput] = {}
        bar = _progress(len(ids), use_tqdm)
        start = time.perf_counter()
        out_tokens = 0
        try:
            while pending:
                if not engine.has_unfinished_requests():
                    raise RuntimeError(f"engine has no unfinished requests but {len(pending)} of "
                                       f"this call's requests never finished")
                outs = engine.step()
                errors = {r: e for r, e in engine.take_request_errors().items() if r in pending}
                if errors:
                    rid, exc = next(iter(errors.items()))
                    pending.difference_update(errors)
                    if isinstance(exc, LoRALoadError):  # a bad adapter (its load ran off-thread): bad input
                        raise exc
                    raise RuntimeError(f"request {rid} (prompt {ids.index(rid)}) failed: "
                                       f"{type(exc).__name__}: {exc}") from exc
                for out in outs:
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        finals[out.request_id] = out
                        pooled = isinstance(out, (EmbeddingRequestOutput, ClassificationRequestOutput))
                        out_tokens += (len(out.prompt_token_ids) if pooled
                                       else sum(len(c.token_ids) for c in out.outputs))
                        if bar is not None:
                            rate = out_tokens / max(time.perf_counter() - start, 1e-9)
                            kind = "prompt" if pooled else "output"
                            bar.set_postfix_str(f"{kind} {rate:.1f} tok/s", refresh=False)
                            bar.update(1)
        except BaseException:
            engine.abort_request(list(pending))
            raise
        finally:
            if bar is not None:
                bar.close()
        if self.stat_logger is not None:
            self.stat_logger.log()  # the last interval's line, however short the run
        return [finals[i] for i in ids]


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="Processed prompts", unit="req", dynamic_ncols=True)


def _is_token_list(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(
        isinstance(t, int) and not isinstance(t, bool) for t in x)


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, (str, dict)) or _is_token_list(prompts):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise ValueError("prompts=[] is invalid: give at least one prompt")
        return list(prompts)
    raise ValueError(f"prompts of type {type(prompts).__name__} is invalid: must be a prompt "
                     f"(str, token id list, dict) or a list of prompts")


def _as_lora_list(lora_request, n: int) -> list | None:
    if lora_request is None:
        return None
    if isinstance(lora_request, (list, tuple)):
        if len(lora_request) != n:
            raise ValueError(f"lora_request has {len(lora_request)} entries, which is invalid: must be one "
                             f"LoRARequest or exactly one per prompt ({n})")
        return list(lora_request)
    return [lora_request] * n


def _as_priority_list(priority, n: int) -> list[int] | None:
    if priority is None:
        return None
    if not isinstance(priority, (list, tuple)) or len(priority) != n:
        raise ValueError(f"priority={priority!r} is invalid: must be a list with exactly one int per "
                         f"prompt ({n})")
    return list(priority)


def _as_params_list(sampling_params, n: int, default=SamplingParams) -> list[SamplingParams]:
    if sampling_params is None:
        return [default()] * n
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * n
    if isinstance(sampling_params, dict):
        return [msgspec.convert(sampling_params, SamplingParams)] * n
    sp = list(sampling_params)
    if len(sp) != n:
        raise ValueError(f"sampling_params has {len(sp)} entries, which is invalid: must be one "
                         f"SamplingParams or exactly one per prompt ({n})")
    return sp
