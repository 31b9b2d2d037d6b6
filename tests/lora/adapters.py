"""Random non-zero LoRA adapters in PEFT format, references from transformers + peft, and `drive`:
greedy generation through a ModelRunner with hand-built ScheduledSeqs (no scheduler).

`make_peft_adapter` goes through peft itself (get_peft_model + save_pretrained, with A and B
refilled at random: peft initialises B to zero, which would hide every bug); `write_adapter` writes
the same file format with numpy only (no torch), for tests that run in subprocesses or build broken
adapters on purpose.
"""
from __future__ import annotations

import json
import os

import numpy as np

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_peft_adapter(base_path: str, root: str, name: str, r: int, alpha: float, targets, seed: int,
                      rslora: bool = False, std: float = 0.2) -> str:
    """A PEFT adapter dir for the HF model at `base_path` with A, B ~ N(0, std²) (created once)."""
    import peft
    import torch
    import transformers

    path = os.path.join(root, name)
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        return path
    model = transformers.AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, lora_dropout=0.0)
    pm = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    pm.save_pretrained(path)
    return path


def peft_model(base_path: str, adapter_path: str | None):
    import peft
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32,
                                                              attn_implementation="eager")
    if adapter_path is not None:
        model = peft.PeftModel.from_pretrained(model, adapter_path)
    return model.eval()


def peft_logits(model, seqs: list[list[int]]) -> list[np.ndarray]:
    """Reference logits [n, V] of each sequence run alone (fp32)."""
    import torch

    with torch.no_grad():
        return [model(input_ids=torch.tensor([s])).logits[0].numpy() for s in seqs]


def peft_greedy(model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens by full recomputation (no cache reuse to trust)."""
    import torch

    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def write_adapter(root: str, name: str, config: dict, r: int, alpha: float = 16.0, targets=ALL, seed: int = 0,
                  std: float = 0.2, extra_config: dict | None = None, skip: tuple[str, ...] = (),
                  tensors: dict | None = None) -> str:
    """A PEFT adapter dir written with numpy for an HF `config` dict (hidden_size, ...): tensors
    named as peft saves them; `skip` leaves tensors out, `tensors` adds or replaces some."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    E, F, L = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    H, K = config["num_attention_heads"], config["num_key_value_heads"]
    D = config.get("head_dim") or E // H
    dims = {"q_proj": (E, H * D), "k_proj": (E, K * D), "v_proj": (E, K * D), "o_proj": (H * D, E),
            "gate_proj": (E, F), "up_proj": (E, F), "down_proj": (F, E)}  # (in, out)
    t = {}
    for i in range(L):
        for m in targets:
            blk = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            pre = f"base_model.model.model.layers.{i}.{blk}.{m}"
            fin, fout = dims[m]
            t[f"{pre}.lora_A.weight"] = (rng.standard_normal((r, fin)) * std).astype(np.float32)
            t[f"{pre}.lora_B.weight"] = (rng.standard_normal((fout, r)) * std).astype(np.float32)
    for k in skip:
        t.pop(k)
    t.update(tensors or {})
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    save_file(t, os.path.join(path, "adapter_model.safetensors"))
    cfg = dict(peft_type="LORA", r=r, lora_alpha=alpha, target_modules=list(targets), bias="none",
               use_dora=False, use_rslora=False, modules_to_save=None, fan_in_fan_out=False)
    cfg.update(extra_config or {})
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    return path


def drive(runner, prompts, slots, n, tag):
    """n greedy tokens per prompt, all prompts in every step (one mixed prefill, then decodes),
    prompt i running LoRA slot slots[i]; ScheduledSeqs built by hand (no scheduler)."""
    from jaxllm.core.scheduler_output import ScheduledSeq, SchedulerOutput
    from jaxllm.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    per = -(-(max(map(len, prompts)) + n) // runner.block_size)
    seqs = [ScheduledSeq(f"{tag}{i}", list(p), 0, list(range(i * per, (i + 1) * per)), True, len(p), params, 0,
                         prefix_token_ids=[], lora_slot=s) for i, (p, s) in enumerate(zip(prompts, slots))]
    out = [[] for _ in prompts]
    for _ in range(n):
        res = runner.execute(SchedulerOutput(seqs, sum(len(s.token_ids) for s in seqs)))
        for i, s in enumerate(seqs):
            out[i].append(res[s.request_id].token_id)
        seqs = [ScheduledSeq(s.request_id, [o[-1]], s.start_pos + len(s.token_ids), s.block_ids, True,
                             s.num_prompt_tokens, params, 0, lora_slot=s.lora_slot) for s, o in zip(seqs, out)]
    runner.release([s.request_id for s in seqs])
    return out
