"""Scoring text pairs (vLLM's ``LLM.score`` and the /score, /rerank APIs; host side, no jax).

Two kinds of model score a pair, as in vLLM:

- an **embedding model** (task "embed"): the cosine similarity of the two texts' embeddings, in
  float64 (``cosine_scores``; each norm clamped to at least 1e-8, torch's CosineSimilarity);
- a **cross-encoder** (task "classify" with ``num_labels == 1``: a reranker such as
  bge-reranker-v2-gemma, a converted Qwen3-Reranker): the pair encoded together as the tokenizer's
  pair encoding (``tokenizer(text_1, text_2)``, ``pair_prompts``; ``tokenizer(text_1 + text_2)`` for an
  LLM as reranker, vLLM's ``use_sep_token`` False: classifier_from_token), classified, and the single logit
  put through the model's score activation (sigmoid unless the config's
  ``sbert_ce_default_activation_function`` says Identity; ``activate``). A classifier with more
  labels is refused, as vLLM refuses it (``check_cross_encoder``).

``pair_lists`` applies vLLM's pairing: 1:1, 1:N (one ``text_1`` against each ``text_2``) or N:N.

A **score template** (vLLM's ``--chat-template`` on a cross-encoder server, ``LLM.score(chat_template=)``;
``ScoreTemplate``) replaces the cross-encoder's encoding: a Jinja chat template rendered, as transformers
renders chat templates, on ``messages = [{"role": "query", "content": text_1}, {"role": "document",
"content": text_2}]`` (plus the ``chat_template_kwargs`` variables, e.g. an ``instruction``), and the text
tokenized as one text with the tokenizer's default special tokens: the full prompt of an LLM reranker
(Qwen3-Reranker's system turn, instruction, query, document and assistant prefix). A template that fails
to render, or renders blank, is a ``ScoreTemplateError`` (a ValueError) naming the template and why.
Embedding models ignore it (their texts are embedded alone, as in vLLM).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxllm.engine.pooling import activate
from jaxllm.tokenizer import check_template_kwargs

_EPS = 1e-8


def cosine_scores(vecs_1, vecs_2) -> np.ndarray:
    """Cosine similarity of each row pair, float64; ``vecs_1`` of 1 row is paired with every row of
    ``vecs_2`` (1:N). [n1|1, E], [n, E] -> [n]."""
    a = np.asarray(vecs_1, dtype=np.float64)
    b = np.asarray(vecs_2, dtype=np.float64)
    norms = np.maximum(np.linalg.norm(a, axis=1), _EPS) * np.maximum(np.linalg.norm(b, axis=1), _EPS)
    return np.sum(a * b, axis=1) / norms


def pair_lists(text_1, text_2, name_1: str = "text_1", name_2: str = "text_2") -> tuple[list, list]:
    """(t1, t2) as lists, t1 of one item (1:N) or as long as t2; ValueError naming the field (also the
    server's rule: serving/openai_score.pair_texts)."""
    t1 = [text_1] if isinstance(text_1, (str, dict)) else list(text_1)
    t2 = [text_2] if isinstance(text_2, (str, dict)) else list(text_2)
    for name, items in ((name_1, t1), (name_2, t2)):
        if not items:
            raise ValueError(f"{name}=[] is invalid: must hold at least one text")
    if len(t1) > 1 and len(t1) != len(t2):
        raise ValueError(f"{name_1} has {len(t1)} items and {name_2} has {len(t2)}, which is invalid: the "
                         f"lengths must be 1:1, 1:N or N:N")
    return t1, t2


def check_cross_encoder(model_config, what: str = "score") -> None:
    """ValueError unless the model is a cross-encoder (a classifier with num_labels == 1)."""
    n = getattr(model_config, "num_labels", 0)
    if n != 1:
        raise ValueError(f"num_labels={n} is invalid for {what}: a cross-encoder has exactly 1 label "
                         f"(this classifier's labels: {list(getattr(model_config, 'labels', ()))}; classify it instead)")


class ScoreTemplateError(ValueError):
    """A score template's failure (it did not render, or rendered blank) or bad template variables."""


@dataclass(frozen=True)
class ScoreTemplate:
    """A cross-encoder's score template: ``text`` the Jinja source, ``name`` how errors call it
    (``chat_template`` offline, ``--chat-template`` on a server), ``kwargs`` more template variables
    (``chat_template_kwargs``)."""
    text: str
    name: str = "chat_template"
    kwargs: dict | None = None

    def check(self) -> "ScoreTemplate":
        if not isinstance(self.text, str) or not self.text.strip():
            raise ScoreTemplateError(f"{self.name}={self.text!r} is invalid: must be a non-empty Jinja template")
        try:
            check_template_kwargs(self.kwargs)
        except ValueError as exc:
            raise ScoreTemplateError(str(exc)) from None
        return self

    def render(self, tokenizer, query: str, document: str, index: int = 0) -> str:
        """The pair's full prompt text; ScoreTemplateError naming the template, the pair and the reason."""
        messages = [{"role": "query", "content": query}, {"role": "document", "content": document}]
        try:
            text = tokenizer.render_template(messages, self.text, self.kwargs)
        except Exception as exc:  # jinja syntax, undefined fields, raise_exception, bad filters
            line = getattr(exc, "lineno", None)
            where = f" (template line {line})" if line else ""
            raise ScoreTemplateError(f"{self.name} is invalid: the score template failed to render pair {index} "
                                     f"(query {_short(query)}, document {_short(document)}): "
                                     f"{type(exc).__name__}: {exc}{where}") from None
        if not isinstance(text, str) or not text.strip():
            raise ScoreTemplateError(f"{self.name} is invalid: the score template rendered pair {index} as blank "
                                     f"text ({text!r}); it must place the messages with roles 'query' and "
                                     f"'document' in the prompt")
        return text


def score_template(text: str | None, name: str, kwargs: dict | None = None) -> ScoreTemplate | None:
    """The cross-encoder's template (None: the plain pair encoding); ``kwargs`` without a template is a
    ScoreTemplateError (variables no template would read)."""
    if text is None:
        if kwargs:
            raise ScoreTemplateError(f"chat_template_kwargs is invalid without a score template: give {name} "
                                     f"(the plain pair encoding has no template variables)")
        return None
    return ScoreTemplate(text, name, kwargs).check()


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit - 3] + "...")


def pair_prompts(tokenizer, t1: list[str], t2: list[str], truncate: int | None = None,
                 use_sep_token: bool = True, template: ScoreTemplate | None = None) -> list[list[int]]:
    """Each pair's token ids (``pair_lists``' t1, t2: a 1:N t1 paired with every t2): the tokenizer's
    pair encoding, or with ``use_sep_token=False`` (vLLM's, an LLM as reranker: the model config's
    ``use_sep_token``) ``text_1 + text_2`` encoded as one text, or with a ``template`` its rendering of
    the pair encoded as one text (special tokens as the tokenizer adds them by default; either
    ``use_sep_token``); ``truncate`` keeps the last k tokens (as PoolingParams.truncate_prompt_tokens
    does), of the rendered prompt too."""
    if template is not None:
        template.check()
    out = []
    for i, (a, b) in enumerate(zip(t1 * len(t2) if len(t1) == 1 else t1, t2)):
        if not isinstance(a, str) or not isinstance(b, str):
            raise ValueError(f"text pair ({a!r}, {b!r}) is invalid: a cross-encoder scores text (str) pairs")
        if template is not None:
            ids = tokenizer.encode(template.render(tokenizer, a, b, i))
        else:
            ids = tokenizer.encode_pair(a, b) if use_sep_token else tokenizer.encode(a + b)
        out.append(ids[-truncate:] if truncate else ids)
    return out


def cross_encoder_scores(logits, model_config) -> np.ndarray:
    """[n, 1] raw logits → [n] scores under the model's score activation, float64."""
    return activate(np.asarray(logits, dtype=np.float64)[:, 0], model_config.score_activation or "sigmoid")
