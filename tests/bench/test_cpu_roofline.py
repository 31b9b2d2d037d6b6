"""bench/cpu_roofline.py's work count against a brute-force count over the model's own parameter
shapes, token by token."""
import numpy as np

from bench.common import BenchRequest
from bench.cpu_roofline import workload_cost
from checkpoints.dummy import dummy_config
from jaxllm.models.llama import param_shapes


def test_workload_cost_equals_brute_force():
    config = dummy_config("smollm2-135m")
    reqs = [BenchRequest(list(range(7)), 5), BenchRequest(list(range(3)), 1), BenchRequest(list(range(12)), 9)]
    shapes = param_shapes(config)
    # Every 2-D+ per-layer weight is a projection (norm vectors are [layers, E]).
    layer_weights = sum(int(np.prod(s)) for n, s in shapes.items() if n.startswith("layers.") and len(s) > 2)
    head = int(np.prod(shapes["embed"]))  # tied LM head
    flops = kv_tokens = 0
    for r in reqs:
        for _ in range(r.prompt_len):  # prefill: every prompt token through the layers
            flops += 2 * layer_weights
        for j in range(r.output_len):
            flops += 2 * head  # one LM-head row per generated token
            kv_tokens += r.prompt_len + j  # the step producing token j reads this much context
            if j < r.output_len - 1:
                flops += 2 * layer_weights  # token j is fed back, except the last
    c = config
    got = workload_cost(config, reqs)
    assert got["gemm_flops"] == flops
    assert got["kv_read_bytes"] == kv_tokens * 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4
    assert got["output_tokens"] == 15 and got["tokens_fed"] == 22 + 12
