"""bench/tp_step.py's HLO collective count on a known program, and the script end to end on the
tiny dummy model (one forced device: tp=1 only, the CPU device count is fixed in this process)."""
import json
import math

from bench import tp_step

HLO = """HloModule m

%body (p: f32[4,64]) -> f32[4,64] {
  %ar = f32[4,64]{1,0} all-reduce(%p), replica_groups={}
}

ENTRY %main (a: f32[4,64]) -> f32[4,512] {
  %e = f32[4,64]{1,0} all-reduce(%a), replica_groups={}
  %g = f32[4,512]{1,0} all-gather(%e), dimensions={1}
}
"""


def test_collectives_count_loop_body_per_layer():
    scan = tp_step.collectives(HLO, num_layers=30, scan=True)
    assert [(c["op"], c["shape"], c["bytes"], c["per_step"]) for c in scan] == [
        ("all-reduce", "f32[4,64]", 1024, 30), ("all-reduce", "f32[4,64]", 1024, 1), ("all-gather", "f32[4,512]", 8192, 1)]
    assert all(c["per_step"] == 1 for c in tp_step.collectives(HLO, num_layers=30, scan=False))


def test_tp_step_runs(tmp_path):
    out = tmp_path / "tp.json"
    assert tp_step.main(["--model", "tiny-llama", "--load-format", "dummy", "--tp", "1", "--cache-mib", "1",
                         "--tokens", "3", "--repeats", "1", "--max-num-batched-tokens", "64",  # one mixed bucket
                         "--output-json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    # ms_per_token is a difference of two timings (N tokens - 1 token): its sign is the machine's load's
    assert row["tp"] == 1 and math.isfinite(row["ms_per_token"]) and row["collectives"] == [] and row["vs_tp1"] == 1.0
    assert row["temp_mib"] < row["cache_shard_mib"]
