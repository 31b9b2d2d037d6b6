"""The score templates shipped in serving/score_templates (a cross-encoder server's --chat-template, vLLM's
score-template contract: messages with roles "query" and "document") render exactly the prompt their model
card documents, written out here as plain strings; a --chat-template file that does not exist stops the
server at start-up in one line (exit 2)."""
from __future__ import annotations

import os

from jaxllm import scoring
from jaxllm.tokenizer import Tokenizer
from tests.models.hf_tiny import tiny_pair_tokenizer

TEMPLATES = os.path.join(os.path.dirname(__file__), "..", "..", "serving", "score_templates")

# Qwen3-Reranker's model card: the judge's system turn, the instruction, query and document in the user
# turn, then an empty think block opening the assistant's answer ("yes" or "no")
QWEN3_PREFIX = ('<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and '
                'the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
                '<|im_start|>user\n')
QWEN3_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3_DEFAULT = "Given a web search query, retrieve relevant passages that answer the query"


def test_qwen3_reranker_template_renders_the_model_cards_prompt():
    with open(os.path.join(TEMPLATES, "qwen3_reranker.jinja"), encoding="utf-8") as f:
        text = f.read()
    tok = Tokenizer(tiny_pair_tokenizer(64))
    for kwargs, instruction in ((None, QWEN3_DEFAULT), ({"instruction": "Find the code"}, "Find the code")):
        for query, doc in (("what is jax?", "JAX is NumPy on accelerators."), ("a {{ b }}", "line 1\nline 2")):
            got = scoring.ScoreTemplate(text, "--chat-template", kwargs).render(tok, query, doc)
            assert got == (f"{QWEN3_PREFIX}<Instruct>: {instruction}\n<Query>: {query}\n"
                           f"<Document>: {doc}{QWEN3_SUFFIX}")


def test_a_missing_chat_template_file_stops_the_server_in_one_line(capsys):
    from serving.__main__ import main

    assert main(["--model", "fake", "--chat-template", "/no/such/score.jinja"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --chat-template '/no/such/score.jinja' is invalid: no such file, and not an inline "
                   "Jinja template (no '{', '}' or newline)")
