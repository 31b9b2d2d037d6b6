"""bench/attention_kernels.py's pallas_mha16 impl on CPU (interpret mode, tiny MHA shapes): the decode and
mixed rows the device check's attn13b phase times beside "pallas" run the MHA decode kernel (G kv heads
per program) and give the reference's output, so the GPU A/B compares equal work."""
import json

from bench import attention_kernels

TINY = ["--heads", "20", "--kv-heads", "20", "--head-dim", "32", "--dtype", "float32", "--iters", "1", "--check"]


def test_mha_rows_agree_with_the_reference(tmp_path):
    out = tmp_path / "k.json"
    assert attention_kernels.main(["--impls", "reference,pallas,pallas_mha16", "--only", "decode", "--ragged",
                                   "--batch", "3", "--context", "80", *TINY, "--json", str(out), "--json-key", "b"]) == 0
    assert attention_kernels.main(["--impls", "pallas,pallas_mha16", "--only", "mixed", "--batch", "4", "--context", "64",
                                   "--mixed-prefill", "16", *TINY, "--json", str(out), "--json-key", "m"]) == 0
    doc = json.loads(out.read_text())
    decode, mixed = doc["b"]["results"], doc["m"]["results"]
    assert [r["impl"] for r in decode] == ["reference", "pallas", "pallas_mha16"]
    assert [r["impl"] for r in mixed] == ["pallas", "pallas_mha16"]
    assert all(r["max_abs_err_vs_ref"] < 1e-4 for r in decode + mixed), decode + mixed


def test_mha_impl_runs_the_mha_kernel(monkeypatch):
    """pallas_mha16 traces decode_mha.py's kernel (decode-only and mixed); pallas (the switch off) does not."""
    import jax

    monkeypatch.delenv("JAXLLM_DECODE_MHA_GROUP", raising=False)

    for only in ("decode", "mixed"):
        if only == "decode":
            q, cache, md = attention_kernels.make_workload(2, 32, 1, 4, 4, 32, 16, "float32", ragged=True)
        else:
            q, cache, md = attention_kernels.make_mixed_workload(2, 32, 8, 4, 4, 32, 16, "float32")
        text = str(jax.make_jaxpr(attention_kernels.attn_fn("pallas_mha16"))(q, cache, md))
        assert "jaxllm_paged_decode_mha" in text, only
        assert "jaxllm_paged_decode_mha" not in str(jax.make_jaxpr(attention_kernels.attn_fn("pallas"))(q, cache, md))
