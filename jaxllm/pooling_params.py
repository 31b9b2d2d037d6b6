"""PoolingParams: what an embedding request asks for (host side, no jax). vLLM's names.

``pooling_type``: how one vector is made from the prompt's hidden states (last_hidden_state,
after the final norm): ``"LAST"`` = the last token's (Qwen3-Embedding, e5-mistral: decoder
embedders put an EOS token last), ``"MEAN"`` = the mean over every prompt token. None = the
engine's (``EngineConfig.pooling_type``, else the checkpoint's sentence-transformers pooling
config, else LAST). ``normalize``: L2-normalise the pooled vector (None = the engine's default,
True unless configured). ``truncate_prompt_tokens``: keep the prompt's last k tokens.
``dimensions``: keep the pooled vector's first d values, then normalise (vLLM's Matryoshka
truncation; the engine refuses it for a model that is not Matryoshka, see
``EngineConfig.is_matryoshka``). ``activation`` (a classify request, vLLM's): apply the model's
activation to the classifier's logits (softmax / sigmoid, jaxllm/models/classifier_config.py);
False = the raw logits; None = True. An embedding request refuses it, a classify request refuses
``pooling_type`` other than LAST, ``normalize`` and ``dimensions`` (the head reads the last token).
"""

from __future__ import annotations

import msgspec

POOLING_TYPES = ("LAST", "MEAN")


class PoolingParams(msgspec.Struct, kw_only=True):
    pooling_type: str | None = None
    normalize: bool | None = None
    truncate_prompt_tokens: int | None = None
    dimensions: int | None = None
    activation: bool | None = None

    def validate(self) -> "PoolingParams":
        if self.pooling_type is not None and self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling_type={self.pooling_type!r} is invalid: must be one of "
                             f"{list(POOLING_TYPES)}")
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ValueError(f"normalize={self.normalize!r} is invalid: must be a bool")
        k = self.truncate_prompt_tokens
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"truncate_prompt_tokens={k!r} is invalid: must be an integer >= 1")
        if self.activation is not None and not isinstance(self.activation, bool):
            raise ValueError(f"activation={self.activation!r} is invalid: must be a bool")
        d = self.dimensions
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
            raise ValueError(f"dimensions={d!r} is invalid: must be an integer >= 1")
        return self

    def resolved(self, pooling_type: str, normalize: bool) -> "PoolingParams":
        """These params with the engine's defaults filled in."""
        return msgspec.structs.replace(
            self, pooling_type=self.pooling_type or pooling_type,
            normalize=normalize if self.normalize is None else self.normalize)
