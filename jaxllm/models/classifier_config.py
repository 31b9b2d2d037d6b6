"""Sequence-classification heads (HF ``*ForSequenceClassification``; no jax): the config fields.

HF's LlamaForSequenceClassification, MistralForSequenceClassification, Qwen2/Qwen3ForSequenceClassification
and Gemma2ForSequenceClassification are the decoder, then ``score``: a bias-free linear
[hidden_size -> num_labels] applied to the final-norm hidden state of the last (non-pad) token. Reward
models and cross-encoder rerankers (bge-reranker-v2-gemma style, converted Qwen3-Reranker) are such
checkpoints with num_labels == 1.

``classifier_fields(cfg, source) -> dict`` (ModelConfig fields; {} for any other architecture):

- ``num_labels``: ``len(id2label)`` (PretrainedConfig stores the labels, not the count; HF's default is 2
  labels), or ``num_labels`` when a config writes it without ``id2label``;
- ``labels``: ``id2label`` in id order (``LABEL_<i>`` for a missing id, as HF names them);
- ``classify_activation``: vLLM's rule for ``classify`` (get_classification_act_fn): ``problem_type``
  "regression" -> "identity", "multi_label_classification" -> "sigmoid", otherwise "sigmoid" for one label,
  "softmax" over the labels for more;
- ``score_activation``: vLLM's for cross-encoder ``score`` (get_cross_encoder_act_fn): the config's
  ``sentence_transformers.activation_fn`` or ``sbert_ce_default_activation_function`` (torch.nn Identity ->
  "identity", Sigmoid -> "sigmoid"), else the classify default ("sigmoid" for one label).

An unconverted reranker (vLLM's ``as_seq_cls_model``): a ``*ForCausalLM`` checkpoint whose config (through
``--hf-overrides``) names a ``*ForSequenceClassification`` and ``classifier_from_token``, a list of tokens
whose LM-head rows make the ``score`` head (checkpoints/seq_cls_from_lm.py), by ``method``:

- ``from_2_way_softmax`` (the default for two tokens ``[false, true]``; ``is_original_qwen3_reranker: true``
  selects it too, as vLLM's Qwen3 config does): one label, w = row[true] - row[false], so the label's
  sigmoid is the two tokens' softmax probability of ``true``; its label is the true token;
- ``no_post_processing`` (the default for any other count): one label per token, w = the tokens' rows, so
  the raw logits are the LM's logits of those tokens; the labels are the tokens.

Then also ``classifier_from_token`` (the tokens) and ``classifier_method``; ``id2label`` / ``num_labels`` of
the config are ignored (the tokens decide them).

- ``use_sep_token`` (vLLM's; its older name ``use_pad_token`` wins when set): how ``score`` encodes a text
  pair: True (a cross-encoder's default) with the tokenizer's pair template, ``tokenizer(text_1, text_2)``;
  False (an unconverted reranker's default, vLLM's "LLM as reranker") as one text, ``tokenizer(text_1 +
  text_2)``, so the caller's formatted query and document strings meet exactly as written.
"""
from __future__ import annotations

from typing import Any

SEQ_CLS_SUFFIX = "ForSequenceClassification"
FROM_TOKEN_METHODS = ("from_2_way_softmax", "no_post_processing")  # vLLM's SEQ_CLS_LOAD_METHODS
ACTIVATIONS = ("softmax", "sigmoid", "identity")
_TORCH_ACTS = {"Identity": "identity", "Sigmoid": "sigmoid", "Softmax": "softmax"}
_MAX_LABELS = 1 << 16


def is_seq_cls(cfg: dict[str, Any]) -> bool:
    return any(str(a).endswith(SEQ_CLS_SUFFIX) for a in cfg.get("architectures") or [])


def _error(msg: str):
    from jaxllm.models.config import ModelConfigError

    return ModelConfigError(msg)


def from_token_fields(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """{classifier_from_token, classifier_method, num_labels, labels} of an unconverted reranker's config,
    {} when it has no ``classifier_from_token``; ModelConfigError in one line naming the field."""
    tokens, qwen3 = cfg.get("classifier_from_token"), cfg.get("is_original_qwen3_reranker", False)
    if not isinstance(qwen3, bool):
        raise _error(f"{source}: is_original_qwen3_reranker={qwen3!r} is invalid: must be true or false")
    if tokens is None:
        if qwen3:
            raise _error(f"{source}: is_original_qwen3_reranker=True needs classifier_from_token (the false and "
                         f"true tokens, [\"no\", \"yes\"] for Qwen3-Reranker)")
        return {}
    if (not isinstance(tokens, list) or not tokens or len(tokens) > _MAX_LABELS
            or not all(isinstance(t, str) and t for t in tokens)):
        raise _error(f"{source}: classifier_from_token={tokens!r} is invalid: must be a list of 1..{_MAX_LABELS} "
                     f"non-empty token strings")
    if len(set(tokens)) != len(tokens):
        raise _error(f"{source}: classifier_from_token={tokens!r} is invalid: a token is listed twice")
    if not is_seq_cls(cfg):
        raise _error(f"{source}: classifier_from_token={tokens!r} needs architectures naming a "
                     f"*{SEQ_CLS_SUFFIX} (got {cfg.get('architectures')!r}): add e.g. \"architectures\": "
                     f"[\"Qwen3{SEQ_CLS_SUFFIX}\"] to --hf-overrides")
    method = cfg.get("method")
    if qwen3:
        if method not in (None, "from_2_way_softmax"):
            raise _error(f"{source}: method={method!r} is invalid with is_original_qwen3_reranker=True (it "
                         f"selects 'from_2_way_softmax')")
        method = "from_2_way_softmax"
    if method is None:
        method = "from_2_way_softmax" if len(tokens) == 2 else "no_post_processing"
    if method not in FROM_TOKEN_METHODS:
        raise _error(f"{source}: method={method!r} is invalid: must be one of {list(FROM_TOKEN_METHODS)}")
    if method == "from_2_way_softmax" and len(tokens) != 2:
        raise _error(f"{source}: classifier_from_token={tokens!r} is invalid for method 'from_2_way_softmax': "
                     f"must be 2 tokens [false, true] (got {len(tokens)})")
    two_way = method == "from_2_way_softmax"
    return dict(classifier_from_token=tuple(tokens), classifier_method=method,
                num_labels=1 if two_way else len(tokens), labels=(tokens[1],) if two_way else tuple(tokens))


def classifier_fields(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    from_token = from_token_fields(cfg, source)
    if not is_seq_cls(cfg):
        return {}
    if from_token:
        cfg = dict(cfg, id2label={str(i): label for i, label in enumerate(from_token["labels"])})
    id2label = cfg.get("id2label")
    if id2label is None:
        n = cfg.get("num_labels", 2)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= _MAX_LABELS:
            raise _error(f"{source}: num_labels={n!r} is invalid: must be an integer in 1..{_MAX_LABELS}")
        id2label = {str(i): f"LABEL_{i}" for i in range(n)}
    if not isinstance(id2label, dict) or not id2label:
        raise _error(f"{source}: id2label={id2label!r} is invalid: must be a non-empty object of id -> label")
    try:
        ids = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        raise _error(f"{source}: id2label keys {sorted(id2label)!r} are invalid: must be integer ids") from None
    n = max(ids) + 1
    if min(ids) < 0 or n > _MAX_LABELS:
        raise _error(f"{source}: id2label ids {min(ids)}..{max(ids)} are invalid: must be in 0..{_MAX_LABELS - 1}")
    labels = tuple(ids.get(i, f"LABEL_{i}") for i in range(n))
    problem = cfg.get("problem_type")
    if problem == "regression":
        classify = "identity"
    elif problem == "multi_label_classification" or n < 2:
        classify = "sigmoid"
    else:
        classify = "softmax"
    st = cfg.get("sentence_transformers")
    fn = st.get("activation_fn") if isinstance(st, dict) else None
    fn = fn or cfg.get("sbert_ce_default_activation_function")
    score = "sigmoid" if n < 2 else "softmax"  # vLLM's PoolerClassify
    if fn is not None:
        name = str(fn).rsplit(".", 1)[-1]
        if not str(fn).startswith("torch.nn.modules.") or name not in _TORCH_ACTS:
            raise _error(f"{source}: sbert_ce_default_activation_function={fn!r} is not supported (one of "
                         f"torch.nn.modules.*.{{{', '.join(_TORCH_ACTS)}}})")
        score = _TORCH_ACTS[name] if name == "Identity" else score
    # vLLM's use_sep_token (its older name use_pad_token wins when set): does score encode a pair with the
    # tokenizer's pair template (True, a cross-encoder's default) or tokenize text_1 + text_2 as one text
    # (False, the default of an LLM as reranker: classifier_from_token)
    sep = cfg.get("use_pad_token", cfg.get("use_sep_token", not from_token))
    if not isinstance(sep, bool):
        raise _error(f"{source}: use_sep_token={sep!r} is invalid: must be true or false")
    return dict(num_labels=n, labels=labels, classify_activation=classify, score_activation=score, use_sep_token=sep,
                **{k: v for k, v in from_token.items() if k.startswith("classifier_")})
