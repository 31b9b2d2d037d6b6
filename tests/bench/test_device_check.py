"""bench/device_check.sh's control flow on CPU (DEVICE_CHECK_SMOKE=1: no GPU assert, tiny shapes): the
budget skips phases whose timeout exceeds the time left, records them and leaves them in the to-do
file that PHASES=rest reads back. The smoke run of the e2e + article phases is in
test_bench_engine.py."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_check(tmp_path, out, **env):
    full = dict(os.environ, PYTHON=sys.executable, DEVICE_CHECK_SMOKE="1",
                DEVICE_CHECK_TODO=str(tmp_path / "todo"), DEVICE_CHECK_HLO=str(tmp_path / "hlo"), **env)
    return subprocess.run(["bash", "bench/device_check.sh", str(out)], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=300)


def test_budget_skips_in_acceptance_order_and_rest_resumes(tmp_path):
    out = tmp_path / "a.json"
    # PHASES in any order; "quant" names the five quantization phases; a 1 s budget covers no timeout
    p = run_check(tmp_path, out, PHASES="memory quant lora e2e", BUDGET_S="1")
    assert p.returncode == 0, p.stdout + p.stderr
    order = ["e2e", "int8", "fp8", "lora", "int4", "kvfp8", "quanthlo", "memory"]
    for name in order:
        assert f"== {name}: skipped: budget" in p.stdout
    assert (tmp_path / "todo").read_text().split() == order
    dc = json.loads(out.read_text())["device_check"]
    assert dc["skipped"] == order and list(dc["phases"]) == ["imports"] and dc["phases"]["imports"]["rc"] == 0
    assert dc["budget_s"] == 1 and dc["smoke"] is True
    # the second call picks up exactly what the first left undone
    p = run_check(tmp_path, tmp_path / "b.json", PHASES="rest", BUDGET_S="1")
    assert p.returncode == 0 and f"left undone: '{' '.join(order)}'" in p.stdout, p.stdout
    assert json.loads((tmp_path / "b.json").read_text())["device_check"]["skipped"] == order
    # on a fresh machine there is nothing to resume: a clear refusal, no phase run
    os.remove(tmp_path / "todo")
    p = run_check(tmp_path, tmp_path / "c.json", PHASES="rest")
    assert p.returncode == 2 and "name the phases" in p.stdout and not (tmp_path / "c.json").exists()


def test_spec_and_moe_phases_are_last_by_default_and_run_in_smoke(tmp_path):
    # the default phases under a 1 s budget: spec then moe are skipped last (lowest priority); GPU-only ones
    # are not listed
    p = run_check(tmp_path, tmp_path / "a.json", BUDGET_S="1")
    assert p.returncode == 0, p.stdout + p.stderr
    assert (tmp_path / "todo").read_text().split() == ["e2e", "article", "profile", "sampler", "int8", "fp8",
                                                       "lora", "int4", "kvfp8", "quanthlo", "memory", "spec", "moe"]
    # the two phases on CPU, in one run: bench/spec_decode.py --smoke and bench/moe.py --preset tiny-mixtral
    # merge their rows into OUT.json
    out = tmp_path / "b.json"
    p = run_check(tmp_path, out, PHASES="spec moe", BUDGET_S="300")
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads(out.read_text())
    phases = doc["device_check"]["phases"]
    assert phases["spec"]["rc"] == 0 and phases["moe"]["rc"] == 0 and not doc["device_check"]["skipped"]
    sd = doc["spec_decode"]
    assert sd["load_format"] == "dummy" and sd["compiled_after_warmup"] == 0
    rows = {(r["workload"], r["batch"], r["mode"]): r for r in sd["rows"]}
    assert set(rows) == {(w, b, m) for w in ("repeat", "chat") for b in (1, 8) for m in ("plain", "spec")}
    for (w, b, m), r in rows.items():
        assert r["tokens"] == rows[(w, b, "plain")]["tokens"] > 0
        assert r["same_output"] is (None if m == "plain" else True)
    # three models at batch 1
    assert {(r["model"], r["batch"]) for r in doc["moe"]["rows"]} == {
        (m, 1) for m in ("moe-grouped", "moe-dense", "dense-active")}
    assert all(r["step_ms"] > 0 for r in doc["moe"]["rows"])
    assert not (tmp_path / "todo").read_text().split()
