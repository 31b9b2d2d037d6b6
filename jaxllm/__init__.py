"""jaxllm: a pure-JAX/Pallas LLM inference engine (paged attention, continuous batching, prefix caching)."""
from jaxllm.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from jaxllm.llm import LLM
from jaxllm.outputs import (ClassificationOutput, ClassificationRequestOutput, CompletionOutput, EmbeddingOutput,
                            EmbeddingRequestOutput, Logprob, RequestOutput, ScoringOutput, ScoringRequestOutput)
from jaxllm.pooling_params import PoolingParams
from jaxllm.sampling_params import RequestOutputKind, SamplingParams

__all__ = ["LLM", "SamplingParams", "PoolingParams", "RequestOutput", "CompletionOutput", "Logprob",
           "EmbeddingRequestOutput", "EmbeddingOutput", "BeamSearchParams", "BeamSearchOutput",
           "BeamSearchSequence", "ClassificationOutput", "ClassificationRequestOutput", "ScoringOutput",
           "ScoringRequestOutput", "RequestOutputKind"]
