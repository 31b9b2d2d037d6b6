"""bench/profile_report.py on a hand-made trace + HLO: categories, overlap sharing, idle, check vs measured."""
import gzip
import json

import pytest

from bench import profile_report as pr

HLO = """HloModule jit_step

FileNames
1 "/x/jaxllm/models/llama.py"
2 "/x/pallas_kernels/attention/reference.py"
3 "/x/pallas_kernels/kv_write.py"
4 "/x/jaxllm/runner/sampler.py"

FunctionNames
1 "layer"
2 "ragged_paged_attention_reference"
3 "write_kv"
4 "sample"

FileLocations
1 {file_name_id=1 function_name_id=1 line=10 end_line=10 column=1 end_column=2}
2 {file_name_id=2 function_name_id=2 line=20 end_line=20 column=1 end_column=2}
3 {file_name_id=3 function_name_id=3 line=30 end_line=30 column=1 end_column=2}
4 {file_name_id=4 function_name_id=4 line=40 end_line=40 column=1 end_column=2}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=1}
3 {file_location_id=3 parent_frame_id=1}
4 {file_location_id=4 parent_frame_id=4}

ENTRY %main {
  %ynn_fusion.1 = f32[8,16]{1,0} fusion(%a, %b), kind=kCustom, calls=%c1, metadata={op_name="jit(step)/te,ef->tf/dot_general" stack_frame_id=1}
  %attn_fusion = f32[8,16]{1,0} fusion(%a), kind=kLoop, calls=%c2, metadata={op_name="jit(step)/while/body/exp" stack_frame_id=2}
  %scatter.3 = f32[8,16]{1,0} scatter(%a, %b, %c), metadata={op_name="jit(step)/scatter" stack_frame_id=3}
  %argmax_fusion = s32[8]{0} fusion(%a), kind=kLoop, calls=%c3, metadata={op_name="jit(step)/argmax" stack_frame_id=4}
  %while.7 = (s32[], f32[8]) while(%t), condition=%cond, body=%body, metadata={op_name="jit(step)/while" stack_frame_id=1}
  %copy.2 = f32[8]{0} copy(%a)
}
"""


def _x(name, ts, dur, tid=1, op=True, **args):
    e = {"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": name, "args": dict(args)}
    if op:
        e["args"]["hlo_op"] = name
    return e


def make_trace():
    ev = []
    # step 0 window [0, 100): while [10, 90) containing matmul [10, 40), attention [40, 60) on thread 2
    # overlapping a scatter [50, 70) on thread 3; sampling [80, 90); idle outside [10, 90).
    ev.append(_x("engine_step", 0, 100, tid=9, op=False, step_num="0"))
    ev.append(_x("while.7", 10, 80))
    ev.append(_x("ynn_fusion.1", 10, 30, tid=2))
    ev.append(_x("attn_fusion", 40, 20, tid=2))
    ev.append(_x("scatter.3", 50, 20, tid=3))
    ev.append(_x("argmax_fusion", 80, 10, tid=2))
    # step 1 window [200, 300): one unknown op [200, 260)
    ev.append(_x("engine_step", 200, 100, tid=9, op=False, step_num="1"))
    ev.append(_x("copy.2", 200, 60))
    return {"traceEvents": ev}


def test_categories_overlap_and_idle():
    hlo = pr.HloIndex(HLO)
    measured = {"steps": [{"wall_s": 100e-6, "kind": "decode", "bucket": [8, 8, True]}] * 2,
                "cost_analysis": {"flops": 1e6, "bytes accessed": 1e5}, "cost_bucket_tokens": 8}
    rep = pr.analyze(make_trace(), hlo, measured)
    s0 = rep["steps"][0]
    assert s0["busy_us"] == pytest.approx(80) and s0["idle_us"] == pytest.approx(20)
    c0 = s0["categories_us"]
    # [50, 60) is shared by attention and scatter; the while container only owns [70, 80).
    assert c0["matmul"] == pytest.approx(30)
    assert c0["attention"] == pytest.approx(15)
    assert c0["cache_write"] == pytest.approx(15)
    assert c0["sampling"] == pytest.approx(10)
    assert c0["other"] == pytest.approx(10)
    assert sum(c0.values()) == pytest.approx(s0["busy_us"])
    assert rep["steps"][1]["categories_us"]["other"] == pytest.approx(60)
    assert rep["busy_us"] == pytest.approx(70) and rep["window_us"] == pytest.approx(100)
    assert rep["categories_plus_idle_vs_measured"] == pytest.approx(1.0)
    assert rep["categories_vs_measured"] == pytest.approx(0.7)
    assert rep["cost"]["achieved_gflops"] == pytest.approx(1e6 / 100e-6 / 1e9)
    top = {o["op"]: o for o in rep["top_ops"]}
    assert top["ynn_fusion.1"]["category"] == "matmul" and "llama.py:10" in top["ynn_fusion.1"]["source"]


def test_cli_on_a_profile_dir(tmp_path, capsys):
    run = tmp_path / "plugins" / "profile" / "2026_01_01_00_00_00"
    run.mkdir(parents=True)
    with gzip.open(run / "host.trace.json.gz", "wt") as f:
        json.dump(make_trace(), f)
    (tmp_path / "step.hlo.txt").write_text(HLO)
    (tmp_path / "jaxllm_profile.json").write_text(json.dumps({"steps": [{"wall_s": 1e-4, "kind": "decode"}]}))
    assert pr.main([str(tmp_path), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "attention" in out and "device idle" in out and "top" in out
    assert json.loads((tmp_path / "r.json").read_text())["num_steps"] == 2
