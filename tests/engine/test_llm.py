import pytest

from jaxllm.llm import LLM
from jaxllm.sampling_params import SamplingParams
from tests.engine.conftest import assert_clean, make_engine, script_fn


def make_llm(**kw):
    return LLM(model="fake", engine=make_engine(next_token_fn=script_fn("answer!")), **kw)


def test_generate_in_input_order_mixed_forms():
    llm = make_llm()
    prompts = ["long prompt " * 5, "hi", [3 + 65, 3 + 66], {"prompt_token_ids": [7]}]
    outs = llm.generate(prompts, SamplingParams(max_tokens=3, temperature=0), use_tqdm=True)
    assert [o.prompt for o in outs] == ["long prompt " * 5, "hi", None, None]
    assert all(o.finished and o.outputs[0].text == "ans" for o in outs)
    one = llm.generate("solo", SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)
    assert len(one) == 1 and one[0].outputs[0].text == "an"
    assert len(llm.generate([5, 6], use_tqdm=False)) == 1  # a token list is one prompt
    assert_clean(llm.engine)


def test_per_prompt_params_and_chat():
    llm = make_llm()
    outs = llm.generate(["a", "b"], [SamplingParams(max_tokens=1), SamplingParams(max_tokens=4)],
                        use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [1, 4]
    with pytest.raises(ValueError, match="sampling_params has 1 entries"):
        llm.generate(["a", "b"], [SamplingParams()], use_tqdm=False)
    conv = [{"role": "user", "content": "hello"}]
    outs = llm.chat(conv, SamplingParams(max_tokens=6), use_tqdm=False)
    assert len(outs) == 1 and outs[0].outputs[0].text == "answer"
    assert outs[0].prompt == "user: hello<sep>assistant: "  # the rendered conversation, as vLLM reports
    assert outs[0].prompt_token_ids == llm.get_tokenizer().apply_chat_template(conv)
    assert len(llm.chat([conv, conv], use_tqdm=False)) == 2
    cont = llm.chat(conv + [{"role": "assistant", "content": "hi"}], SamplingParams(max_tokens=1),
                    use_tqdm=False, add_generation_prompt=False, continue_final_message=True)
    assert cont[0].prompt == "user: hello<sep>assistant: hi"
    image = [{"role": "user", "content": [{"type": "text", "text": "what is it?"}, {"type": "image"}]}]
    with pytest.raises(ValueError) as e:  # a template would render it as a bare image token: refused
        llm.chat([conv, image], use_tqdm=False)
    assert str(e.value) == ("conversations[1][0].content[1].type='image' is not supported: only text parts "
                            "(no image, audio or file inputs)")
    assert_clean(llm.engine)


def test_bad_input_submits_nothing():
    llm = make_llm()
    with pytest.raises(ValueError, match="temperature=-1 is invalid"):  # at construction now
        SamplingParams(temperature=-1)
    vocab = llm.engine.vocab_size  # constructs (needs the vocabulary), refused by generate
    with pytest.raises(ValueError, match=f"stop_token_ids=\\[{vocab}\\] is invalid"):
        llm.generate(["ok", "ok"], [SamplingParams(), SamplingParams(stop_token_ids=[vocab])], use_tqdm=False)
    with pytest.raises(ValueError, match="prompt=\\[\\] is invalid"):
        llm.generate(["ok", ""], use_tqdm=False)
    assert_clean(llm.engine)
    assert llm.generate("ok", SamplingParams(max_tokens=1), use_tqdm=False)[0].finished
    with pytest.raises(ValueError, match="max_num_seq=3 is invalid: unknown engine argument"):
        LLM(model="fake", engine=llm.engine, max_num_seq=3)
