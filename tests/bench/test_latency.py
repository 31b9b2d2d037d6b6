"""bench/latency.py: the weight-read byte count and the per-token timing arithmetic, then smoke runs
on the tiny dummy model (real engine, CPU) checking the JSON's fields are present and sane (no
timing assertions beyond that)."""
import json
import math

import pytest

from bench.latency import decode_timing, weight_read_bytes
from checkpoints.dummy import dummy_config

TINY = ["--model", "tiny-llama", "--load-format", "dummy", "--max-num-seqs", "4", "--max-num-batched-tokens", "64",
        "--max-model-len", "128", "--kv-cache-memory-bytes", str(1 << 20)]
SHORT = ["--input-len", "24", "--output-len", "6", "--repeats", "2", "--bandwidth-mib", "16"]


@pytest.fixture(autouse=True)
def _compile_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("JAXLLM_COMPILE_CACHE", str(tmp_path_factory.getbasetemp() / "xla"))


def test_weight_read_bytes_counts_the_lm_head_once():
    tied = dummy_config("smollm2-135m")  # tied: every parameter is read, the embedding as the LM head
    w = weight_read_bytes(tied, 4)
    assert w["read_params"] == w["params"] == tied.num_params and w["bytes"] == 538_060_032
    untied = dummy_config("tiny-llama")  # untied: the embedding table is read by one row only
    w = weight_read_bytes(untied, 2)
    e, v = untied.hidden_size, untied.vocab_size
    assert w["params"] == untied.num_params
    assert w["read_params"] == untied.num_params - v * e + e and w["bytes"] == 2 * w["read_params"]


def test_decode_timing_excludes_the_first_token():
    t = decode_timing([1.0, 1.5, 1.6, 1.7, 2.0], t_submit=0.75)
    assert t["output_tokens"] == 5 and t["ttft_ms"] == pytest.approx(250.0)
    assert t["ms_per_token"] == pytest.approx(1000.0 / 4)  # (2.0 - 1.0) / (5 - 1)
    assert t["itl_p50_ms"] == pytest.approx(200.0) and t["itl_max_ms"] == pytest.approx(500.0)


def _check_rows(res, systems):
    rows = {r["system"]: r for r in res["rows"]}
    assert list(rows) == [*systems, "weight-read floor"]
    floor = res["floor"]
    assert floor["bytes"] > 0 and floor["bandwidth_bytes_per_s"] > 0 and floor["ms_per_token"] > 0
    assert rows["weight-read floor"]["ms_per_token"] == floor["ms_per_token"]
    for s in systems:
        r = rows[s]
        assert r["repeats"] == 2 and r["ms_per_token"] > 0 and r["ttft_ms"] > 0
        assert r["tokens_per_s"] == pytest.approx(1e3 / r["ms_per_token"])
        assert 0 < r["fraction_of_floor"] < 1.5
        assert r["fraction_of_floor"] == pytest.approx(floor["ms_per_token"] / r["ms_per_token"])
        assert [run["output_tokens"] for run in res["runs"][s]] == [6, 6]
    assert res["workload"] == {"input_len": 24, "output_len": 6, "repeats": 2, "seed": 0, "model": "tiny-llama"}
    assert res["machine"]["cores"] >= 1 and res["engine_start_s"] > 0
    return rows


def test_latency_smoke_without_baseline(tmp_path, capsys):
    from bench import latency

    out = tmp_path / "lat.json"
    assert latency.main([*SHORT, "--baseline", "none", "--output-json", str(out), *TINY]) == 0
    res = json.loads(out.read_text())
    rows = _check_rows(res, ["jaxllm"])
    assert rows["jaxllm"]["ratio_vs_hf"] is None and "jaxllm_vs_hf" not in res["ratios"]
    assert res["ratios"]["jaxllm_fraction_of_floor"] == rows["jaxllm"]["fraction_of_floor"]
    table = capsys.readouterr().out
    assert "ms/token" in table and "weight-read floor" in table


def test_latency_smoke_with_hf_and_sync_scheduling(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from bench import latency

    out = tmp_path / "lat.json"
    assert latency.main([*SHORT, "--baseline", "hf", "--hf-threads", "1", "--no-async-scheduling",
                         "--output-json", str(out), *TINY]) == 0
    res = json.loads(out.read_text())
    rows = _check_rows(res, ["jaxllm", "hf generate"])
    assert rows["hf generate"]["ratio_vs_hf"] == 1.0
    assert math.isfinite(res["ratios"]["jaxllm_vs_hf"]) and res["ratios"]["jaxllm_vs_hf"] > 0
    assert "float32 on cpu" in res["hf"]
