"""At tp > 1 the compiled step still updates each device's KV cache shard in place: per-device temp
far below the shard and no cache-sized copy in the HLO. One kv head per device is the case that
used to copy the whole cache after every layer's write (issue 18: 388 MiB of temp for a 256 MiB
cache at tp=3, and a step time that grew with the cache)."""
from __future__ import annotations

import json

import pytest

from bench import step_memory

# --steps-only: each bucket's step alone (what the checks read; no sampling / prompt-logprobs / copy program)
SMALL = ["--cache-mib", "32", "--layers", "2", "--hidden", "256", "--heads", "4",
         "--max-num-seqs", "8", "--max-num-batched-tokens", "64", "--steps-only"]


@pytest.mark.parametrize("tp,kv_heads", [(2, 2), (4, 2)])  # 1 kv head per device, and kv repeated
def test_tp_step_keeps_the_cache_in_place(tmp_path, capsys, tp, kv_heads):
    out = tmp_path / "mem.json"
    rc = step_memory.main(SMALL + ["--tp", str(tp), "--kv-heads", str(kv_heads), "--json", str(out)])
    assert rc == 0, capsys.readouterr().out
    doc = json.loads(out.read_text())["step_memory"]
    steps = [r for r in doc["rows"] if r["bucket"].startswith("('step'")]
    assert doc["tp"] == tp and len(steps) >= 2
    for r in steps:
        assert r["alias_size_in_bytes"] >= 2 * doc["cache_bytes"], r  # each device's K and V shards donated
        assert r["temp_over_cache"] < 0.1, r
        assert r["cache_sized_copies"] == [], r
