"""An unconverted reranker's classifier head from its LM head (vLLM's ``as_seq_cls_model`` loaders:
``load_weights_using_from_2_way_softmax`` and ``load_weights_no_post_processing``).

A ``*ForCausalLM`` checkpoint whose config (through ``--hf-overrides``) names a ``*ForSequenceClassification``
and ``classifier_from_token`` (jaxllm/models/classifier_config.py) is loaded as a classifier: the decoder as
stored, and ``score`` [hidden, num_labels] built from the LM-head rows of those tokens (the embedding rows
when the embeddings are tied). The LM head itself is read only to slice those rows; it is not kept.

- ``from_2_way_softmax`` (tokens [false, true]): score = row[true] - row[false], one label, so
  sigmoid(score . h) = softmax(lm_logits[[false, true]])[1], the reranker's probability of "yes";
- ``no_post_processing``: score = the tokens' rows, so the raw logits are the LM's logits of the tokens.

A model's logits divisor (Granite's ``logits_scaling``) is folded into the rows, so both stay equal to
what the causal LM computes; Gemma 2's final logit soft-cap (a tanh) is not linear and is not applied:
the head's logits are the uncapped ones.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from checkpoints.errors import CheckpointError
from jaxllm.models.config import ModelConfig


def resolve_token_ids(config: ModelConfig, path: str) -> ModelConfig:
    """``config`` with ``classifier_token_ids``: each of ``classifier_from_token`` looked up in the
    checkpoint's tokenizer (``convert_tokens_to_ids``); an unknown token, or none to look it up in, is a
    one-line CheckpointError naming the token."""
    from jaxllm.tokenizer import Tokenizer

    tokens = config.classifier_from_token
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model",
                                                                "tokenizer_config.json")):
        raise CheckpointError(f"{path}: classifier_from_token={list(tokens)!r} needs the checkpoint's tokenizer to "
                              f"find the tokens' ids, and the directory has none (tokenizer.json)")
    hf = Tokenizer.from_dir(path).hf
    vocab = hf.get_vocab()  # token -> id, added tokens included: convert_tokens_to_ids without the unk fallback
    ids = []
    for t in tokens:
        if t not in vocab:
            raise CheckpointError(f"{path}: classifier_from_token token {t!r} is not in the tokenizer's vocabulary "
                                  f"(convert_tokens_to_ids has no id for it; tokens are written as the vocabulary "
                                  f"spells them, e.g. 'yes', not ' yes')")
        i = int(hf.convert_tokens_to_ids(t))
        if not 0 <= i < config.vocab_size:
            raise CheckpointError(f"{path}: classifier_from_token token {t!r} has id {i}, outside the model's "
                                  f"vocab_size={config.vocab_size}")
        ids.append(i)
    return dataclasses.replace(config, classifier_token_ids=tuple(ids))


def score_from_lm_rows(config: ModelConfig, rows: np.ndarray, source: str) -> np.ndarray:
    """``rows`` [len(tokens), hidden] (the tokens' LM-head rows, HF's [vocab, hidden] orientation) ->
    ``score`` [hidden, num_labels] by ``classifier_method``."""
    if len(config.classifier_token_ids) != len(config.classifier_from_token):
        raise CheckpointError(f"{source}: classifier_from_token={list(config.classifier_from_token)!r} has no token "
                              f"ids (only HF checkpoints with a tokenizer build the head from LM-head rows)")
    rows = np.asarray(rows, np.float64) / config.logits_scaling  # [T, E]
    if config.classifier_method == "from_2_way_softmax":
        w = rows[1:2] - rows[0:1]  # [1, E]: true - false
    else:
        w = rows  # [T, E]
    return np.ascontiguousarray(w.T)  # [E, num_labels]
