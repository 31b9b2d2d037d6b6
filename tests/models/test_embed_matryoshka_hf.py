"""Matryoshka ``dimensions`` end to end on a real checkpoint: a tiny random LlamaModel whose
config.json lists ``matryoshka_dimensions`` (as vLLM reads them) is loaded by ``LLM`` with the task
and the Matryoshka fields resolved from it; ``PoolingParams(dimensions=d)`` equals HF transformers'
unnormalised last_hidden_state pooling cut to d and normalised here in numpy; a d not listed is a
one-line ValueError naming it and the allowed values."""
import json
import os

import numpy as np
import pytest

from jaxllm.llm import LLM
from jaxllm.pooling_params import PoolingParams
from tests.models.hf_tiny import hf_embeddings, make_tiny_hf_embed


def test_matryoshka_checkpoint_cuts_like_hf(tmp_path):
    path = make_tiny_hf_embed("llama", str(tmp_path))
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    hidden = cfg["hidden_size"]
    dims = [hidden // 4, hidden // 2, hidden]
    cfg["matryoshka_dimensions"] = dims
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    llm = LLM(path, max_num_batched_tokens=64, max_num_seqs=4, max_model_len=128, kv_cache_memory_bytes=1 << 22)
    assert (llm.engine.task, llm.config.is_matryoshka) == ("embed", None)  # the user's config: unset
    assert llm.engine.config.matryoshka_dimensions == dims  # resolved from the checkpoint
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, 256, n).tolist() for n in (5, 40)]
    ref = hf_embeddings(path, seqs, "MEAN", normalize=False)  # [2, hidden]
    for d in dims[:2]:
        outs = llm.embed(seqs, PoolingParams(pooling_type="MEAN", dimensions=d), use_tqdm=False)
        for o, r in zip(outs, ref):
            want = r[:d] / np.linalg.norm(r[:d])
            assert len(o.outputs.embedding) == d
            np.testing.assert_allclose(o.outputs.embedding, want, atol=1e-4)
    with pytest.raises(ValueError, match=rf"dimensions=3 is invalid: must be one of the model's matryoshka_dimensions \[{dims[0]}, "):
        llm.embed(seqs[:1], PoolingParams(dimensions=3), use_tqdm=False)
