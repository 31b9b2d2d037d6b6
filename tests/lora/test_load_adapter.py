"""jaxllm.lora.peft.load_adapter: the layout it hands over (checked against a numpy rewrite of
PEFT's formula) and each refusal: one line, naming the file and the field or tensor."""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest

from jaxllm.lora.peft import load_adapter
from jaxllm.models.config import ModelConfig
from tests.lora.adapters import write_adapter

HF = dict(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2)
CONFIG = ModelConfig.from_hf(HF)
PRE = "base_model.model.model.layers"


def test_layout_and_scaling_match_peft_formula(tmp_path):
    """W x + scaling · B (A x) per HF module, written with the raw tensors, equals x·A·B with the
    adapter's arrays in jaxllm's input-major layout (rslora: alpha / sqrt(r))."""
    from safetensors.numpy import load_file

    path = write_adapter(str(tmp_path), "a", HF, r=4, alpha=6, seed=1, extra_config=dict(use_rslora=True))
    raw = load_file(os.path.join(path, "adapter_model.safetensors"))
    ad = load_adapter(path, CONFIG, 8, name="mine")
    assert (ad.name, ad.rank, ad.path) == ("mine", 4, path)
    assert ad.nbytes == sum(v.nbytes for v in raw.values())
    rng = np.random.default_rng(0)
    H, K, D, E, F = 4, 2, 4, 16, 24
    for param, mod, fin, out_shape in (("layers.wq", "self_attn.q_proj", E, (H, D)),
                                       ("layers.wk", "self_attn.k_proj", E, (K, D)),
                                       ("layers.wo", "self_attn.o_proj", H * D, (E,)),
                                       ("layers.w_up", "mlp.up_proj", E, (F,)),
                                       ("layers.w_down", "mlp.down_proj", F, (E,))):
        a, b = ad.modules[param]
        for layer in range(2):
            x = rng.standard_normal(fin).astype(np.float32)
            la, lb = raw[f"{PRE}.{layer}.{mod}.lora_A.weight"], raw[f"{PRE}.{layer}.{mod}.lora_B.weight"]
            want = (6 / math.sqrt(4)) * lb @ (la @ x)  # [out]
            xa = np.tensordot(x.reshape(a.shape[1:-1]), a[layer], axes=a.ndim - 2)  # [r]
            got = np.tensordot(xa, b[layer], axes=1).reshape(-1)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            assert got.reshape(out_shape).shape == out_shape


def test_partial_targets_and_layers(tmp_path):
    path = write_adapter(str(tmp_path), "qv", HF, r=2, targets=("q_proj", "v_proj"),
                         skip=(f"{PRE}.0.self_attn.q_proj.lora_A.weight", f"{PRE}.0.self_attn.q_proj.lora_B.weight",
                               f"{PRE}.0.self_attn.v_proj.lora_A.weight", f"{PRE}.0.self_attn.v_proj.lora_B.weight"),
                         extra_config=dict(layers_to_transform=[1]))
    ad = load_adapter(path, CONFIG, 2)
    assert sorted(ad.modules) == ["layers.wq", "layers.wv"]
    a, b = ad.modules["layers.wq"]
    assert not a[0].any() and not b[0].any() and a[1].any() and b[1].any()  # layer 0 untouched


def _cfg(path, **changes):
    file = os.path.join(path, "adapter_config.json")
    with open(file) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(file, "w") as f:
        json.dump(cfg, f)


def _refused(named, match, max_rank=16, config=CONFIG):
    """load_adapter of `named`'s adapter directory (`named` itself unless it is one of its files)
    raises one line that starts with `named` and matches `match`."""
    path = os.path.dirname(named) if named.endswith((".json", ".safetensors")) else named
    with pytest.raises(ValueError) as e:
        load_adapter(path, config, max_rank)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert msg.startswith(named + ": "), msg
    assert re.search(match, msg), msg
    return msg


def test_refusals_name_file_and_field(tmp_path):
    root = str(tmp_path)
    ok = lambda name, **kw: write_adapter(root, name, HF, r=4, **kw)  # noqa: E731

    _refused(os.path.join(root, "nowhere"), "LoRA adapter directory not found")
    p = ok("noconfig")
    os.remove(os.path.join(p, "adapter_config.json"))
    _refused(os.path.join(p, "adapter_config.json"), "not found")
    p = ok("badjson")
    with open(os.path.join(p, "adapter_config.json"), "w") as f:
        f.write("{r: 4")
    _refused(os.path.join(p, "adapter_config.json"), "invalid JSON")
    p = ok("noweights")
    os.rename(os.path.join(p, "adapter_model.safetensors"), os.path.join(p, "adapter_model.bin"))
    _refused(os.path.join(p, "adapter_model.safetensors"), r"not found \(adapter_model.bin is not supported")
    p = ok("corrupt")
    w = os.path.join(p, "adapter_model.safetensors")
    with open(w, "r+b") as f:
        f.truncate(os.path.getsize(w) // 2)
    _refused(w, "corrupt or truncated")
    with open(w, "wb") as f:
        f.write(b"\xff" * 64)
    _refused(w, "corrupt or truncated")
    _refused(os.path.join(ok("rank", extra_config=dict(r=32)), "adapter_config.json"),
             "r=32 exceeds max_lora_rank=16")
    _refused(os.path.join(ok("lmhead", extra_config=dict(target_modules=["q_proj", "lm_head"])), "adapter_config.json"),
             "target module 'lm_head' is not in this model")
    fc1 = {f"{PRE}.0.mlp.fc1.lora_A.weight": np.zeros((4, 16), np.float32)}
    _refused(os.path.join(ok("fc1", tensors=fc1), "adapter_model.safetensors"),
             rf"tensor {PRE}.0.mlp.fc1.lora_A.weight: module mlp.fc1 is not in this model")
    emb = {"base_model.model.lm_head.lora_A.weight": np.zeros((4, 16), np.float32)}
    _refused(os.path.join(ok("emb", tensors=emb), "adapter_model.safetensors"),
             r"tensor base_model.model.lm_head.lora_A.weight is not supported")
    wrong = {f"{PRE}.1.self_attn.k_proj.lora_B.weight": np.zeros((16, 4), np.float32)}
    _refused(os.path.join(ok("shape", tensors=wrong), "adapter_model.safetensors"),
             rf"tensor {PRE}.1.self_attn.k_proj.lora_B.weight has shape \(16, 4\), the model and r=4 imply \(8, 4\)")
    _refused(os.path.join(ok("missing", skip=(f"{PRE}.1.mlp.down_proj.lora_B.weight",)), "adapter_model.safetensors"),
             rf"tensor {PRE}.1.mlp.down_proj.lora_B.weight is missing")
    deep = {f"{PRE}.5.self_attn.q_proj.lora_A.weight": np.zeros((4, 16), np.float32)}
    _refused(os.path.join(ok("deep", tensors=deep), "adapter_model.safetensors"),
             "layer 5 does not exist \\(the model has 2 layers\\)")
    for field, value in (("use_dora", True), ("bias", "all"), ("modules_to_save", ["lm_head"]),
                         ("fan_in_fan_out", True), ("rank_pattern", {"q_proj": 8})):
        _refused(os.path.join(ok(f"f-{field}", extra_config={field: value}), "adapter_config.json"),
                 re.escape(f"{field}={value!r} is not supported"))
    _refused(os.path.join(ok("notlora", extra_config=dict(peft_type="IA3")), "adapter_config.json"),
             "peft_type='IA3' is not supported")
    # an adapter of another model: shapes differ from this one's
    other = ModelConfig.from_hf(dict(HF, intermediate_size=32))
    _refused(os.path.join(ok("other"), "adapter_model.safetensors"), "gate_proj.lora_B.weight has shape", config=other)


def test_target_module_spellings(tmp_path):
    """Short names, PEFT's full module paths (what all-linear saves) and a regex string."""
    root = str(tmp_path)
    for i, tm in enumerate((["q", "v"], ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"],
                            r".*\.(q|v)_proj")):
        p = write_adapter(root, f"t{i}", HF, r=2, targets=("q_proj", "v_proj"), extra_config=dict(target_modules=tm))
        assert sorted(load_adapter(p, CONFIG, 4).modules) == ["layers.wq", "layers.wv"]
    p = write_adapter(root, "all", HF, r=2, extra_config=dict(target_modules="all-linear"))
    assert len(load_adapter(p, CONFIG, 4).modules) == 7
