"""--hf-overrides and unconverted rerankers (vLLM's classifier_from_token recipe) vs HF transformers.

Tiny random *ForCausalLM checkpoints with a word-level tokenizer whose words "no", "yes", "maybe" are ids
5, 6, 7 (tests/models/hf_tiny.py make_tiny_hf_reranker), loaded by the real engine with vLLM's overrides:
- Qwen3-Reranker's (from_2_way_softmax): the one raw logit is HF's causal-LM logit of "yes" minus "no" at
  the last token, probs its sigmoid (= the 2-way softmax probability of "yes"), LLM.score, /score and
  /rerank the sigmoid of that difference on text_1 + text_2 encoded as one text (vLLM's use_sep_token False);
  with a Qwen3-Reranker-style score template (LLM.score(chat_template=), a server's --chat-template: /rerank,
  /v1/score, gRPC Score, run_batch) the same on the template rendered by jinja2 here and tokenized by HF;
- no_post_processing on a tied Llama, with rms_norm_eps and max_position_embeddings overridden too: the
  raw logits are HF's logits of the three tokens with HF loading the same overrides;
and the misuses are one-line errors naming the field (bad JSON, the wrong format, unknown tokens, ...)."""
import json

import numpy as np
import pytest

from checkpoints import CheckpointError, load_checkpoint, load_config
from jaxllm.hf_overrides import apply_hf_overrides, parse_hf_overrides
from jaxllm.llm import LLM
from jaxllm.models.config import ModelConfig, ModelConfigError
from jaxllm.pooling_params import PoolingParams
from tests.models.hf_tiny import COMMON, make_tiny_hf_reranker

NO, YES, MAYBE = 5, 6, 7  # the tokenizer's ids of the words
QWEN3_RERANKER = {"architectures": ["Qwen3ForSequenceClassification"], "classifier_from_token": ["no", "yes"],
                  "is_original_qwen3_reranker": True}
# the classify parity tests' engine shape (tests/models/test_classify_parity_hf.py): same executables
ENGINE = dict(max_num_batched_tokens=64, max_num_seqs=4, max_model_len=256, kv_cache_memory_bytes=1 << 22)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny_hf_reranker"))


def prompts(seed, lengths=(1, 7, 33, 150)):  # 150 > the budget of 64: prefilled in 3 chunks
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n).tolist() for n in lengths]


def hf_last_logits(path, seqs, **overrides):
    """HF's causal-LM logits of each sequence's last token (fp32, eager), the config overridden as asked."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                              attn_implementation="eager", **overrides)
    with torch.no_grad():
        return np.stack([model(torch.tensor([s])).logits[0, -1].numpy() for s in seqs]).astype(np.float64)


def sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


@pytest.fixture(scope="module")
def qwen3(root):
    path = make_tiny_hf_reranker("qwen3", root)
    return path, LLM(path, hf_overrides=QWEN3_RERANKER, **ENGINE)


def test_qwen3_reranker_from_2_way_softmax_matches_hf_yes_minus_no(qwen3):
    path, llm = qwen3
    e = llm.engine
    mc = e.runner.model_config
    assert e.task == "classify"
    assert (mc.num_labels, mc.labels, mc.classifier_method) == (1, ("yes",), "from_2_way_softmax")
    assert not mc.has_lm_head and mc.classifier_token_ids == (NO, YES) and mc.score_activation == "sigmoid"
    assert e.config.hf_overrides == QWEN3_RERANKER
    compiled = e.runner.compile_count
    seqs = prompts(0)
    raw = llm.classify(seqs, PoolingParams(activation=False), use_tqdm=False)
    outs = llm.classify(seqs, use_tqdm=False)
    ref = hf_last_logits(path, seqs)
    want = ref[:, YES] - ref[:, NO]
    assert np.ptp(want) > 0.1  # not degenerate: the prompts' logits differ
    two_way = np.exp(ref[:, [NO, YES]]) / np.exp(ref[:, [NO, YES]]).sum(1, keepdims=True)
    np.testing.assert_allclose(sigmoid(want), two_way[:, 1], atol=1e-12)  # the recipe's identity, in float64
    np.testing.assert_allclose([r.outputs.probs[0] for r in raw], want, atol=1e-4, rtol=0)
    np.testing.assert_allclose([o.outputs.probs[0] for o in outs], sigmoid(want), atol=1e-4, rtol=0)
    assert [o.prompt_token_ids for o in outs] == seqs

    # LLM.score: the cross-encoder path; an LLM as reranker (vLLM's use_sep_token False) encodes text_1 + text_2
    # as one text, as the caller formatted them (Qwen3-Reranker's prompt: README)
    hf_tok = e.tokenizer.hf
    assert mc.use_sep_token is False
    query, docs = "w9 w17 yes ", ["w40 no", "w99 w5 w7 w200 w11", "maybe w9"]
    pairs = [hf_tok(query + d)["input_ids"] for d in docs]
    assert pairs[0] == [1, 9, 17, YES, 40, NO]  # one text: no <sep> from the pair template
    ref = hf_last_logits(path, pairs)
    scores = llm.score(query, docs, use_tqdm=False)
    assert [s.prompt_token_ids for s in scores] == pairs
    np.testing.assert_allclose([s.outputs.score for s in scores], sigmoid(ref[:, YES] - ref[:, NO]), atol=1e-4)
    stats = e.get_stats()
    assert stats["num_free_blocks"] == stats["num_blocks"] and e.runner.compile_count == compiled


def test_qwen3_reranker_over_http_score_and_rerank_equal_hf(qwen3):
    """/score and /rerank (serving/openai_score.py) on the converted reranker, as on a converted one."""
    import httpx

    from tests.serving.serving_helpers import run, running_server

    path, llm = qwen3
    query, docs = "w9 w17 yes ", ["w40 no", "w99 w5 w7 w200 w11", "maybe w9", "w250"]

    async def calls():
        async with running_server(llm.engine, http_port=0) as c:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{c.server.http_port}", timeout=60) as h:
                score = await h.post("/v1/score", json={"text_1": query, "text_2": docs})
                rerank = await h.post("/rerank", json={"query": query, "documents": docs, "top_n": 3})
            await c.wait_blocks_free()
            return score, rerank

    score, rerank = run(calls(), timeout=120)
    ref = hf_last_logits(path, [llm.engine.tokenizer.hf(query + d)["input_ids"] for d in docs])
    want = sigmoid(ref[:, YES] - ref[:, NO])
    assert score.status_code == 200 and np.ptp(want) > 0.01, score.text
    np.testing.assert_allclose([d["score"] for d in score.json()["data"]], want, atol=1e-4, rtol=0)
    order = [int(i) for i in np.argsort(-want, kind="stable")[:3]]
    res = rerank.json()["results"]
    assert [x["index"] for x in res] == order
    np.testing.assert_allclose([x["relevance_score"] for x in res], want[order], atol=1e-4, rtol=0)


def test_llama_no_post_processing_tied_with_config_overrides_matches_hf(root):
    path = make_tiny_hf_reranker("llama", root, tie_word_embeddings=True)
    ov = {"architectures": ["LlamaForSequenceClassification"], "classifier_from_token": ["no", "yes", "maybe"],
          "method": "no_post_processing", "rms_norm_eps": 0.5, "max_position_embeddings": 300}
    mc, _ = load_config(path, hf_overrides=ov)
    assert (mc.rms_norm_eps, mc.max_position_embeddings, mc.num_labels) == (0.5, 300, 3)
    with pytest.raises(ValueError, match=r"^max_model_len=400 is invalid: the model supports at most 300 positions"):
        LLM(path, hf_overrides=ov, max_model_len=400, kv_cache_memory_bytes=1 << 20)
    llm = LLM(path, hf_overrides=json.dumps(ov), **ENGINE)  # JSON text is taken too
    mc = llm.engine.runner.model_config
    assert (mc.labels, mc.classify_activation, mc.tie_word_embeddings) == (("no", "yes", "maybe"), "softmax", True)
    seqs = prompts(1, (1, 9, 70))
    raw = np.array([r.outputs.probs for r in llm.classify(seqs, PoolingParams(activation=False), use_tqdm=False)])
    want = hf_last_logits(path, seqs, rms_norm_eps=0.5)[:, [NO, YES, MAYBE]]
    plain = hf_last_logits(path, seqs)[:, [NO, YES, MAYBE]]
    assert np.abs(want - plain).max() > 0.05  # the override changes what is computed
    np.testing.assert_allclose(raw, want, atol=1e-4, rtol=0)


def test_overrides_merge_like_vllm_and_refuse_in_one_line(root, tmp_path, capsys):
    raw = {"rms_norm_eps": 1e-6, "rope_scaling": {"type": "linear", "factor": 2.0},
           "text_config": {"rms_norm_eps": 1e-6, "hidden_size": 8, "rope_scaling": {"factor": 2.0, "type": "x"}}}
    got = apply_hf_overrides(raw, {"rope_scaling": {"factor": 4.0}, "text_config": {
        "rms_norm_eps": 1e-5, "rope_scaling": {"factor": 3.0}}, "new": [1]})
    assert got == {"rms_norm_eps": 1e-6, "rope_scaling": {"factor": 4.0}, "new": [1],  # a dict parameter: replaced
                   "text_config": {"rms_norm_eps": 1e-5, "hidden_size": 8,  # a sub-config: merged
                                   "rope_scaling": {"factor": 3.0, "type": "x"}}}
    assert raw["text_config"]["rms_norm_eps"] == 1e-6  # the checkpoint's dict untouched
    assert parse_hf_overrides(None) is None and parse_hf_overrides('{"a": {"b": 1}}') == {"a": {"b": 1}}
    with pytest.raises(ValueError, match=r"^--hf-overrides '\{rms' is invalid: not JSON"):
        parse_hf_overrides("{rms")
    with pytest.raises(ValueError, match=r"^hf_overrides=\[1\] is invalid: must be a JSON object"):
        LLM("dummy:tiny-llama", hf_overrides=[1])

    from jaxllm.generate import main
    for bad in ("{rms", "[1, 2]"):
        with pytest.raises(SystemExit) as exc:
            main(["--model", "dummy:tiny-llama", "--prompt", "x", "--hf-overrides", bad])
        assert exc.value.code == 2
    with pytest.raises(CheckpointError, match=r"^--hf-overrides is invalid for tiny-llama: it is dummy weights"):
        LLM("dummy:tiny-llama", hf_overrides={"rms_norm_eps": 0.1}, max_model_len=64, kv_cache_memory_bytes=1 << 20)
    # the server refuses it in one line before its port opens (it said "engine failed to start" after)
    from serving.__main__ import main as serve_main
    assert serve_main(["--model", "tiny-llama", "--load-format", "dummy", "--port", "0",
                       "--hf-overrides", '{"rms_norm_eps": 0.1}']) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == ("error: --hf-overrides is invalid for tiny-llama: it is dummy weights "
                                              "(load_format dummy: edit the preset's config.json instead); the flag "
                                              "edits an HF safetensors checkpoint's config.json")

    path = make_tiny_hf_reranker("qwen3", root)
    with pytest.raises(CheckpointError, match=r"classifier_from_token token 'Yes' is not in the tokenizer's vocab"):
        load_checkpoint(path, hf_overrides=dict(QWEN3_RERANKER, classifier_from_token=["no", "Yes"]))
    with pytest.raises(CheckpointError, match=r"is_original_qwen3_reranker=True needs classifier_from_token"):
        load_config(path, hf_overrides={"architectures": ["Qwen3ForSequenceClassification"],
                                        "is_original_qwen3_reranker": True})
    cfg = dict(COMMON, model_type="qwen3", architectures=["Qwen3ForSequenceClassification"], head_dim=16)
    for over, msg in (
            (dict(classifier_from_token=["a", "b", "c"], method="from_2_way_softmax"),
             r"classifier_from_token=\['a', 'b', 'c'\] is invalid for method 'from_2_way_softmax': must be 2"),
            (dict(classifier_from_token=["a", "b"], method="mean"), r"method='mean' is invalid: must be one of"),
            (dict(classifier_from_token="yes"), r"classifier_from_token='yes' is invalid: must be a list"),
            (dict(classifier_from_token=["a", "a"]),
             r"classifier_from_token=\[.a., .a.\] is invalid: a token is listed twice"),
            (dict(classifier_from_token=["a", "b"], architectures=["Qwen3ForCausalLM"]),
             r"classifier_from_token=\['a', 'b'\] needs architectures naming a \*ForSequenceClassification")):
        with pytest.raises(ModelConfigError, match=r"^config.json: " + msg):
            ModelConfig.from_hf(dict(cfg, **over))
    one = ModelConfig.from_hf(dict(cfg, classifier_from_token=["Yes"], id2label={"0": "a", "1": "b"}))
    assert (one.num_labels, one.labels, one.classifier_method, one.classify_activation, one.use_sep_token) == (
        1, ("Yes",), "no_post_processing", "sigmoid", False)  # bge-reranker-v2-gemma's shape; id2label ignored
    # vLLM's use_sep_token: True for a cross-encoder, False for an LLM as reranker, use_pad_token (old name) wins
    assert ModelConfig.from_hf(cfg).use_sep_token is True
    assert ModelConfig.from_hf(dict(cfg, classifier_from_token=["a"], use_pad_token=True)).use_sep_token is True
    assert ModelConfig.from_hf(dict(cfg, use_sep_token=False, use_pad_token=True)).use_sep_token is True
    with pytest.raises(ModelConfigError, match=r"^config.json: use_sep_token='no' is invalid: must be true or false"):
        ModelConfig.from_hf(dict(cfg, use_sep_token="no"))


def test_head_rows_fold_in_the_logits_divisor():
    """Granite divides its logits by logits_scaling: the head's rows are divided too, so the 2-way
    difference and the raw logits stay the causal LM's (a numpy check of score_from_lm_rows)."""
    import dataclasses

    from checkpoints.seq_cls_from_lm import score_from_lm_rows

    cfg = dict(COMMON, model_type="granite", architectures=["GraniteForSequenceClassification"],
               logits_scaling=2.5, classifier_from_token=["no", "yes"])
    rows = np.random.default_rng(0).normal(size=(2, COMMON["hidden_size"]))  # [tokens, hidden]
    mc = ModelConfig.from_hf(cfg)
    assert mc.logits_scaling == 2.5
    w = score_from_lm_rows(dataclasses.replace(mc, classifier_token_ids=(NO, YES)), rows, "x")
    np.testing.assert_allclose(w[:, 0], (rows[1] - rows[0]) / 2.5)
    raw = ModelConfig.from_hf(dict(cfg, method="no_post_processing"))
    w = score_from_lm_rows(dataclasses.replace(raw, classifier_token_ids=(NO, YES)), rows, "x")
    np.testing.assert_allclose(w, rows.T / 2.5)
    with pytest.raises(CheckpointError, match=r"^x: classifier_from_token=\['no', 'yes'\] has no token ids"):
        score_from_lm_rows(mc, rows, "x")


def test_orbax_conversion_with_overrides_keeps_the_built_head(root, tmp_path):
    """python -m checkpoints.convert --hf-overrides: the store holds the score head built from the LM head
    (HF's lm_head.weight rows, read back with safetensors) and the reranker's config fields."""
    from safetensors.numpy import load_file

    from checkpoints.convert import main as convert

    path = make_tiny_hf_reranker("qwen3", root)
    dst = str(tmp_path / "orbax")
    assert convert([path, dst, "--hf-overrides", "{rms"]) == 2
    assert convert([path, dst, "--hf-overrides", json.dumps(QWEN3_RERANKER)]) == 0
    ck = load_checkpoint(dst)
    lm = load_file(f"{path}/model.safetensors")["lm_head.weight"].astype(np.float64)
    assert ck.format == "orbax" and "lm_head" not in ck.params
    assert (ck.config.classifier_token_ids, ck.config.use_sep_token, ck.config.num_labels) == ((NO, YES), False, 1)
    np.testing.assert_allclose(np.asarray(ck.params["score"])[:, 0], lm[YES] - lm[NO], atol=1e-6)


# A Qwen3-Reranker-style score template (vLLM's --chat-template for /score and /rerank, ours), in the tiny
# tokenizer's words: w10 <|im_start|>, w11 <|im_end|>, w12 system, w13 user, w14 assistant, w15 <think>,
# w16 </think>, w17 w18 the judge's sentence, w19 <Instruct>:, w20 <Query>:, w21 <Document>:, w26 w27 the
# default instruction; the query and document are picked out of messages by role, as vLLM's template does.
SCORE_TEMPLATE = """w10 w12 w17 w18 w11
w10 w13
{% set query = messages | selectattr("role", "eq", "query") | map(attribute="content") | first %}
{% set doc = messages | selectattr("role", "eq", "document") | map(attribute="content") | first %}
w19 {{ instruction | default("w26 w27") }}
w20 {{ query }}
w21 {{ doc }} w11
w10 w14
w15 w16
"""


def rendered_ids(hf_tok, query, docs, **variables):
    """The reference prompts: SCORE_TEMPLATE rendered by jinja2 itself (the whitespace rules transformers
    gives chat templates), then the HF tokenizer with its default special tokens (<bos> here)."""
    import jinja2

    tpl = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(SCORE_TEMPLATE)
    texts = [tpl.render(messages=[{"role": "query", "content": query}, {"role": "document", "content": d}],
                        **variables) for d in docs]
    return [hf_tok(t)["input_ids"] for t in texts]


def test_qwen3_reranker_score_template_offline_equals_hf_on_the_rendered_prompt(qwen3):
    """LLM.score(chat_template=): the score is sigmoid(HF logit(yes) - logit(no)) on the independently
    rendered and tokenized prompt; chat_template_kwargs fill the instruction; truncate_prompt_tokens cuts
    the rendered prompt; a failing or blank template is a ValueError naming chat_template, and the engine
    scores on afterwards."""
    path, llm = qwen3
    hf_tok = llm.engine.tokenizer.hf
    query, docs = "w9 w30 yes", ["w40 no", "w99 w5 w7 w200 w11", "maybe w9"]
    plain = hf_tok(query + docs[0])["input_ids"]
    ids = rendered_ids(hf_tok, query, docs)
    assert ids[0][:3] == [1, 10, 12] and ids[0][-3:] == [14, 15, 16]  # <bos>, then the template's turns
    assert ids[0][ids[0].index(19) + 1:ids[0].index(20)] == [26, 27]  # the default instruction
    ids_instr = rendered_ids(hf_tok, query, docs, instruction="w50 w51 w52")
    cut = ids[1][-9:]
    ref = hf_last_logits(path, ids + ids_instr + [cut, plain])
    want = sigmoid(ref[:, YES] - ref[:, NO])
    assert np.ptp(want) > 0.01 and abs(want[0] - want[-1]) > 1e-3  # the template changes the score

    got = llm.score(query, docs, chat_template=SCORE_TEMPLATE, use_tqdm=False)
    assert [s.prompt_token_ids for s in got] == ids
    np.testing.assert_allclose([s.outputs.score for s in got], want[:3], atol=1e-4, rtol=0)
    got = llm.score([query] * 3, docs, chat_template=SCORE_TEMPLATE, use_tqdm=False,
                    chat_template_kwargs={"instruction": "w50 w51 w52"})
    assert [s.prompt_token_ids for s in got] == ids_instr
    np.testing.assert_allclose([s.outputs.score for s in got], want[3:6], atol=1e-4, rtol=0)
    got = llm.score(query, docs[1], truncate_prompt_tokens=9, chat_template=SCORE_TEMPLATE, use_tqdm=False)
    assert got[0].prompt_token_ids == cut
    np.testing.assert_allclose(got[0].outputs.score, want[6], atol=1e-4, rtol=0)

    for template, kwargs, msg in (
            ("{{ messages[0].content }} {{ x | nosuchfilter }}", None,
             r"^chat_template is invalid: the score template failed to render pair 0 \(query 'w9 w30 yes', "
             r"document 'w40 no'\): TemplateAssertionError: No filter named 'nosuchfilter'"),
            ("{% if messages[5].content %}w9{% endif %}", None,
             r"^chat_template is invalid: the score template failed to render pair 0 .*UndefinedError"),
            ("{% if false %}w9{% endif %}  ", None,
             r"^chat_template is invalid: the score template rendered pair 0 as blank text \('  '\); it must"),
            ("", None, r"^chat_template='' is invalid: must be a non-empty Jinja template"),
            (SCORE_TEMPLATE, {"messages": []}, r"^chat_template_kwargs.messages is invalid: messages is set by"),
            (None, {"instruction": "w5"}, r"^chat_template_kwargs is invalid without a score template: give "
                                          r"chat_template")):
        with pytest.raises(ValueError, match=msg):
            llm.score(query, docs, chat_template=template, chat_template_kwargs=kwargs, use_tqdm=False)
    got = llm.score(query, docs[0], use_tqdm=False)  # no template: the plain text_1 + text_2 encoding still
    assert got[0].prompt_token_ids == plain
    np.testing.assert_allclose(got[0].outputs.score, want[-1], atol=1e-4, rtol=0)


def test_qwen3_reranker_score_template_over_http_grpc_and_run_batch(qwen3):
    """A server started with the template (--chat-template) applies it to /rerank, /v1/score, the gRPC
    Score rpc and run_batch's /v1/score lines: each score equals HF's on the reference rendering; a body's
    chat_template_kwargs fill the instruction; a template that does not render is a 400 naming
    --chat-template and why, and the server answers the next request."""
    import httpx

    from serving.config import ServerConfig
    from serving.proto.jaxllm.v1 import generation_pb2 as pb
    from serving.run_batch import BatchRunner
    from tests.serving.serving_helpers import run, running_server

    path, llm = qwen3
    hf_tok = llm.engine.tokenizer.hf
    query, docs = "w9 w30 yes", ["w40 no", "w99 w5 w7 w200 w11", "maybe w9", "w250"]
    ids, ids_instr = rendered_ids(hf_tok, query, docs), rendered_ids(hf_tok, query, docs, instruction="w60")
    ref = hf_last_logits(path, ids + ids_instr)
    want, want_instr = np.split(sigmoid(ref[:, YES] - ref[:, NO]), 2)
    assert np.ptp(want) > 0.01 and np.abs(want - want_instr).max() > 1e-3

    async def calls():
        async with running_server(llm.engine, http_port=0, chat_template=SCORE_TEMPLATE) as c:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{c.server.http_port}", timeout=60) as h:
                rerank = await h.post("/rerank", json={"query": query, "documents": docs, "top_n": 3})
                score = await h.post("/v1/score", json={"text_1": query, "text_2": docs,
                                                        "chat_template_kwargs": {"instruction": "w60"}})
                reserved = await h.post("/score", json={"text_1": query, "text_2": docs,
                                                        "chat_template_kwargs": {"messages": []}})
            grpc_scores = await c.stub.Score(pb.ScoreRequest(text_1=[query], text_2=docs), timeout=30)
            grpc_instr = await c.stub.Score(pb.ScoreRequest(text_1=[query], text_2=docs,
                                                            chat_template_kwargs_json='{"instruction": "w60"}'),
                                            timeout=30)
            await c.wait_blocks_free()
        async with running_server(llm.engine, http_port=0, chat_template="{{ messages[0].content | nope }}") as c:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{c.server.http_port}", timeout=60) as h:
                broken = await h.post("/v1/rerank", json={"query": query, "documents": docs})
                after = await h.post("/v1/classify", json={"input": "w9 yes"})
        out: list[dict] = []
        runner = BatchRunner(ServerConfig(chat_template=SCORE_TEMPLATE, max_queued_requests=64), engine=llm.engine)
        await runner.start()
        try:
            line = {"custom_id": "s", "method": "POST", "url": "/v1/score", "body": {"text_1": query, "text_2": docs}}
            await runner.run(iter([json.dumps(line)]), out.append)
        finally:
            await runner.stop()
        return rerank, score, reserved, (grpc_scores, grpc_instr), broken, after, out

    rerank, score, reserved, (grpc_scores, grpc_instr), broken, after, batch = run(calls(), timeout=120)
    assert rerank.status_code == 200, rerank.text
    order = [int(i) for i in np.argsort(-want, kind="stable")[:3]]
    res = rerank.json()["results"]
    assert [x["index"] for x in res] == order
    np.testing.assert_allclose([x["relevance_score"] for x in res], want[order], atol=1e-4, rtol=0)
    assert rerank.json()["usage"]["prompt_tokens"] == sum(map(len, ids))
    assert score.status_code == 200, score.text
    np.testing.assert_allclose([d["score"] for d in score.json()["data"]], want_instr, atol=1e-4, rtol=0)
    np.testing.assert_allclose(list(grpc_scores.scores), want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(list(grpc_instr.scores), want_instr, atol=1e-4, rtol=0)  # gRPC's template variables
    assert grpc_scores.prompt_tokens == sum(map(len, ids))
    err = reserved.json()["error"]
    assert reserved.status_code == 400 and err["param"] == "chat_template_kwargs", err
    assert err["message"].startswith("chat_template_kwargs.messages is invalid: messages is set by its own")
    err = broken.json()["error"]
    assert broken.status_code == 400 and err["message"].startswith(
        "--chat-template is invalid: the score template failed to render pair 0 (query 'w9 w30 yes', "
        "document 'w40 no'): TemplateAssertionError: No filter named 'nope'"), err
    assert after.status_code == 200, after.text  # the engine serves on
    (line,) = batch
    assert line["response"]["status_code"] == 200, line
    np.testing.assert_allclose([d["score"] for d in line["response"]["body"]["data"]], want, atol=1e-4, rtol=0)
