"""The runner's choice of decode attention kernel at warm-up (jaxllm/runner/decode_tuning.py), on this
CPU-only machine: a CPU engine is unchanged (nothing tuned, nothing printed, the same step program);
with a GPU faked for the decision only, an explicit JAXLLM_DECODE_MHA_GROUP is used untimed, GQA and
the reference attention skip, and an MHA model is tuned end to end on its own shapes (the real tuner in
Pallas interpret mode: bf16 and fp8 caches); the chosen group reaches the traced kernel (the forward
program exported for CUDA with the group 16 vs the one-head kernel, decode-only and mixed steps)."""
from __future__ import annotations

import functools
import json
import types

import jax.numpy as jnp
import pytest

from checkpoints.dummy import PRESETS
from jaxllm.config import EngineConfig
from jaxllm.engine.factory import build_engine
from jaxllm.runner import decode_tuning, executables
from pallas_kernels.attention import tune
from pallas_kernels.attention.decode_mha import ENV_VAR
from tests.runner.test_gpu_step_programs import GPU_DEFAULTS, _export, _spec

MHA_KERNEL = "jaxllm_paged_decode_mha"
ONE_HEAD_KERNEL = "jaxllm_paged_decode"


def _model_dir(tmp_path_factory, name: str, **overrides) -> str:
    path = tmp_path_factory.mktemp(name) / "config.json"
    path.write_text(json.dumps(dict(PRESETS["tiny-llama"], **overrides)))
    return str(path.parent)


@pytest.fixture(scope="module")
def mha_dir(tmp_path_factory):  # 4 q heads = 4 kv heads of 16 dims (the Pallas kernels need d >= 16)
    return _model_dir(tmp_path_factory, "mha", num_attention_heads=4, num_key_value_heads=4)


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory):
    return _model_dir(tmp_path_factory, "gqa", num_attention_heads=4, num_key_value_heads=2)


def _runner(path, **kw):
    cfg = EngineConfig(model=path, load_format="dummy", max_model_len=64, block_size=16, max_num_seqs=4,
                       max_num_batched_tokens=32, kv_cache_memory_bytes=1 << 20, **kw)
    with pytest.MonkeyPatch.context() as mp:  # built on the CPU's attention (an fp8 cache's calibration runs it)
        mp.delenv("JAXLLM_ATTENTION_IMPL", raising=False)
        return build_engine(cfg, compile_cache=False, warmup=False).runner


@pytest.fixture
def fake_gpu(monkeypatch):
    """The decision sees a GPU and the Pallas attention; the tuner must not run unless a test allows it."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("JAXLLM_ATTENTION_IMPL", "pallas")
    monkeypatch.setattr(decode_tuning, "_backend", lambda: "gpu")

    def refuse(*a, **k):
        raise AssertionError("the tuner ran")

    monkeypatch.setattr(decode_tuning, "tune_decode_group", refuse)
    return monkeypatch


def test_cpu_engine_is_unchanged(mha_dir, monkeypatch, capsys):
    """CPU (the reference attention): warm-up tunes nothing, prints nothing about it, and the step program
    is the one lowered before warm-up (the static argument stays None: the kernels' default)."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(decode_tuning, "tune_decode_group", None)  # would raise if called
    r = _runner(mha_dir)
    inp = r._padding_inputs(4, 4, True)
    before = r._step_lowering(inp).as_text()
    r.warmup()
    assert r.decode_tuning == {"mode": "skipped", "reason": "cpu backend", "group": None}
    assert r.decode_mha_group is None and r.decode_mha_group_arg is None
    assert "decode attention" not in capsys.readouterr().err
    after = r._step_lowering(inp).as_text()
    assert after == before and ONE_HEAD_KERNEL not in after  # reference attention: no Pallas kernel


@pytest.mark.parametrize("value,group", [("16", 16), ("auto", 16), ("2", 2), ("off", None), ("0", None)])
def test_explicit_env_values_skip_tuning(mha_dir, fake_gpu, value, group):
    fake_gpu.setenv(ENV_VAR, value)
    r = _runner(mha_dir)
    lines = []
    info = decode_tuning.choose_decode_kernel(r, log=lines.append)
    assert info == {"mode": "env", "reason": f"{ENV_VAR}={value}", "group": group} == r.decode_tuning
    assert r.decode_mha_group == group and r.decode_mha_group_arg is None  # the kernels read the variable
    assert lines == [f"{tune.label(group)} from {ENV_VAR}={value} (not tuned)"]


def test_gqa_and_reference_attention_skip(gqa_dir, mha_dir, fake_gpu):
    r = _runner(gqa_dir)
    lines = []
    assert decode_tuning.choose_decode_kernel(r, log=lines.append)["reason"] == "GQA (2 q heads per kv head): the one-head kernel"
    assert r.decode_mha_group is None and r.decode_mha_group_arg is None and lines[0].startswith("not tuned (GQA")
    fake_gpu.setenv("JAXLLM_ATTENTION_IMPL", "reference")
    r = _runner(mha_dir)
    assert decode_tuning.choose_decode_kernel(r, log=lines.append)["reason"] == "attention impl reference"


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_mha_model_is_tuned_on_its_own_shapes(mha_dir, fake_gpu, kv_cache_dtype):
    """The real tuner (interpret mode, one timing sample) on the model's shapes: 4 kv heads of 16 dims,
    block size 16, the runner's table width, S = the largest decode bucket, contexts <= 64, the cache's
    dtype (fp8: uint8 pages with per-head scales); candidates one-head and G=4 (8/16/32 over 4 heads);
    the choice lands on the runner as the programs' static argument and in one line."""
    seen = {}

    def real(q, cache, metadata, candidates, **kw):
        seen.update(q=q.shape, k=cache.k.shape, quantized=cache.quantized, tables=metadata.block_tables.shape,
                    ctx=int(metadata.context_lens.max()), candidates=candidates, attn={k: kw[k] for k in ("sm_scale", "soft_cap")})
        return tune.tune_decode_group(q, cache, metadata, candidates, interpret=True, samples=1, **kw)

    fake_gpu.setattr(decode_tuning, "tune_decode_group", real)
    r = _runner(mha_dir, kv_cache_dtype=kv_cache_dtype, dtype="bfloat16")
    lines = []
    info = decode_tuning.choose_decode_kernel(r, log=lines.append)
    assert seen["q"] == (4, 4, 16) and seen["k"][0] == 1 and seen["k"][2:] == (16, 4, 16)
    assert seen["tables"] == (4, r.max_blocks_per_seq) and 32 <= seen["ctx"] <= 64
    assert seen["quantized"] is (kv_cache_dtype == "fp8") and seen["candidates"] == [None, 4]
    assert seen["attn"] == {"sm_scale": r.model_config.attention_scale, "soft_cap": None}
    assert info["mode"] == "tuned" and not info["dropped"] and set(info["times_ms"]) == {"one-head", "G=4"}
    assert info["num_seqs"] == 4 and info["context"] == 64 and info["num_kv_heads"] == 4
    assert info["cache_dtype"] == ("float8_e4m3fn" if kv_cache_dtype == "fp8" else "bfloat16")
    assert r.decode_mha_group == info["group"] in (None, 4) and r.decode_mha_group_arg == (info["group"] or 0)
    assert len(lines) == 1 and lines[0].startswith("chose ") and " in " in lines[0] and "S=4" in lines[0]


def test_a_failed_setup_keeps_the_one_head_kernel(mha_dir, fake_gpu):
    def no_memory(**kw):
        raise MemoryError("RESOURCE_EXHAUSTED: out of memory allocating 1073741824 bytes\nmore")

    fake_gpu.setattr(decode_tuning, "synthetic_decode_batch", no_memory)
    r = _runner(mha_dir)
    lines = []
    info = decode_tuning.choose_decode_kernel(r, log=lines.append)
    assert info["mode"] == "failed" and info["reason"].startswith("MemoryError: RESOURCE_EXHAUSTED")
    assert r.decode_mha_group is None and r.decode_mha_group_arg == 0
    assert lines == ["tuning failed (MemoryError: RESOURCE_EXHAUSTED: out of memory allocating 1073741824 bytes); "
                     "the one-head kernel"]


def test_synthetic_batch_size_is_capped():
    """Llama-2-13B's shapes (40 kv heads, d 128, bf16, block 16), decode buckets 8..256, contexts 1024:
    a sequence's one-layer cache is 20 MiB, so 1 GiB holds S 32 (64 would be 1.3 GiB); a third of the
    free memory caps it further; at least one sequence."""
    runner = types.SimpleNamespace(
        model_config=types.SimpleNamespace(num_kv_heads=40, head_dim=128), tensor_parallel_size=1, block_size=16,
        buckets=types.SimpleNamespace(decode=(8, 16, 32, 64, 128, 256)))
    seqs = functools.partial(decode_tuning.synthetic_seqs, runner, 1024, jnp.bfloat16)
    assert seqs(None) == 32 and seqs(100 << 30) == 32
    assert seqs(600 << 20) == 8  # a 200 MiB cap
    assert seqs(30 << 20) == 1
    runner.tensor_parallel_size = 4  # 10 heads per device: 4x the sequences
    assert seqs(None) == 128


def test_warmup_chooses_once_before_compiling(mha_dir, monkeypatch):
    calls = []

    def choose(runner):
        calls.append(len(runner._executables))
        return decode_tuning._set(runner, {"mode": "skipped", "reason": "test", "group": None}, None)

    monkeypatch.setattr(executables, "choose_decode_kernel", choose)
    r = _runner(mha_dir)
    r.warmup()
    r.warmup()
    assert calls == [0]  # once, with nothing compiled yet
    r = _runner(mha_dir)
    r._step_executable(r._padding_inputs(4, 4, True))  # a step compiled with the default first
    r.warmup()
    assert calls == [0] and r.decode_tuning["reason"] == "step programs compiled before warm-up"


@pytest.fixture(scope="module")
def gpu_runner(mha_dir):
    with pytest.MonkeyPatch.context() as mp:
        for k, v in GPU_DEFAULTS.items():
            mp.setenv(k, v)
        return _runner(mha_dir)


@pytest.mark.parametrize("decode_only", [True, False], ids=["decode", "mixed"])
def test_the_chosen_group_reaches_the_traced_kernel(gpu_runner, monkeypatch, decode_only):
    """The forward program exported for CUDA: decode_mha_group=16 traces the MHA kernel (G 16, clamped
    to this model's 4 heads) in every layer, decode-only and in the mixed step's decode rows; 0 (the
    tuner's "one-head") and None (the default, JAXLLM_DECODE_MHA_GROUP unset) trace the one-head kernel."""
    r = gpu_runner
    monkeypatch.setenv("JAXLLM_ATTENTION_IMPL", "pallas")
    monkeypatch.delenv(ENV_VAR, raising=False)
    T, S = (4, 4) if decode_only else (r.buckets.mixed[0], r.buckets.mixed_s)
    inp = r._padding_inputs(T, S, decode_only, False)
    args = _spec((r.state, r.kv_cache, r.counts, r.prompt_mask, r.last_tokens, inp))
    texts = {g: _export(r._forward, *args, None, decode_mha_group=g) for g in (16, 0, None)}
    L = r.model_config.num_layers
    assert texts[16].count(MHA_KERNEL) >= L
    assert MHA_KERNEL not in texts[0] and texts[0].count(ONE_HEAD_KERNEL) >= L
    assert texts[None] == texts[0]
    # and the runner lowers its steps with its own choice
    seen = []
    monkeypatch.setattr(r, "_forward", types.SimpleNamespace(lower=lambda *a, **kw: seen.append(kw)))
    monkeypatch.setattr(r, "decode_mha_group_arg", 16)
    r._step_lowering(inp)
    assert seen == [{"decode_mha_group": 16}]
