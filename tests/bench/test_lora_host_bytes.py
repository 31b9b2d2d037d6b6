"""bench/lora_host_bytes.py end to end on the tiny dummy model: the host-cache entry of a rank-4
adapter under max_lora_rank 16 costs its own rank's bytes (an f32 model: the loaded f32 arrays'),
less than a quarter of a device slot's (rank 16, and B block-diagonal over the fused parts); the
reference is the adapter's and the slot layout's shapes from the model config."""
import json

from bench import lora_host_bytes
from checkpoints import load_config


def test_host_cache_entry_is_at_the_adapter_rank(tmp_path):
    out = tmp_path / "b.json"
    assert lora_host_bytes.main(["--model", "tiny-llama", "--load-format", "dummy", "--dtype", "float32",
                                 "--rank", "4", "--max-lora-rank", "16", "--repeats", "1",
                                 "--output-json", str(out)]) == 0
    row = json.loads(out.read_text())
    mc, _ = load_config("tiny-llama", "dummy")
    E, F, H, K, D = mc.hidden_size, mc.intermediate_size, mc.num_heads, mc.num_kv_heads, mc.head_dim
    ins_outs = [(E, H * D), (E, K * D), (E, K * D), (H * D, E), (E, F), (E, F), (F, E)]  # q k v o gate up down
    want = 4 * mc.num_layers * 4 * sum(i + o for i, o in ins_outs)  # f32 x L x rank x (A + B)
    assert row["host_cache_bytes"] == row["loaded_f32_bytes"] == want
    R = 16  # every slot is padded to max_lora_rank
    slot_a = 3 * E + H * D + 2 * E + F  # per rank: wqkv, wo, w_gate_up, w_down (the parts' A side by side)
    slot_b = 3 * (H + 2 * K) * D + E + 2 * (2 * F) + E  # per rank: P row blocks x the fused output width
    assert row["device_slot_bytes"] == 4 * mc.num_layers * R * (slot_a + slot_b)
