"""serving/reasoning_parsers: worked examples, and the streaming contract under hypothesis.

The hypothesis test builds outputs from pieces whose meaning is known by construction (leading
whitespace, a think block or not, reasoning text, content text, a cut-off end), so the expected
(reasoning, content) is an independent reference; then it checks that ``extract`` gives exactly
that and that every random split of the text, fed in order, streams the same, with every
reasoning delta before the first content delta.
"""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from serving.reasoning_parsers import PARSERS, Reasoned, ReasoningDelta, get_parser
from tool_parse_helpers import CUTS, SETTINGS, split

R1, Q3, MI = get_parser("deepseek_r1"), get_parser("qwen3"), get_parser("mistral")


def stream(cls, chunks: list[str]) -> Reasoned:
    """Feed ``chunks`` then finish; no reasoning after content began; fold into a Reasoned."""
    p = cls()
    reasoning = content = ""
    for d in [p.feed(c) for c in chunks] + [p.finish()]:
        assert isinstance(d, ReasoningDelta)
        assert not (d.reasoning and content), "reasoning after content"
        reasoning += d.reasoning
        content += d.content
    return Reasoned(reasoning or None, content or None)


def check(cls, text: str, reasoning: str | None, content: str | None):
    want = Reasoned(reasoning, content)
    assert cls().extract(text) == want
    assert stream(cls, [text]) == want
    assert stream(cls, list(text)) == want
    assert stream(cls, [text[: len(text) // 2], text[len(text) // 2:]]) == want


def test_registry_and_errors():
    assert {n for n, p in PARSERS.items() if p.name == n} == {"deepseek_r1", "mistral", "qwen3"}
    with pytest.raises(ValueError, match=r"^reasoning_parser='nope' is invalid: must be one of deepseek_r1, "
                                         r"mistral, qwen3$"):
        get_parser("nope")
    p = R1()
    p.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        p.feed("x")
    with pytest.raises(RuntimeError, match="finish called twice"):
        p.finish()


def test_deepseek_r1_worked_examples():
    check(R1, "<think>\nLet me think.\n</think>\n\nThe answer is 4.", "\nLet me think.\n", "\n\nThe answer is 4.")
    # the template wrote <think> into the prompt: everything up to </think> is reasoning
    check(R1, "Let me think.</think>4", "Let me think.", "4")
    # never closed (cut off while thinking): all reasoning, no content
    check(R1, "Let me think", "Let me think", None)
    check(R1, "<think>half a th", "half a th", None)
    check(R1, "  <thi", "  <thi", None)  # a beginning that never became <think>
    check(R1, " \n <th <think>x", " \n <th <think>x", None)
    # leading whitespace before <think> goes with the tag; nothing after </think>: content None
    check(R1, "\n<think>x</think>", "x", None)
    check(R1, "<think></think>answer", None, "answer")
    # a second <think> inside, and </think> inside the content, are plain text
    check(R1, "<think>a<think>b</think>c</think>d", "a<think>b", "c</think>d")
    check(R1, "é😀 東京</think>é😀", "é😀 東京", "é😀")
    check(R1, "", None, None)


def test_qwen3_reads_like_deepseek_r1_and_has_a_thinking_switch():
    # current vLLM: Qwen3.5 / 2507 templates put <think> in the prompt; older ones let the model write it
    check(Q3, "<think>\nLet me think.\n</think>\n\nThe answer is 4.", "\nLet me think.\n", "\n\nThe answer is 4.")
    check(Q3, "Let me think.</think>4", "Let me think.", "4")
    check(Q3, "Let me thi", "Let me thi", None)
    assert Q3.thinking_switch == "enable_thinking" and R1.thinking_switch is None  # used by the server


def test_mistral_needs_the_opening_tag():
    check(MI, "[THINK]Let me think.[/THINK]It is 4.", "Let me think.", "It is 4.")
    check(MI, "\n [THINK]a[/THINK]", "a", None)
    check(MI, "It is 4.", None, "It is 4.")  # no block: all content
    check(MI, "It is 4.[/THINK]", None, "It is 4.[/THINK]")
    check(MI, "Use [THINK] tags", None, "Use [THINK] tags")  # only an opening [THINK] starts a block
    check(MI, "  [THI", None, "  [THI")
    check(MI, "\n[TH \n[THINK]", None, "\n[TH \n[THINK]")  # a tag begun then broken: all of it stays
    check(MI, " \n", None, " \n")
    check(MI, "[THINK]cut off", "cut off", None)  # an open block is reasoning, as vLLM's
    check(MI, "[THINK]<think>x</think>[/THINK]y", "<think>x</think>", "y")  # other parsers' tags are text
    assert MI.special_markers and not R1.special_markers


# outputs built from pieces whose meaning is known: (text, reasoning, content) per parser
ATOMS = ["Hi", " ", "\n", "<", "</", "<think", "</think", "<think>", "think>", "é😀", "東京", "x",
         "[", "[/", "[THINK", "[/THINK", "[THINK]", "THINK]"]
PIECE = st.lists(st.sampled_from(ATOMS), max_size=5).map("".join)


@st.composite
def outputs(draw, cls):
    ws = draw(st.sampled_from(["", " ", "\n", "\n\n"]))
    reasoning = draw(PIECE.filter(lambda s: cls.END not in s))  # reasoning cannot hold the end tag
    content = draw(PIECE)
    kind = draw(st.sampled_from(["block", "implicit", "open", "none"]))
    if kind == "block":
        return ws + cls.START + reasoning + cls.END + content, reasoning, content
    if kind == "open":
        return ws + cls.START + reasoning, reasoning, ""
    text = ws + reasoning + (cls.END + content if kind == "implicit" else "")
    if text.lstrip().startswith(cls.START):  # the pieces happened to write a block after all
        return None
    if cls.implicit_start:  # no opening tag: reasoning up to the end tag, or all of it
        return (text, ws + reasoning, content if kind == "implicit" else "")
    return text, "", text  # the opening tag is required: all content


@pytest.mark.parametrize("cls", [R1, Q3, MI], ids=lambda c: c.name)
@SETTINGS
@given(data=st.data(), cuts=CUTS)
def test_split_invariance(cls, data, cuts):
    out = data.draw(outputs(cls))
    if out is None:
        return
    text, reasoning, content = out
    want = Reasoned(reasoning or None, content or None)
    assert cls().extract(text) == want
    assert stream(cls, split(text, cuts)) == want
