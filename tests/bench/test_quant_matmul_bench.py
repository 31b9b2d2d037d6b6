"""bench/quant_matmul.py on CPU (interpret mode, shapes / 16): every row's Pallas result agrees with
XLA's dot on the same quantized weight, so the GPU phase (device_check.sh qmatmul) times equal work."""
import json

from bench import quant_matmul


def test_quant_matmul_bench_rows_agree(tmp_path):
    out = tmp_path / "q.json"
    assert quant_matmul.main(["--scale", "16", "--rows", "1", "--kinds", "int4,q8_0", "--iters", "1",
                              "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["quant_matmul"]["rows"]
    assert [(r["kind"], r["shape"]) for r in rows] == [(k, s) for k in ("int4", "q8_0")
                                                      for s in ("wqkv", "wo", "w_gate_up", "w_down")]
    for r in rows:
        assert r["max_rel_err"] < 1e-2, r  # bf16 outputs of the same f32-accumulated dot
        assert r["pallas_us"] > 0 and r["xla_us"] > 0
