"""bench/stacked_matmul.py on CPU (interpret mode, 1/8-scale 13B shapes): runs and agrees with XLA."""
import json

from bench import stacked_matmul


def test_bench_runs_and_agrees(tmp_path):
    out = tmp_path / "smm.json"
    assert stacked_matmul.main(["--scale", "8", "--rows", "1", "--layers", "2", "--iters", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["stacked_matmul"]["rows"]
    assert [r["shape"] for r in rows] == ["qkvo", "gate_up", "down"]
    assert all(r["max_abs_err"] < 0.05 and r["pallas_us"] > 0 and r["xla_us"] > 0 for r in rows)
