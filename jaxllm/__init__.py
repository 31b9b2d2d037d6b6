"""jaxllm: a pure-JAX/Pallas LLM inference engine (paged attention, continuous batching, prefix caching)."""
from jaxllm.llm import LLM
from jaxllm.outputs import CompletionOutput, Logprob, RequestOutput
from jaxllm.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
