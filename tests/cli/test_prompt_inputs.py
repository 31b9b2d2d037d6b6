"""`--input` JSONL of `python -m jaxllm.generate`: per-line SamplingParams overrides, and every line
checked (keys, prompt kinds, tokenized ids, length) with `FILE:LINE:` before an engine exists."""
from __future__ import annotations

import json

import pytest

from jaxllm.prompt_inputs import cli_items, read_inputs, validate_items
from jaxllm.sampling_params import SamplingParams
from tests.fakes.fake_tokenizer import OFFSET, FakeTokenizer

TOK = FakeTokenizer()
VOCAB = FakeTokenizer.vocab_size
BASE = SamplingParams(max_tokens=16, temperature=0.8)


def _file(tmp_path, *lines) -> str:
    path = tmp_path / "in.jsonl"
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return str(path)


def _load(path, max_model_len=64, chat=False):
    items = read_inputs(path, chat, BASE)
    validate_items(items, TOK, VOCAB, max_model_len)
    return items


def test_per_line_overrides_and_prompt_kinds(tmp_path):
    path = _file(tmp_path, "plain text line", {"prompt": "abc", "max_tokens": 3, "temperature": 0.5},
                 "", {"prompt_token_ids": [5, 6], "stop": "x", "logit_bias": {"7": -5}},
                 {"messages": [{"role": "user", "content": "hi"}], "n": 2, "seed": 11})
    items = _load(path)
    assert [it.where for it in items] == [f"{path}:1", f"{path}:2", f"{path}:4", f"{path}:5"]
    assert [it.kind for it in items] == ["text", "text", "ids", "chat"]
    assert items[0].params == BASE  # no overrides: the command line's
    assert (items[1].params.max_tokens, items[1].params.temperature) == (3, 0.5)
    assert items[1].prompt == "abc"
    assert items[2].params.stop == "x" and items[2].params.logit_bias == {7: -5.0}
    assert items[2].params.max_tokens == 16 and items[2].prompt == {"prompt_token_ids": [5, 6]}
    assert (items[3].params.n, items[3].params.seed) == (2, 11)
    assert items[3].prompt["prompt_token_ids"] == TOK.apply_chat_template([{"role": "user", "content": "hi"}])
    assert BASE.max_tokens == 16  # the shared command-line params are not mutated


def test_chat_flag_sends_text_through_the_template(tmp_path):
    items = _load(_file(tmp_path, "hello", {"prompt": "bye"}), chat=True)
    assert [it.payload for it in items] == [[{"role": "user", "content": "hello"}],
                                            [{"role": "user", "content": "bye"}]]
    assert all(it.kind == "chat" for it in items)


@pytest.mark.parametrize("line,message", [
    ({"prompt": "a", "max_tokenz": 3}, "unknown key 'max_tokenz'"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "'prompt' and 'messages' conflict"),
    ({"prompt": "a", "prompt_token_ids": [3]}, "'prompt' and 'prompt_token_ids' conflict"),
    ({"max_tokens": 3}, "needs one of 'prompt', 'messages' or 'prompt_token_ids'"),
    ({"prompt": "a", "max_tokens": "3"}, "Expected `int`, got `str` - at `$.max_tokens`"),
    ({"prompt": "a", "temperature": -1}, "temperature=-1.0 is invalid: must be >= 0"),
    ({"prompt": ""}, "prompt='' is invalid: must be a non-empty string"),
    ({"prompt": 5}, "prompt=5 is invalid: must be a string"),
    ({"prompt_token_ids": [3, VOCAB]}, f"prompt_token_ids[1]={VOCAB} is invalid: must be an int in [0, vocab_size={VOCAB})"),
    ({"prompt_token_ids": []}, "prompt=[] is invalid"),
    ({"prompt": "x" * 8}, "prompt length=8 tokens is invalid: must be < max_model_len=8"),
    ({"messages": []}, "messages=[] is invalid"),
    ('{"prompt": "a"', "invalid JSON"),
])
def test_bad_line_names_file_and_line(tmp_path, line, message):
    path = _file(tmp_path, "fine", line)
    with pytest.raises(ValueError) as e:
        _load(path, max_model_len=8)
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value), str(e.value)


def test_truncated_prompt_is_checked_as_kept(tmp_path):
    items = _load(_file(tmp_path, {"prompt": "x" * 20, "truncate_prompt_tokens": 5}), max_model_len=8)
    assert items[0].params.truncate_prompt_tokens == 5


def test_empty_file_says_so(tmp_path):
    for text in ("", "\n  \n"):
        path = tmp_path / "empty.jsonl"
        path.write_text(text)
        with pytest.raises(ValueError, match=f"--input {path}: the file is empty"):
            read_inputs(str(path), False, BASE)


def test_command_line_prompts_are_checked_too():
    items = cli_items(["ok", ""], ["chat me"], False, BASE)
    with pytest.raises(ValueError, match="^--prompt #2: prompt='' is invalid"):
        validate_items(items, TOK, VOCAB, 64)
    ok = cli_items(["ok"], ["chat me"], False, BASE)
    validate_items(ok, TOK, VOCAB, 64)
    assert ok[0].prompt == "ok" and ok[1].kind == "chat" and ok[1].where == "--chat-prompt #1"
    assert ok[1].prompt["prompt_token_ids"][:1] == [OFFSET + ord("u")]  # "user: chat me"


def test_priority_key_under_the_priority_policy(tmp_path):
    path = _file(tmp_path, {"prompt": "a", "priority": 3}, {"prompt": "b", "priority": -2}, {"prompt": "c"}, "plain")
    items = read_inputs(path, False, BASE, "priority")
    assert [it.priority for it in items] == [3, -2, 0, 0]
    assert all(it.params == BASE for it in items)  # priority is the request's, not a SamplingParams field


@pytest.mark.parametrize("policy,line,message", [
    ("fcfs", {"prompt": "a", "priority": 1},
     "priority=1 is invalid: scheduling_policy='fcfs' takes priority 0 only (start the engine with "
     "--scheduling-policy priority)"),
    ("priority", {"prompt": "a", "priority": "1"}, "priority='1' is invalid: must be an integer"),
    ("priority", {"prompt": "a", "priority": 1.5}, "priority=1.5 is invalid: must be an integer"),
    ("priority", {"prompt": "a", "priority": True}, "priority=True is invalid: must be an integer"),
])
def test_bad_priority_names_file_and_line(tmp_path, policy, line, message):
    path = _file(tmp_path, {"prompt": "fine", "priority": 0}, line)  # priority 0 is fine under fcfs
    with pytest.raises(ValueError) as e:
        read_inputs(path, False, BASE, policy)
    assert str(e.value) == f"{path}:2: {message}"
