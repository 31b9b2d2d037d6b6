"""ModelRunner's compiled programs (mixin): the step programs (runner/step_programs.py) jitted, lowered
for each bucket and compiled ahead of time, one executable per key, all at warm-up; serving only
looks them up, so a compile after warm-up is a bug (``compile_count``, ``num_traces``).

Keys (the dict ``_executables``; tests and bench/step_memory.py read it):

- ``("step", T, S, decode_only)``: the base-only forward pass (a plain runner's only one);
  ``("step_lora", T, S, decode_only)``: the LoRA program (slot weights + a [T] slot index in);
- ``("sample", S)``: the sampling of S rows; with branchless sampling ``("sample", S, plan)``, one per
  SamplePlan (runner/sampler.py: the host picks the smallest plan per step);
- ``("prompt_lp", T)``: the prompt-logprobs pass over a step's T hidden states;
- ``("embed", T, S, False)``: an embed / classify runner's step (mixed buckets only);
- ``("copy_blocks",)``: the forks' whole-block KV copy; ``("set_lora", rank)``: a slot write per rank bucket.

What it reads from the runner: the device state the programs take (``state``, ``kv_cache``,
``counts``, ``prompt_mask``, ``last_tokens``, ``lora``), the shapes (``buckets``, ``num_rows``,
``eos_ids``, ``block_size``, ``max_blocks_per_seq``, ``max_model_len``, ``vocab_size``,
``num_kv_groups``, ``model_config``, ``state_dtype``), the modes (``task``,
``pooling``, ``branchless_sampling``, ``lora_base_program``, ``supports_prompt_logprobs``,
``supports_block_copy``) and ``_embed_inputs``.
"""
from __future__ import annotations

import concurrent.futures
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.runner.block_copy import COPY_CHUNK, copy_blocks
from jaxllm.runner.decode_tuning import choose_decode_kernel
from jaxllm.runner.inputs import StepInputs, build_inputs
from jaxllm.runner.sampler import FULL_PLAN, SAMPLE_PLANS, SamplePlan, plan_of
from jaxllm.runner.step_programs import step_programs


class ExecutablesMixin:
    def _init_programs(self, graphdef, layout, cache_sharding, scale_sharding) -> None:
        """Jit the step programs of `graphdef` (shardings pinned under tensor parallelism, so every
        step sees the same input shardings: no recompiles); nothing is compiled yet."""
        self.num_traces = 0  # traces of the step function (a trace after warm-up is a bug)
        self._executables: dict[tuple, object] = {}  # key (see the module doc) -> compiled executable
        programs = step_programs(graphdef, self._traced, self.branchless_sampling)
        fwd_kw, sample_kw, embed_kw, copy_kw = {}, {}, {}, {}
        self._logits_sharding = None
        if layout is not None:  # penalty state, logits and sampler outputs replicated
            rep = layout.replicated
            cache = self.kv_cache.like(cache_sharding, scale_sharding)
            fwd_kw["out_shardings"] = (cache, rep, rep, rep, rep)
            sample_kw["out_shardings"] = (rep, rep)
            embed_kw["out_shardings"] = (cache, rep) + ((rep,) if self.task == "embed" else ())
            copy_kw["out_shardings"] = cache
            self._logits_sharding = rep
        # a step = the forward pass (cache, penalty tables donated: updated in place), then sampling
        # decode_mha_group: the decode attention kernel (runner/decode_tuning.py, chosen at warm-up), static
        self._forward = jax.jit(programs.fed_forward, donate_argnums=(1, 2, 3), static_argnames=("decode_mha_group",),
                                **fwd_kw)
        self.decode_mha_group = None  # the head group decode steps run (None: the one-head kernel); set at warm-up
        self.decode_mha_group_arg = None  # the forward programs' static argument (None: the kernels' default)
        self.decode_tuning = None  # what choose_decode_kernel found (runner/decode_tuning.py)
        self._sample = jax.jit(programs.sample_step, donate_argnums=(3,), static_argnames=("plan",), **sample_kw)
        pool_step = programs.classify_step if self.task == "classify" else programs.embed_step
        self._embed = jax.jit(pool_step, donate_argnums=(1,), **embed_kw)
        # forks (beam search): whole-block KV copies before a step; one executable, compiled at warm-up
        self._copy = jax.jit(copy_blocks, donate_argnums=(0,), **copy_kw)
        self._prompt_lp = jax.jit(programs.prompt_logprobs)

    def _traced(self) -> None:
        self.num_traces += 1  # a trace of the step or embed step (runs only while tracing)

    @property
    def compile_count(self) -> int:
        """Executables compiled so far (after a warm-up: `warmup_compile_count`, which says which); a
        change after warm-up means a new shape reached the device: a bug."""
        return len(self._executables)

    @property
    def warmup_compile_count(self) -> int:
        """The executables `warmup` compiles for this runner's buckets and modes (a fresh runner's
        `compile_count` after it), counted from the tables warm-up walks: per bucket a forward pass
        (two with `lora_base_program`: the LoRA program and the base-only one); per number of sampling
        rows S a sampling executable per sample plan (`_sample_plans`: one, or every SamplePlan with
        branchless sampling); a prompt-logprobs pass per distinct T of the buckets with prompt tokens
        (decode and mixed); the block copy; a slot write per LoRA rank bucket. An embed / classify
        runner: its step per mixed bucket, nothing else."""
        buckets = self.buckets.all()
        if self.pooling:
            return sum(not decode_only for _, _, decode_only in buckets)
        forward = len(buckets) * (2 if self.lora_base_program else 1)
        sampling = len(self.buckets.sample_sizes()) * len(self._sample_plans)
        prompt_lp = len({T for T, _, decode_only in buckets if decode_only or T in self.buckets.mixed}
                        if self.supports_prompt_logprobs else ())
        slot_writes = 0 if self.lora is None else len(self.lora.rank_buckets)
        return forward + sampling + prompt_lp + int(self.supports_block_copy) + slot_writes

    def _executable(self, key: tuple, lower):
        """Ahead-of-time compiled executable per bucket: warm-up compiles (or loads from the
        persistent cache) without running anything; serving only looks executables up."""
        exe = self._executables.get(key)
        if exe is None:
            exe = self._executables[key] = lower().compile()
        return exe

    # ----- keys and lowerings -------------------------------------------------------
    def _padding_inputs(self, T: int, S: int, decode_only: bool, lora: bool | None = None) -> StepInputs:
        """An all-padding batch of one bucket: touches no slot and no penalty row. `lora`: the LoRA
        program's inputs (a [T] slot index; None: whenever the runner has LoRA) or the base-only one's."""
        lora = self.lora is not None if lora is None else lora and self.lora is not None
        return build_inputs([], [], self.num_rows, self.eos_ids, T, S, decode_only, self.block_size,
                            self.max_blocks_per_seq, self.max_model_len, vocab_size=self.vocab_size,
                            lora=lora, num_groups=self.num_kv_groups)

    @staticmethod
    def _bucket(inp: StepInputs) -> tuple:
        return inp.tokens.shape[0], inp.logits_indices.shape[0], inp.metadata.decode_only

    @classmethod
    def _step_key(cls, inp: StepInputs) -> tuple:
        """("step", T, S, decode_only): the base-only forward pass (a plain runner's only one);
        ("step_lora", ...): the LoRA program, whose inputs carry the per-token slot index."""
        return ("step" if inp.lora_slots is None else "step_lora",) + cls._bucket(inp)

    def _step_lora_arg(self, inp: StepInputs):
        """The forward pass's `lora` argument: the slots' weights for a LoRA step, None for base-only."""
        return None if inp.lora_slots is None else self.lora.weights

    def _step_lowering(self, inp: StepInputs):
        """The step's forward pass for `inp`'s bucket and variant (its HLO holds every weight read and KV write)."""
        return self._forward.lower(self.state, self.kv_cache, self.counts, self.prompt_mask, self.last_tokens, inp,
                                   self._step_lora_arg(inp), decode_mha_group=self.decode_mha_group_arg)

    def _sample_lowering(self, inp: StepInputs, plan: SamplePlan = FULL_PLAN):
        S = inp.logits_indices.shape[0]
        logits = jax.ShapeDtypeStruct((S, self.vocab_size), jnp.float32, sharding=self._logits_sharding)
        return self._sample.lower(logits, self.counts, self.prompt_mask, self.last_tokens, inp.sampling,
                                  inp.want_top_logprobs, inp.seq_rows, plan=plan)

    @property
    def _sample_plans(self) -> tuple[SamplePlan, ...]:
        """The plans a sampling executable is compiled for: FULL_PLAN alone (lax.cond skips unneeded work on
        the device), or with branchless sampling each SamplePlan (the host picks per step: sampler.plan_of)."""
        return SAMPLE_PLANS if self.branchless_sampling else (FULL_PLAN,)

    def _sample_key(self, S: int, plan: SamplePlan) -> tuple:
        return ("sample", S, plan) if self.branchless_sampling else ("sample", S)

    def _prompt_lp_lowering(self, num_tokens: int):
        hidden = jax.ShapeDtypeStruct((num_tokens, self.model_config.hidden_size), self.state_dtype)
        return self._prompt_lp.lower(self.state, hidden, np.zeros(num_tokens, np.int32))

    def _embed_lowering(self, inp: StepInputs):
        return self._embed.lower(self.state, self.kv_cache, inp)

    def _copy_lowering(self):
        pad = np.zeros(COPY_CHUNK, np.int32)
        return self._copy.lower(self.kv_cache, pad, pad)

    # ----- lookups (serving) --------------------------------------------------------
    def _step_executable(self, inp: StepInputs):
        return self._executable(self._step_key(inp), lambda: self._step_lowering(inp))

    def _sample_executable(self, inp: StepInputs, sampling=None):
        plan = FULL_PLAN if not self.branchless_sampling else plan_of(
            inp.sampling if sampling is None else sampling, inp.want_top_logprobs, self.vocab_size)
        return self._executable(self._sample_key(inp.logits_indices.shape[0], plan),
                                lambda: self._sample_lowering(inp, plan))

    def _prompt_lp_executable(self, num_tokens: int):
        return self._executable(("prompt_lp", num_tokens), lambda: self._prompt_lp_lowering(num_tokens))

    def _embed_executable(self, inp: StepInputs):
        return self._executable(("embed",) + self._bucket(inp), lambda: self._embed_lowering(inp))

    def _copy_executable(self):
        return self._executable(("copy_blocks",), self._copy_lowering)

    def _set_lora_executable(self, rank: int):
        return self._executable(("set_lora", rank), lambda: self.lora.lower(rank))

    def _choose_decode_kernel(self) -> None:
        if any(key[0] in ("step", "step_lora") for key in self._executables):  # traced with the default already
            self.decode_tuning = {"mode": "skipped", "reason": "step programs compiled before warm-up", "group": None}
            return
        choose_decode_kernel(self)

    # ----- ahead of time ------------------------------------------------------------
    def workspace_bytes(self) -> int:
        """Device memory a step needs beyond weights and cache (the profiling pass that sizes the KV
        cache on accelerators): XLA's temp allocation for the largest bucket's step and prompt-logprobs
        pass, plus the penalty state and the LoRA slots. Compiles those two once; runs nothing."""
        T, S, decode_only = max(self.buckets.all(), key=lambda b: b[0])
        if self.pooling:  # the embed step is all this runner will run (a base model has no LM head)
            exe = self._embed_lowering(self._embed_inputs([], T, S)).compile()
            return int(getattr(exe.memory_analysis(), "temp_size_in_bytes", 0) or 0)
        inp = self._padding_inputs(T, S, decode_only)
        programs = (self._step_lowering(inp).compile(), self._sample_lowering(inp).compile(),
                    self._prompt_lp_lowering(T).compile())
        # the logits live between the forward pass and the sampling: the forward's output
        temp = sum(int(getattr(c.memory_analysis(), "temp_size_in_bytes", 0) or 0) for c in programs)
        temp += S * self.vocab_size * 4
        lora = 0 if self.lora is None else self.lora.nbytes  # the probe's slots are freed with it
        return temp + self.counts.nbytes + self.prompt_mask.nbytes + self.last_tokens.nbytes + lora

    def warmup(self) -> float:
        """Compiles every bucket's step (with LoRA: both variants) and prompt-logprobs pass ahead of time (from JAX's persistent
        cache when warm) without running them. Returns seconds taken. Tracing is sequential; the
        XLA compiles run on a thread pool (they release the GIL), one per core. First, once, the decode
        attention kernel is chosen (runner/decode_tuning.py: timed on GPUs for MHA models), since every
        forward program is traced with it."""
        t0 = time.perf_counter()
        if self.decode_tuning is None:
            self._choose_decode_kernel()
        jobs = {}  # key -> lowered, in bucket order
        for T, S, decode_only in self.buckets.all():
            if self.pooling:  # prefill only: the mixed buckets of the embed step
                if not decode_only:
                    inp = self._embed_inputs([], T, S)
                    key = ("embed",) + self._bucket(inp)
                    if key not in self._executables:
                        jobs[key] = self._embed_lowering(inp)
                continue
            inp = self._padding_inputs(T, S, decode_only)
            # a LoRA runner: the LoRA program and the base-only one (steps without adapters) per bucket
            for variant in (inp, self._padding_inputs(T, S, decode_only, False)) if self.lora_base_program else (inp,):
                key = self._step_key(variant)
                if key not in self._executables:
                    jobs[key] = self._step_lowering(variant)
            for plan in self._sample_plans:  # one per S (one per SamplePlan with branchless sampling)
                key = self._sample_key(S, plan)
                if key not in self._executables and key not in jobs:
                    jobs[key] = self._sample_lowering(inp, plan)
            prompt_lp = decode_only or T in self.buckets.mixed  # draft steps have no prompt tokens
            if prompt_lp and self.supports_prompt_logprobs and ("prompt_lp", T) not in self._executables:
                jobs[("prompt_lp", T)] = self._prompt_lp_lowering(T)
        if self.supports_block_copy and ("copy_blocks",) not in self._executables:
            jobs[("copy_blocks",)] = self._copy_lowering()
        for rank in () if self.lora is None else self.lora.rank_buckets:  # a slot write per rank bucket
            if ("set_lora", rank) not in self._executables:
                jobs[("set_lora", rank)] = self.lora.lower(rank)
        if jobs:
            workers = max(1, min(len(jobs), os.cpu_count() or 1))
            with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="jaxllm-compile") as pool:
                for key, exe in zip(jobs, pool.map(lambda lowered: lowered.compile(), jobs.values())):
                    self._executables[key] = exe
        return time.perf_counter() - t0
