"""Sequence classification and cross-encoder scoring vs HF transformers' *ForSequenceClassification:
tiny random checkpoints (tests/models/hf_tiny.py) loaded by the real engine, task auto-detected as
"classify". Raw logits (PoolingParams(activation=False)) equal HF's within 1e-4 in fp32 for a batch of
prompts of different lengths, one longer than the token budget (chunked: only the final chunk's last
token counts); probs are vLLM's activation of HF's logits (softmax, sigmoid for one label); a
cross-encoder's LLM.score equals sigmoid of HF's logit of the tokenizer's pair encoding. Every KV block
is free after, nothing compiles after warm-up, and the misuses are one-line errors naming the field."""
import numpy as np
import pytest

from jaxllm.llm import LLM
from jaxllm.models.config import ModelConfig
from jaxllm.pooling_params import PoolingParams
from jaxllm.sampling_params import SamplingParams
from tests.models.hf_tiny import COMMON, hf_classifier_logits, make_tiny_hf_classifier

BUDGET = 64
LENGTHS = (1, 7, 33, 150)  # 150 > BUDGET: prefilled in 3 chunks


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny_hf_cls"))


def build(path):
    return LLM(path, max_num_batched_tokens=BUDGET, max_num_seqs=4, max_model_len=256,
               kv_cache_memory_bytes=1 << 22)


@pytest.fixture(scope="module")
def llama3(root):
    path = make_tiny_hf_classifier("llama", root, num_labels=3)
    return path, build(path)


@pytest.fixture(scope="module")
def qwen3_ce(root):
    path = make_tiny_hf_classifier("qwen3", root, num_labels=1, tokenizer=True)
    return path, build(path)


def prompts(seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n).tolist() for n in LENGTHS]


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def check_parity(path, llm, seqs, activation):
    e = llm.engine
    compiled = (e.runner.compile_count, e.runner.num_traces)
    raw = llm.classify(seqs, PoolingParams(activation=False), use_tqdm=False)
    outs = llm.classify(seqs, use_tqdm=False)
    ref = hf_classifier_logits(path, seqs)
    assert np.std([r[0] for r in ref]) > 0.1  # not degenerate: the prompts' logits differ
    for r, o, want, s in zip(raw, outs, ref, seqs):
        assert r.prompt_token_ids == s == o.prompt_token_ids and r.finished
        np.testing.assert_allclose(r.outputs.probs, want, atol=1e-4, rtol=0)
        np.testing.assert_allclose(o.outputs.probs, activation(want.astype(np.float64)), atol=1e-5, rtol=0)
        assert o.outputs.num_classes == len(want)
    stats = e.get_stats()
    assert stats["num_free_blocks"] == stats["num_blocks"] and not e.kv.pool.cached
    assert (e.runner.compile_count, e.runner.num_traces) == compiled, "compiled after warm-up"


def test_llama_classifier_logits_and_softmax_match_hf(llama3):
    path, llm = llama3
    e = llm.engine
    mc = e.runner.model_config
    assert e.task == "classify" and mc.num_labels == 3 and not mc.has_lm_head
    assert mc.labels == ("label_a", "label_b", "label_c") and mc.classify_activation == "softmax"
    assert e.runner.compile_count == len(e.runner.buckets.mixed) == e.runner.warmup_compile_count  # its classify
    # step per mixed bucket
    check_parity(path, llm, prompts(0), softmax)


def test_qwen3_cross_encoder_classify_is_sigmoid_and_score_is_sigmoid_of_the_pair(qwen3_ce):
    path, llm = qwen3_ce
    mc = llm.engine.runner.model_config
    assert llm.engine.task == "classify" and mc.num_labels == 1 and mc.score_activation == "sigmoid"
    check_parity(path, llm, prompts(1), lambda x: 1 / (1 + np.exp(-x)))

    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(path)
    query, docs = "w9 w17 w30", ["w40 w41", "w99 w5 w7 w200 w11", "w30 w9", "w250"]
    pairs = [hf_tok("w9 w17 w30", d)["input_ids"] for d in docs]
    assert pairs[0] == [1, 9, 17, 30, 3, 40, 41, 3]  # <bos> a <sep> b <sep>: the pair template ran
    want = 1 / (1 + np.exp(-np.array([l[0] for l in hf_classifier_logits(path, pairs)], np.float64)))
    assert np.ptp(want) > 0.01
    one_n = llm.score(query, docs, use_tqdm=False)
    n_n = llm.score([query] * 2, docs[:2], use_tqdm=False)
    assert [o.prompt_token_ids for o in one_n] == pairs
    np.testing.assert_allclose([o.outputs.score for o in one_n], want, atol=1e-5, rtol=0)
    np.testing.assert_allclose([o.outputs.score for o in n_n], want[:2], atol=1e-5, rtol=0)
    cut = llm.score(query, docs[1], truncate_prompt_tokens=4, use_tqdm=False)[0]
    assert cut.prompt_token_ids == pairs[1][-4:]


def test_gemma2_classifier_matches_hf(root):
    path = make_tiny_hf_classifier("gemma2", root, num_labels=2)
    llm = build(path)
    assert llm.engine.runner.model_config.architecture == "gemma2"
    check_parity(path, llm, prompts(2), softmax)


def test_misuse_is_one_line_naming_the_field(llama3, qwen3_ce):
    _, llm = llama3
    with pytest.raises(ValueError, match=r"^num_labels=3 is invalid for score"):
        llm.score("w1", "w2", use_tqdm=False)
    with pytest.raises(ValueError, match=r"^task='classify' is invalid for embed\(\)"):
        llm.embed([[1, 2]], use_tqdm=False)
    with pytest.raises(ValueError, match=r"^task='classify' is invalid for SamplingParams"):
        llm.generate([[1, 2]], SamplingParams(max_tokens=1), use_tqdm=False)
    for bad, field in ((PoolingParams(dimensions=2), "dimensions"), (PoolingParams(normalize=True), "normalize"),
                       (PoolingParams(pooling_type="MEAN"), "pooling_type")):
        with pytest.raises(ValueError, match=rf"^{field}=.* is invalid for task='classify'"):
            llm.classify([[1, 2]], bad, use_tqdm=False)
    with pytest.raises(ValueError, match=r"^task='generate' is invalid for this checkpoint: .* sequence classifier"):
        LLM(llama3[0], task="generate", max_model_len=64, kv_cache_memory_bytes=1 << 20)
    for kw, field in ((dict(pooling_type="MEAN"), "pooling_type='MEAN'"), (dict(normalize=True), "normalize=True")):
        with pytest.raises(ValueError, match=rf"^{field} is invalid for task='classify'"):  # the engine flags too
            LLM(llama3[0], max_model_len=64, kv_cache_memory_bytes=1 << 20, **kw)
    with pytest.raises(ValueError, match=r"^task='classify' is invalid for this checkpoint: the llama model has no "
                                         r"classifier head"):
        LLM("dummy:tiny-llama", task="classify", max_model_len=64, kv_cache_memory_bytes=1 << 20)
    with pytest.raises(ValueError, match=r"^text_1 has 2 items and text_2 has 3"):
        qwen3_ce[1].score(["a", "b"], ["c", "d", "e"], use_tqdm=False)
    stats = llm.engine.get_stats()
    assert stats["num_free_blocks"] == stats["num_blocks"]


@pytest.mark.parametrize("arch", ["LlamaForSequenceClassification", "MistralForSequenceClassification",
                                  "Qwen2ForSequenceClassification", "Qwen3ForSequenceClassification",
                                  "Gemma2ForSequenceClassification"])
def test_every_family_classifier_config_reads_labels_and_activations(arch):
    model_type = arch.split("For")[0].lower()
    cfg = dict(COMMON, model_type=model_type, architectures=[arch], id2label={"0": "neg", "1": "pos"},
               tie_word_embeddings=True, head_dim=16)
    c = ModelConfig.from_hf(cfg)
    assert (c.num_labels, c.labels, c.classify_activation, c.has_lm_head) == (2, ("neg", "pos"), "softmax", False)
    one = ModelConfig.from_hf(dict(cfg, id2label={"0": "LABEL_0"}, sbert_ce_default_activation_function=
                                   "torch.nn.modules.linear.Identity"))
    assert (one.num_labels, one.classify_activation, one.score_activation) == (1, "sigmoid", "identity")
    assert ModelConfig.from_hf(dict(cfg, problem_type="multi_label_classification")).classify_activation == "sigmoid"
    assert ModelConfig.from_hf(dict(cfg, problem_type="regression")).classify_activation == "identity"
    assert ModelConfig.from_hf({k: v for k, v in cfg.items() if k != "id2label"}).num_labels == 2  # HF's default
    causal = ModelConfig.from_hf(dict(cfg, architectures=[arch.replace("SequenceClassification", "CausalLM")]))
    assert causal.num_labels == 0 and causal.has_lm_head
    with pytest.raises(ValueError, match="sbert_ce_default_activation_function='os.system' is not supported"):
        ModelConfig.from_hf(dict(cfg, sbert_ce_default_activation_function="os.system"))


def test_cli_classifies_jsonl_prompts_like_hf(llama3, tmp_path, capsys):
    import json

    from jaxllm.generate import main

    path, _ = llama3
    seqs = prompts(3)[:3]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"prompt_token_ids": s}) + "\n" for s in seqs))
    rc = main(["--model", path, "--input", str(src), "--output", str(dst), "--max-model-len", "256",
               "--max-num-batched-tokens", str(BUDGET), "--max-num-seqs", "4", "--kv-cache-memory-bytes",
               str(1 << 22), "--no-progress"])
    assert rc == 0
    lines = [json.loads(x) for x in dst.read_text().splitlines()]
    ref = hf_classifier_logits(path, seqs)
    for line, s, want in zip(lines, seqs, ref):
        assert line["prompt_token_ids"] == s
        np.testing.assert_allclose(line["probs"], softmax(want.astype(np.float64)), atol=1e-5, rtol=0)
        assert line["label"] == ("label_a", "label_b", "label_c")[int(np.argmax(want))]
    assert "3 classifications" in capsys.readouterr().out


def test_orbax_conversion_keeps_the_head_and_labels(llama3, tmp_path):
    from checkpoints.convert import main as convert

    path, _ = llama3
    assert convert([path, str(tmp_path / "orbax")]) == 0
    llm = build(str(tmp_path / "orbax"))
    mc = llm.engine.runner.model_config
    assert llm.engine.task == "classify" and mc.labels == ("label_a", "label_b", "label_c")
    seqs = prompts(4)[:2]
    raw = llm.classify(seqs, PoolingParams(activation=False), use_tqdm=False)
    for r, want in zip(raw, hf_classifier_logits(path, seqs)):
        np.testing.assert_allclose(r.outputs.probs, want, atol=1e-4, rtol=0)
