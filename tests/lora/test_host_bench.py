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
