"""bench/lora.py's self-made adapters are real PEFT adapters: peft itself loads them into a tiny HF
Llama with every tensor in place (the independent reference for the format), and the dry run
writes and checks them without building an engine."""

from __future__ import annotations

import os

from bench.lora import TARGETS, check_adapter, main, write_random_adapter
from checkpoints.hf import read_config
from tests.models.hf_tiny import make_tiny_hf


def test_random_adapter_loads_in_peft(tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    base = make_tiny_hf("llama", str(tmp_path))
    mc = read_config(base)
    path = write_random_adapter(str(tmp_path / "ad"), mc, rank=4, seed=3)
    assert check_adapter(path, mc, 4) == 2 * mc.num_layers * len(TARGETS)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), path)
    ours = load_file(os.path.join(path, "adapter_model.safetensors"))
    theirs = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(theirs) == len(ours)
    for k, v in ours.items():  # peft names the loaded tensor with its adapter name ("default")
        loaded = theirs[k.replace(".weight", ".default.weight")]
        assert torch.equal(loaded, torch.from_numpy(v)), k
    cfg = model.peft_config["default"]
    assert cfg.r == 4 and cfg.lora_alpha == 8 and set(cfg.target_modules) == set(TARGETS)


def test_dry_run(tmp_path, capsys):
    assert main(["--dry-run", "--model", "dummy:tiny-llama", "--rank", "8", "--adapter-dir", str(tmp_path)]) == 0
    assert "dry run: 4 adapters of rank 8" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["a1", "a2", "a3", "a4"]


def test_run_batch_on_the_host_engine():
    """The bench's timing loop over the real host engine (fake runner and loader): every mode
    finishes all its requests, mode 4 puts 4 adapters in one step, decode steps are timed."""
    import numpy as np

    from bench.lora import MODES, run_batch
    from tests.lora.host_fakes import lora, make_lora_engine

    e = make_lora_engine(max_loras=4, max_cpu_loras=4, max_num_seqs=8, async_scheduling=False)
    loras = [lora(i) for i in (1, 2, 3, 4)]
    for a in loras:  # as the bench's main does: loaded before the timing (a request's own load runs off-thread)
        e.add_lora(a)
    rng = np.random.default_rng(0)
    for _, mode in MODES:
        first = len(e.runner.steps)
        r = run_batch(e, mode, loras, 8, 6, 5, e.vocab_size, rng)
        assert r["tok_s"] > 0 and r["step_ms"] == r["step_ms"]  # not NaN: decode steps were timed
        most = max(len({s.lora_slot for s in out.seqs} - {0}) for out in e.runner.steps[first:])
        assert most == mode
    assert not e.has_unfinished_requests() and e.kv.num_free_blocks == e.kv.num_blocks


def test_lora_load_bench_on_the_host_engine():
    """bench/lora_load.py's repeat over the real host engine (fake runner, a loader that takes 50 ms):
    the streams keep getting tokens while the adapter loads, every figure is there, nothing leaks."""
    import argparse
    import time

    import numpy as np

    from bench.lora_load import run_repeat
    from tests.lora.host_fakes import FakeLoader, lora, make_lora_engine

    class SlowLoader(FakeLoader):
        def __call__(self, req):
            time.sleep(0.05)
            return super().__call__(req)

    e = make_lora_engine(max_loras=2, max_cpu_loras=2, max_num_seqs=8, async_scheduling=False,
                         max_model_len=512, num_blocks=256, loader=SlowLoader())
    fast = e.runner.execute
    e.runner.execute = lambda out: (time.sleep(0.002), fast(out))[1]
    args = argparse.Namespace(streams=3, input_len=6, warm_steps=8, adapter_tokens=3)
    r = run_repeat(e, lora(1), args, e.vocab_size, np.random.default_rng(0), "t")
    assert set(r) == {"steady_gap_ms", "max_gap_ms", "add_ms", "ttft_ms", "set_lora_ms",
                      "stream_tokens_during_load", "base_add_max_gap_ms"}
    assert r["ttft_ms"] >= 50 and r["stream_tokens_during_load"] >= 5  # ~2 ms steps during a 50 ms load
    assert e.lora._set_lora == e.runner.set_lora  # the timing wrapper is gone
    assert not e.has_unfinished_requests() and e.kv.num_free_blocks == e.kv.num_blocks
