"""bench/attention_kernels.py --only mixed on CPU (interpret mode, tiny shapes): the mixed step the
device check times (decodes + one prompt chunk) gives the reference's output on both Pallas paths
(the decodes split out, and every sequence in q tiles), so the GPU A/B compares equal work."""
import json

from bench import attention_kernels


def test_mixed_step_rows_agree_with_the_reference(tmp_path):
    out = tmp_path / "k.json"
    assert attention_kernels.main(["--impls", "pallas,pallas_tiles", "--only", "mixed", "--batch", "5", "--context", "96",
                                   "--mixed-prefill", "24", "--heads", "4", "--kv-heads", "2", "--head-dim", "32",
                                   "--dtype", "float32", "--iters", "1", "--check", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["kernels"]["results"]
    assert [r["impl"] for r in rows] == ["pallas", "pallas_tiles"] and all(r["kernel"] == "mixed" for r in rows)
    assert all(r["max_abs_err_vs_ref"] < 1e-4 for r in rows), rows
