"""vLLM's chat-shaped pooling bodies (serving/openai_pooling_chat.py): ``/v1/embeddings`` and
``/classify`` with ``messages``. Behind the server: the real LLMEngine around the fake runner in embed
mode (tests/fakes), whose tokenizer's template renders each message ``"<role>: <content>" <sep>`` (and
``"assistant: "`` as the generation prompt). References: that rendering written out here and sent as a
plain token-id input, and the offline engine's embedding of it (test_serving_embed.offline). The
cross-encoder's chat form is in tests/serving/test_http_classify.py (a real Jinja template)."""

from __future__ import annotations

import httpx
import numpy as np

from jaxllm.pooling_params import PoolingParams
from serving_helpers import run, running_server
from test_serving_embed import make_engine, offline
from tests.fakes.fake_tokenizer import SEP, FakeTokenizer

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "capital of france?"}]


def rendered(messages, generation_prompt: bool = False, open_last: bool = False) -> list[int]:
    """The fake template's rendering, written out independently of the tokenizer's chat code."""
    tok = FakeTokenizer()
    ids: list[int] = []
    for m in messages:
        ids += tok.encode(f"{m['role']}: {m['content']}", add_special_tokens=False) + [SEP]
    if open_last:
        ids = ids[:-1]
    if generation_prompt:
        ids += tok.encode("assistant: ", add_special_tokens=False)
    return ids


async def _serve(engine, calls, **cfg):
    async with running_server(engine, http_port=0, **cfg) as c:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{c.server.http_port}", timeout=30) as h:
            got = await calls(h)
        await c.wait_blocks_free()
        return got


def test_messages_embed_as_the_rendered_conversation():
    bodies = [{"messages": CHAT}, {"messages": CHAT, "add_generation_prompt": True},
              {"messages": CHAT, "continue_final_message": True},
              {"messages": CHAT, "add_special_tokens": True},  # the tokenizer's BOS on top of the rendering
              {"messages": CHAT, "input": "plain text"},  # vLLM's union: the input-shaped body comes first
              {"messages": CHAT, "normalize": False, "request_id": "mine", "chat_template_kwargs": {"x": 1}}]
    refs = [rendered(CHAT), rendered(CHAT, generation_prompt=True), rendered(CHAT, open_last=True),
            FakeTokenizer().encode(FakeTokenizer().decode(rendered(CHAT), skip_special_tokens=False)),
            None, rendered(CHAT)]

    async def calls(h):
        got = [await h.post("/v1/embeddings", json=b) for b in bodies]
        plain = [await h.post("/v1/embeddings", json={"input": r if r is not None else "plain text",
                                                       **({"normalize": False} if "normalize" in b else {})})
                 for b, r in zip(bodies, refs)]
        return got, plain

    got, plain = run(_serve(make_engine(), calls))
    for body, resp, ref, want in zip(bodies, got, refs, plain):
        assert resp.status_code == 200, (body, resp.text)
        r = resp.json()
        assert len(r["data"]) == 1 and r["data"][0]["index"] == 0, r  # one conversation, one embedding
        assert r["data"][0]["embedding"] == want.json()["data"][0]["embedding"], body
        assert r["usage"] == want.json()["usage"]
        if ref is not None:
            assert r["usage"]["prompt_tokens"] == len(ref)
    assert len({tuple(r.json()["data"][0]["embedding"]) for r in got[:4]}) == 4  # the options change the prompt
    np.testing.assert_allclose(got[0].json()["data"][0]["embedding"],
                               offline({"prompt_token_ids": refs[0]}, PoolingParams()), rtol=1e-6)
    assert got[-1].json()["id"] == "embd-mine" and got[-1].json()["data"][0]["embedding"] != got[0].json()["data"][0][
        "embedding"]  # normalize=false: the raw pooled vector


def test_chat_shaped_misuse_is_a_400_naming_the_field():
    cases = [({"messages": CHAT, "add_generation_prompt": True, "continue_final_message": True},
              "continue_final_message"),
             ({"messages": CHAT, "chat_template": "{{ messages }}"}, "chat_template"),  # needs the trust flag
             ({"messages": []}, "messages"),
             ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
              "messages"),
             ({}, "input"), ({"model": "fake-embed"}, "input")]

    async def calls(h):
        return [await h.post(p, json=b) for b, _ in cases for p in ("/v1/embeddings",)]

    for resp, (body, param) in zip(run(_serve(make_engine(), calls)), cases):
        assert resp.status_code == 400, (body, resp.text)
        err = resp.json()["error"]
        assert resp.status_code == 400 and (err["param"] or "").startswith(param), (body, resp.text)
        assert "\n" not in err["message"]
