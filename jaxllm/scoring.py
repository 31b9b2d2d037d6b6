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
"""
from __future__ import annotations

import numpy as np

from jaxllm.engine.pooling import activate

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


def pair_prompts(tokenizer, t1: list[str], t2: list[str], truncate: int | None = None,
                 use_sep_token: bool = True) -> list[list[int]]:
    """Each pair's token ids (``pair_lists``' t1, t2: a 1:N t1 paired with every t2): the tokenizer's
    pair encoding, or with ``use_sep_token=False`` (vLLM's, an LLM as reranker: the model config's
    ``use_sep_token``) ``text_1 + text_2`` encoded as one text; ``truncate`` keeps the last k tokens (as
    PoolingParams.truncate_prompt_tokens does)."""
    out = []
    for a, b in zip(t1 * len(t2) if len(t1) == 1 else t1, t2):
        if not isinstance(a, str) or not isinstance(b, str):
            raise ValueError(f"text pair ({a!r}, {b!r}) is invalid: a cross-encoder scores text (str) pairs")
        ids = tokenizer.encode_pair(a, b) if use_sep_token else tokenizer.encode(a + b)
        out.append(ids[-truncate:] if truncate else ids)
    return out


def cross_encoder_scores(logits, model_config) -> np.ndarray:
    """[n, 1] raw logits → [n] scores under the model's score activation, float64."""
    return activate(np.asarray(logits, dtype=np.float64)[:, 0], model_config.score_activation or "sigmoid")
