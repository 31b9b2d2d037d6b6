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
"""
from __future__ import annotations

from typing import Any

SEQ_CLS_SUFFIX = "ForSequenceClassification"
ACTIVATIONS = ("softmax", "sigmoid", "identity")
_TORCH_ACTS = {"Identity": "identity", "Sigmoid": "sigmoid", "Softmax": "softmax"}
_MAX_LABELS = 1 << 16


def is_seq_cls(cfg: dict[str, Any]) -> bool:
    return any(str(a).endswith(SEQ_CLS_SUFFIX) for a in cfg.get("architectures") or [])


def _error(msg: str):
    from jaxllm.models.config import ModelConfigError

    return ModelConfigError(msg)


def classifier_fields(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    if not is_seq_cls(cfg):
        return {}
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
    return dict(num_labels=n, labels=labels, classify_activation=classify, score_activation=score)
