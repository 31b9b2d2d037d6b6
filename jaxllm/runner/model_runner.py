"""ModelRunner: pads each scheduled step to a precompiled bucket and runs it as two jitted calls
launched back to back: the forward pass, which writes the KV cache in place (donated) and computes
the logits of each sequence's sampling rows, then the sampling on device. Only sampled ids and
logprobs come back to the host.

``dispatch(sched)`` launches a step and returns a ``PendingStep`` at once (JAX dispatch is
asynchronous); ``PendingStep.result()`` waits and converts. Each row's last sampled token stays
on the device (``last_tokens``, [R] i32) so the next step can feed it to a placeholder decode
(async scheduling) without a round trip; ``execute`` = dispatch + result. A late-bitmask step
(``SchedulerOutput.late_bitmask``: a constrained request on a token still in flight) launches its
forward pass at dispatch and its sampling at ``PendingStep.set_bitmask``, so the device computes the
forward pass while the host reads the previous step back and advances the grammars.

The device programs themselves (forward, sampling, prompt-logprobs pass, embed step) are
runner/step_programs.py; the runner holds their state (cache, penalty tables, rows), picks buckets
and runs one executable per bucket (the sampling: one per number of sampling rows), compiled at
warm-up (runner/executables.py: the executables' keys, lowerings and warm-up).

With LoRA each bucket has two forward executables: the LoRA program (slot weights + per-token slot
index in, the deltas added) and the base-only one, the plain runner's very program. The host picks
per step from the scheduled seqs' lora_slot (all 0: base-only), never a device-side conditional:
an XLA conditional reads its predicate back to the host and would stall async dispatch.

Implements jaxllm.engine.runner_protocol.ModelRunnerProtocol.
"""
from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import POOLING_TASKS
from jaxllm.core.scheduler_output import SchedulerOutput
from jaxllm.engine.runner_protocol import SampledToken
from jaxllm.lora.config import base_program_enabled
from jaxllm.lora.slots import LoRASlots, check_seq_slots
from jaxllm.models.config import ModelConfig
from jaxllm.models.llama import LlamaForCausalLM
from jaxllm.runner.block_copy import copy_chunks
from jaxllm.runner.buckets import Buckets
from jaxllm.runner.executables import ExecutablesMixin
from jaxllm.runner.inputs import StepInputs, build_inputs, place_bitmask
from jaxllm.runner.kv_cache_dtype import cache_dtype
from jaxllm.runner.pending import PendingStep, PromptLogprobsJob, prompt_logprobs_targets
from jaxllm.runner.pooler import PendingPool
from jaxllm.runner.sampler import sampler_branchless
from jaxllm.runner.sleep import RunnerSleep
from pallas_kernels import KVCache

log = logging.getLogger("jaxllm")


class ModelRunner(ExecutablesMixin):
    def __init__(self, model: LlamaForCausalLM, *, block_size: int, num_blocks: int, max_model_len: int,
                 max_num_seqs: int, max_num_batched_tokens: int, eos_token_ids=(), cache_sharding=None,
                 task: str = "generate", kv_cache_dtype: str = "auto", lora_config=None,
                 kv_scales_fixed: bool = False, num_speculative_tokens: int = 0, hybrid_kv_cache: bool = True):
        """`task`: "generate" (sample from logits), "embed" (pool hidden states, runner/pooler.py:
        only the mixed buckets of the embed step are compiled; nothing is sampled) or "classify" (the
        same, the step returning the classifier head's logits of each sequence's last token).
        `kv_cache_dtype`: "auto" (the model dtype) or "fp8" (runner/kv_cache_dtype.py).
        `kv_scales_fixed` (fp8): the scales start at 1.0 and only `kv_calibration.set_scales` changes
        them, so the step's KV writes compute no absmax (build_engine's runner); False: they start
        at 0 and each layer's first write sets them (kv_quant.py; runners built directly).
        `lora_config`: a jaxllm.lora.config.LoRAConfig (adapter slots on device, `set_lora`, each
        ScheduledSeq's lora_slot picks its adapter; embed steps run the base model only) or None
        (no LoRA: the step is exactly the program without it).
        `num_speculative_tokens` (K): seqs may carry up to K drafts (ScheduledSeq.num_draft_tokens);
        the mixed buckets' S grows to the most sampling rows a step can have, and steps whose seqs all
        decode (with 0..K drafts) run draft buckets, T == S sized for them (runner/buckets.py).
        `hybrid_kv_cache`: a model with sliding-window and full-attention layers gets KV cache groups
        (`kv_groups`, jaxllm/core/kv_cache_groups.py): pages [P, num_blocks, ...] for P layer slots, one
        block table per group in each step's metadata; False (--disable-hybrid-kv-cache-manager) or a
        model whose layers attend alike: one group, pages [num_layers, ...] (an all-sliding model's one group
        is a sliding one: its table's freed entries arrive as -1 and become block 0, runner/inputs.py)."""
        if task not in ("generate", *POOLING_TASKS):
            raise ValueError(f"task={task!r} is invalid: must be one of {['generate', *POOLING_TASKS]}")
        c = model.config
        if task == "generate" and not getattr(c, "has_lm_head", True):
            raise ValueError(f"task='generate' is invalid for this checkpoint: it has no LM head "
                             f"(architecture {c.architecture} base model); use task='embed'")
        if task == "classify" and not getattr(c, "num_labels", 0):
            raise ValueError(f"task='classify' is invalid for this checkpoint: it has no classifier head "
                             f"(architecture {c.architecture}, not a *ForSequenceClassification)")
        self.task = task
        self.attention_impl = getattr(model, "attention_impl", None)  # the model's forced impl (decode_tuning.py)
        self.pooling = task in POOLING_TASKS  # prefill-only steps, nothing sampled
        self.model_config = c
        self.vocab_size = c.vocab_size
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.max_model_len = max_model_len
        self.num_speculative_tokens = num_speculative_tokens
        self.buckets = Buckets.make(max_num_seqs, max_num_batched_tokens, num_speculative_tokens)
        self.eos_ids = sorted(eos_token_ids)
        self.num_rows = max_num_seqs + 1  # + one spare row for padding sequences
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))
        self._rows: dict[str, int] = {}
        self.step_runs = {"base": 0, "lora": 0}  # forward passes launched per variant (LoRA runners: both)
        dtype = model.dtype
        layout = getattr(model, "layout", None)  # jaxllm.parallel.TPLayout when tensor parallel
        self.tensor_parallel_size = layout.tp if layout is not None else 1
        self.layout = layout
        # the checkpoint's config (load_weights maps HF names by it): the model's, kv heads unrepeated
        self.checkpoint_config = c if layout is None or layout.kv_repeat == 1 else dataclasses.replace(
            c, num_kv_heads=c.num_kv_heads // layout.kv_repeat)
        if layout is not None and cache_sharding is None:
            cache_sharding = layout.cache_sharding()  # kv heads on "tp"
        scale_sharding = layout.cache_scale_sharding() if layout is not None else None  # fp8 scales
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_groups = model.kv_cache_groups(hybrid_kv_cache)
        self.num_kv_groups = self.kv_groups.num_groups
        self.kv_cache = KVCache.zeros(self.kv_groups.slots, num_blocks, block_size, c.num_kv_heads, c.head_dim,
                                      cache_dtype(kv_cache_dtype, dtype), sharding=cache_sharding,
                                      scale_sharding=scale_sharding, scale_init=1.0 if kv_scales_fixed else 0.0,
                                      scales_fixed=kv_scales_fixed, num_scale_layers=c.num_layers)
        self.counts = jnp.zeros((self.num_rows, c.vocab_size), jnp.int32)  # [R, V] generated-token counts
        self.prompt_mask = jnp.zeros((self.num_rows, c.vocab_size), bool)  # [R, V] token in prompt
        if layout is not None:  # penalty state replicated (the programs' shardings: runner/executables.py)
            self.counts, self.prompt_mask = jax.device_put((self.counts, self.prompt_mask), layout.replicated)
        graphdef, self.state = nnx.split(model)
        self.state_dtype = dtype
        # device adapter slots (none for embed: its steps run the base model)
        self.lora = None if lora_config is None or self.pooling else LoRASlots(lora_config, model)
        # steps without adapters on the base-only program too (GPUs; $JAXLLM_LORA_BASE_PROGRAM)
        self.lora_base_program = self.lora is not None and base_program_enabled(jax.default_backend())

        # sampling without device-side branches on GPUs (runner/sampler.py; $JAXLLM_SAMPLER_BRANCHES)
        self.branchless_sampling = sampler_branchless()

        # [R] i32: the token each penalty row sampled in its latest step (async scheduling feeds it)
        self.last_tokens = jnp.zeros((self.num_rows,), jnp.int32)
        if layout is not None:
            self.last_tokens = jax.device_put(self.last_tokens, layout.replicated)

        # the forward pass, sampling, prompt-logprobs, embed and block-copy programs, jitted
        self._init_programs(graphdef, layout, cache_sharding, scale_sharding)
        self._unsampled = None  # a dispatched step whose sampling waits for its bitmask (set_bitmask)
        # forks admitted in one step: at most one per scheduled seq, one block per KV cache group each
        self.supports_block_copy = not self.pooling and jax.process_count() == 1
        self._pooled: dict = {}  # request_id -> PooledChunk, filed by PendingPool.result()
        self._prompt_lp_out: dict[str, dict[int, SampledToken]] = {}
        self.supports_prompt_logprobs = jax.process_count() == 1
        # Async scheduling's default: on where a device runs the steps while the host works; off
        # on CPU, where both share the cores and overlapping slowed steps (bench/RESULTS.md).
        self.async_by_default = jax.default_backend() != "cpu"
        # SchedulerOutput.late_bitmask: the sampling launched after the forward pass, once the engine
        # knows the grammar bitmask (single host: a multi-host step goes to every process whole)
        self.supports_late_bitmask = jax.process_count() == 1
        self._zero_bitmasks: dict[int, jax.Array] = {}  # S -> [S, ceil(V/32)] i32 zeros on device
        self._channel = None  # multi-host: process 0 broadcasts each step (jaxllm/parallel/multihost.py)
        self._sleep = RunnerSleep()  # sleep mode (runner/sleep.py)
        self.reload_weights = None  # (model=path) -> nnx state like self.state: reload_weights' source (build_engine sets it)
        if jax.process_count() > 1:
            from jaxllm.parallel.multihost import StepChannel

            self._channel = StepChannel(self._padding_inputs)

    # ----- per-request rows ---------------------------------------------------------
    def release(self, request_ids) -> None:
        for rid in request_ids:
            row = self._rows.pop(rid, None)
            if row is not None:
                self._free_rows.append(row)

    def _row(self, rid: str) -> int:
        row = self._rows.get(rid)
        if row is None:
            row = self._rows[rid] = self._free_rows.pop()
        return row

    # ----- execution ----------------------------------------------------------------
    def _run(self, inp: StepInputs):
        if self._channel is not None:  # process 0 of a multi-host run: every process runs this step
            inp = self._channel.send(inp)
        return self._run_local(inp)

    def _copy_blocks(self, pairs) -> None:
        """SchedulerOutput.block_copies: (source, destination) block ids, copied before the step."""
        for src, dst in copy_chunks(list(pairs)):  # [COPY_CHUNK] i32 each, launched back to back
            self.kv_cache = self._copy_executable()(self.kv_cache, src, dst)

    def _run_local(self, inp: StepInputs):
        return self._sample_local(inp, self._forward_local(inp), inp.sampling)

    def _forward_local(self, inp: StepInputs):
        """Launch the step's forward pass → its logits [S, V] f32 (on device): the LoRA program when
        `inp` carries a slot index, else the base-only one."""
        exe = self._step_executable(inp)
        self.step_runs["base" if inp.lora_slots is None else "lora"] += 1
        self.kv_cache, self.counts, self.prompt_mask, logits, self._hidden = \
            exe(self.state, self.kv_cache, self.counts, self.prompt_mask, self.last_tokens, inp, self._step_lora_arg(inp))
        return logits

    def _sample_local(self, inp: StepInputs, logits, sampling):
        """Launch the sampling of a forward pass's `logits` with `sampling` → SamplerOutput (on device)."""
        self.last_tokens, out = self._sample_executable(inp, sampling)(logits, self.counts, self.prompt_mask, self.last_tokens,
                                                             sampling, inp.want_top_logprobs, inp.seq_rows)
        return out

    # ----- LoRA ---------------------------------------------------------------------
    @property
    def lora_model_config(self) -> ModelConfig:
        """The ModelConfig adapters are loaded against (jaxllm.lora.peft.load_adapter): the
        checkpoint's, whose kv heads tensor parallelism may have repeated in `model_config`."""
        return self.model_config if self.lora is None else self.lora.adapter_config

    def prepare_lora(self, adapter):
        """`adapter` (a LoRAAdapter) checked and cast for `set_lora` (a SlotAdapter at its own rank, as
        the host cache keeps it): numpy only, safe on any thread (the engine's adapter loader runs it)."""
        if self.lora is None:
            raise ValueError("prepare_lora needs a runner built with lora_config (enable_lora=True)")
        return self.lora.prepare(adapter)

    def set_lora(self, slot: int, adapter) -> None:
        """Loads `adapter` (a jaxllm.lora.peft.LoRAAdapter, or a SlotAdapter from `prepare_lora`: then
        only the device write is left: sent at its rank bucket, padded on the device; None: empties the
        slot) into device slot `slot` (1..max_loras) in place: a donated update per rank bucket,
        compiled at warm-up, nothing retraced.
        Steps dispatched afterwards see it; ValueError (nothing changed) for a bad slot or adapter."""
        if self.lora is None:
            raise ValueError("set_lora needs a runner built with lora_config (enable_lora=True)")
        self.lora.set(slot, adapter, self._set_lora_executable)

    # ----- sleep mode (runner/sleep.py) ---------------------------------------------
    def sleep(self, level: int = 1) -> int:
        """Free the device memory of the weights (level 1: a host copy kept; 2: dropped) and of the KV
        cache (discarded). Nothing may be in flight. Returns the bytes freed."""
        if self._channel is not None:
            raise RuntimeError("sleep mode is not supported on several processes (multi-host) yet")
        return self._sleep.sleep(self, level)

    def wake_up(self, tags=None) -> None:
        """Restore the tags in `tags` ("weights", "kv_cache"; None: both) with their former shardings."""
        self._sleep.wake_up(self, tags)

    @property
    def sleeping_tags(self) -> frozenset:
        return frozenset(self._sleep.asleep)

    @property
    def weights_discarded(self) -> bool:
        """The weights are zeros since a level-2 sleep's wake-up, until a full load (runner/sleep.py)."""
        return self._sleep.discarded

    # ----- weight updates in place (runner/weight_update.py) ------------------------
    def load_weights(self, weights) -> int:
        """Write HF-named tensors into the weights in place (same shardings: nothing compiles); returns
        the number of tensors applied. ValueError naming a refused tensor, nothing changed then."""
        from jaxllm.runner.weight_update import load_weights

        return load_weights(self, weights)

    def reload_weights_from(self, path: str | None = None) -> None:
        """Replace the weights by the checkpoint at `path` (None: the one the engine was built from)."""
        from jaxllm.runner.weight_update import reload_from

        reload_from(self, path)

    # ----- multi-host ---------------------------------------------------------------
    def follow(self) -> None:
        """Processes other than 0: run process 0's steps until it calls `stop_followers`."""
        if self._channel is None:
            raise RuntimeError("follow() is for processes > 0 of a multi-host run (jax.process_count() > 1)")
        self.warmup()  # compile every bucket here too, so serving compiles nothing on any process
        while (inp := self._channel.receive()) is not None:
            jax.block_until_ready(self._run_local(inp))

    def stop_followers(self) -> None:
        """Process 0: release the followers (no-op on one host)."""
        if self._channel is not None:
            self._channel.stop()

    def execute(self, sched: SchedulerOutput) -> dict[str, SampledToken]:
        return self.dispatch(sched).result()

    # ----- embed task ---------------------------------------------------------------
    def _embed_inputs(self, seqs, T: int, S: int) -> StepInputs:
        spare = [self.num_rows - 1] * len(seqs)  # no penalty rows: embed steps never sample
        return build_inputs(seqs, spare, self.num_rows, self.eos_ids, T, S, False, self.block_size,
                            self.max_blocks_per_seq, self.max_model_len, vocab_size=self.vocab_size,
                            num_groups=self.num_kv_groups)

    def _dispatch_embed(self, seqs) -> PendingPool:
        T, S, _ = self.buckets.pick(sum(len(s.token_ids) for s in seqs), len(seqs), False)
        inp = self._embed_inputs(seqs, T, S)
        self.kv_cache, *pooled = self._embed_executable(inp)(self.state, self.kv_cache, inp)
        return PendingPool(seqs, tuple(pooled), lambda: self._pooled)  # (sums, last) or (logits,)

    def take_pooled(self) -> dict:
        """{request_id: PooledChunk} of the embed steps read back since the last call."""
        out, self._pooled = self._pooled, {}
        return out

    def dispatch(self, sched: SchedulerOutput) -> PendingStep:
        """Launch one step (and its prompt-logprobs pass) without waiting for the device."""
        if self._unsampled is not None:
            raise RuntimeError("dispatch() before the previous step's set_bitmask(): a step's placeholders "
                               "need the tokens that sampling writes")
        self.release(sched.finished_or_preempted_ids)
        seqs = sched.seqs
        if not seqs:
            return PendingStep([], None)
        check_seq_slots(seqs, self.lora, self.task)
        if self.pooling:
            return self._dispatch_embed(seqs)
        if sched.block_copies:  # forks admitted this step: their copied partial blocks first
            self._copy_blocks(sched.block_copies)
        T, S, decode_only = self.buckets.pick_step(seqs)  # decode, draft or mixed bucket
        late = sched.late_bitmask  # the masks come later: PendingStep.set_bitmask
        rows = [self._row(s.request_id) for s in seqs]
        # LoRA program only when some seq runs an adapter: base-only steps cost what a plain runner's do
        with_lora = self.lora is not None and (not self.lora_base_program or any(s.lora_slot for s in seqs))
        seed_steps = []  # only when this step's prefix-cache hits exceed what one step carries
        inp = build_inputs(seqs, rows, self.num_rows, self.eos_ids, T, S, decode_only, self.block_size,
                           self.max_blocks_per_seq, self.max_model_len, seed_steps, vocab_size=self.vocab_size,
                           grammar_bitmask=None if late else sched.grammar_bitmask,
                           constrained=None if late else sched.constrained, lora=with_lora,
                           num_groups=self.num_kv_groups)
        if late or not (sched.constrained and any(sched.constrained)):
            inp = self._with_zero_bitmask(inp, S)
        for seed in seed_steps:  # same bucket, all padding: seeds penalty state only
            self._run(seed)
        if late:  # the sampling waits for PendingStep.set_bitmask
            if self._channel is not None:
                raise RuntimeError("late_bitmask needs a single-host runner (supports_late_bitmask)")
            logits = self._forward_local(inp)
            pending = PendingStep(seqs, None, lambda: self._prompt_lp_out,
                                  sample_later=lambda bitmask, constrained: self._sample_late(
                                      inp, logits, seqs, bitmask, constrained), marker=logits)
            self._unsampled = pending
        else:
            pending = PendingStep(seqs, self._run(inp), lambda: self._prompt_lp_out)
        if any(s.params.prompt_logprobs is not None and s.start_pos + 1 < s.num_prompt_tokens for s in seqs):
            pending.set_prompt_logprobs(self._dispatch_prompt_logprobs(seqs, T))
        return pending

    def _sample_late(self, inp: StepInputs, logits, seqs, bitmask, constrained):
        """A late-bitmask step's sampling (PendingStep.set_bitmask) → SamplerOutput (on device)."""
        assert self._unsampled is not None
        self._unsampled = None
        mask, rows = place_bitmask(seqs, inp.logits_indices.shape[0], self.vocab_size, bitmask, constrained)
        sampling = dataclasses.replace(inp.sampling, bitmask=mask, constrained=rows)
        return self._sample_local(inp, logits, sampling)

    def _with_zero_bitmask(self, inp: StepInputs, S: int) -> StepInputs:
        """A step without grammars: its all-zero [S, ceil(V/32)] bitmask is a device array kept per
        bucket, so free steps do not copy it to the device each time (single device; under tensor
        parallelism or multi-host the numpy array travels as before)."""
        if self.tensor_parallel_size > 1 or self._channel is not None:
            return inp
        zero = self._zero_bitmasks.get(S)
        if zero is None:
            zero = self._zero_bitmasks[S] = jax.device_put(inp.sampling.bitmask)
        return dataclasses.replace(inp, sampling=dataclasses.replace(inp.sampling, bitmask=zero))

    def _dispatch_prompt_logprobs(self, seqs, padded_tokens: int) -> PromptLogprobsJob:
        """For seqs asking prompt_logprobs: logprobs of prompt tokens 1.. predicted in this step."""
        targets, spans = prompt_logprobs_targets(seqs, padded_tokens)
        outputs = self._prompt_lp_executable(padded_tokens)(self.state, self._hidden, targets)
        return PromptLogprobsJob(outputs, targets, spans)

    def take_prompt_logprobs(self) -> dict[str, dict[int, SampledToken]]:
        """{request_id: {prompt position: SampledToken of the prompt token there}} computed since
        the last call (see runner_protocol)."""
        out, self._prompt_lp_out = self._prompt_lp_out, {}
        return out
