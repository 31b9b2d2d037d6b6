"""Task and pooling resolution from a checkpoint's config and sentence-transformers files (no jax,
no weights): what `--task auto` picks and what an embed engine pools by default."""
import json

import pytest

from checkpoints import CheckpointError
from checkpoints.pooling_config import read_matryoshka, read_pooling_config
from jaxllm.config import EngineConfig
from jaxllm.engine.factory import resolve_task
from jaxllm.models.config import ModelConfig

HF = dict(model_type="llama", vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
          num_attention_heads=2)


def write_st(path, modes: dict, normalize: bool = True, pooling_path: str = "1_Pooling"):
    modules = [{"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "path": pooling_path, "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (path / "modules.json").write_text(json.dumps(modules))
    (path / pooling_path).mkdir()
    (path / pooling_path / "config.json").write_text(json.dumps({"word_embedding_dimension": 8, **modes}))


def test_architectures_decide_the_lm_head():
    assert ModelConfig.from_hf(dict(HF, architectures=["LlamaForCausalLM"])).has_lm_head
    assert ModelConfig.from_hf(HF).has_lm_head  # no architectures: a causal LM, as before
    assert not ModelConfig.from_hf(dict(HF, architectures=["MistralModel"])).has_lm_head  # e5-mistral
    # a base model with tied embeddings can still produce logits
    assert ModelConfig.from_hf(dict(HF, architectures=["Qwen3Model"], tie_word_embeddings=True)).has_lm_head


def test_resolve_task(tmp_path):
    causal = ModelConfig.from_hf(dict(HF, architectures=["LlamaForCausalLM"]))
    base = ModelConfig.from_hf(dict(HF, architectures=["LlamaModel"]))
    auto = EngineConfig()
    assert resolve_task(auto, causal, None).task == "generate"
    c = resolve_task(auto, base, None)
    assert (c.task, c.pooling_type, c.normalize) == ("embed", "LAST", True)
    c = resolve_task(EngineConfig(task="embed", pooling_type="MEAN", normalize=False), causal, None)
    assert (c.task, c.pooling_type, c.normalize) == ("embed", "MEAN", False)  # a causal LM as embedder
    with pytest.raises(ValueError, match="task='generate' is invalid for this checkpoint: .* without an LM head"):
        resolve_task(EngineConfig(task="generate"), base, None)
    write_st(tmp_path, {"pooling_mode_mean_tokens": True}, normalize=False)  # a causal LM dir with ST files
    c = resolve_task(auto, causal, str(tmp_path))
    assert (c.task, c.pooling_type, c.normalize) == ("embed", "MEAN", False)
    c = resolve_task(EngineConfig(pooling_type="LAST", normalize=True), causal, str(tmp_path))
    assert (c.pooling_type, c.normalize) == ("LAST", True)  # flags beat the checkpoint's files
    assert resolve_task(EngineConfig(task="generate"), causal, str(tmp_path)).task == "generate"


def test_sentence_transformers_files(tmp_path):
    assert read_pooling_config(str(tmp_path)) is None
    write_st(tmp_path, {"pooling_mode_lasttoken": True, "pooling_mode_mean_tokens": False})
    assert read_pooling_config(str(tmp_path)) == ("LAST", True)
    for modes, msg in [({"pooling_mode_cls_token": True}, "pooling_mode_cls_token=true is not supported"),
                       ({}, "exactly one of pooling_mode_lasttoken, pooling_mode_mean_tokens must be true")]:
        d = tmp_path / f"case{len(msg)}"
        d.mkdir()
        write_st(d, modes)
        with pytest.raises(CheckpointError, match=msg):
            read_pooling_config(str(d))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "modules.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="modules.json: invalid JSON"):
        read_pooling_config(str(bad))


def test_matryoshka_keys(tmp_path):
    """vLLM's is_matryoshka / matryoshka_dimensions: config.json first, else the
    sentence-transformers config; resolve_task fills the engine's fields unless they are set."""
    base = ModelConfig.from_hf(dict(HF, architectures=["LlamaModel"]))
    plain, hf, st_only, flag = (tmp_path / n for n in ("plain", "hf", "st", "flag"))
    for d in (plain, hf, st_only, flag):
        d.mkdir()
    (plain / "config.json").write_text(json.dumps(HF))
    (hf / "config.json").write_text(json.dumps(dict(HF, matryoshka_dimensions=[8, 2, 4])))
    (hf / "config_sentence_transformers.json").write_text(json.dumps({"matryoshka_dimensions": [6]}))
    (st_only / "config.json").write_text(json.dumps(HF))
    (st_only / "config_sentence_transformers.json").write_text(json.dumps({"matryoshka_dimensions": [4, 8]}))
    (flag / "config.json").write_text(json.dumps(dict(HF, is_matryoshka=True)))
    assert read_matryoshka(str(plain)) == (False, None)
    assert read_matryoshka(str(hf)) == (True, [2, 4, 8])  # config.json wins, sorted
    assert read_matryoshka(str(st_only)) == (True, [4, 8])
    assert read_matryoshka(str(flag)) == (True, None)  # any dimensions
    embed = EngineConfig(task="embed")
    c = resolve_task(embed, base, str(hf))
    assert (c.is_matryoshka, c.matryoshka_dimensions) == (True, [2, 4, 8])
    c = resolve_task(embed, base, str(plain))
    assert (c.is_matryoshka, c.matryoshka_dimensions) == (False, None)
    c = resolve_task(EngineConfig(task="embed", is_matryoshka=False), base, str(hf))
    assert (c.is_matryoshka, c.matryoshka_dimensions) == (False, None)  # the engine's setting wins
    (flag / "config.json").write_text(json.dumps(dict(HF, matryoshka_dimensions=[0])))
    with pytest.raises(CheckpointError, match=r"matryoshka_dimensions=\[0\] is invalid"):
        read_matryoshka(str(flag))
    with pytest.raises(ValueError, match=r"matryoshka_dimensions=\[\] is invalid"):
        EngineConfig(matryoshka_dimensions=[]).validate()
