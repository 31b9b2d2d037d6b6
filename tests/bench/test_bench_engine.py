"""Smoke tests of the bench scripts on a tiny dummy model (real engine, CPU): throughput with
--profile, the profile report on that trace, prefix caching on/off, and the device check's --smoke
mode (which also runs HF generate at batch 1 and static batch 2 through throughput.hf_generate)."""
import json
import os

import pytest

TINY = ["--model", "tiny-llama", "--load-format", "dummy", "--max-num-seqs", "4", "--max-num-batched-tokens", "64",
        "--max-model-len", "128", "--kv-cache-memory-bytes", str(1 << 20)]


@pytest.fixture(autouse=True)
def _compile_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("JAXLLM_COMPILE_CACHE", str(tmp_path_factory.getbasetemp() / "xla"))


def test_throughput_with_profile_and_report(tmp_path, capsys):
    from bench import profile_report, throughput

    out = tmp_path / "tp.json"
    prof = tmp_path / "prof"
    rc = throughput.main(["--num-prompts", "5", "--input-len", "4..12", "--output-len", "8..12",
                          "--output-json", str(out), "--profile", str(prof), "--profile-steps", "4", *TINY])
    assert rc == 0
    res = json.loads(out.read_text())
    (row,) = res["rows"]
    assert row["system"] == "jaxllm" and row["requests"] == 5 and row["output_tokens_per_s"] > 0
    assert 8 * 5 <= row["output_tokens"] <= 12 * 5
    assert res["profile"]["num_steps"] == 4 and "flops" in res["profile"]["cost_analysis"]
    assert os.path.isfile(prof / "step.hlo.txt")
    capsys.readouterr()
    assert profile_report.main([str(prof), "--json", str(tmp_path / "rep.json")]) == 0
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert rep["num_steps"] == 4 and rep["busy_us"] > 0
    assert sum(rep["categories_us"].values()) == pytest.approx(rep["busy_us"], rel=1e-6)
    assert rep["categories_us"]["matmul"] > 0 and rep["categories_us"]["attention"] > 0
    # the trace's step windows and the independently measured step times agree
    assert rep["categories_plus_idle_vs_measured"] == pytest.approx(1.0, rel=0.15)


def test_prefix_cache_on_off(tmp_path):
    from bench import prefix_cache

    out = tmp_path / "pc.json"
    rc = prefix_cache.main(["--num-questions", "3", "--prefix-len", "48", "--question-len", "3..6",
                            "--output-len", "3", "--sequential", "2", "--output-json", str(out), *TINY])
    assert rc == 0
    res = json.loads(out.read_text())
    rows = {(r["caching"], r["phase"]): r for r in res["rows"]}
    assert rows[("off", "batch")]["cached_tokens"] == 0 and rows[("off", "sequential")]["cached_tokens"] == 0
    assert rows[("on", "sequential")]["cached_tokens"] >= 2 * 48 - 2 * 16  # full shared blocks hit
    assert set(res["speedups"]) >= {"batch_throughput_x", "sequential_ttft_mean_x"}


def test_device_check_smoke_e2e_with_article(tmp_path):
    """bench/device_check.sh end to end on CPU (DEVICE_CHECK_SMOKE=1) for the issue-12 phases, which run
    bench/device_e2e.py --smoke (jaxllm, HF generate at batch 1 and static batch 2, the roofline and copy
    micro-benchmarks): the article-sized run goes on e2e's engine, so no standalone article phase runs and
    nothing is left to do. (It replaced a direct device_e2e.py --smoke run of the same code.)"""
    import subprocess
    import sys

    pytest.importorskip("torch")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out, todo = tmp_path / "gpu.json", tmp_path / "todo"
    env = dict(os.environ, PYTHON=sys.executable, DEVICE_CHECK_SMOKE="1", PHASES="e2e article profile", BUDGET_S="600",
               DEVICE_CHECK_TODO=str(todo), DEVICE_CHECK_HLO=str(tmp_path / "hlo"),
               DEVICE_CHECK_PROFILE=str(tmp_path / "prof"))
    p = subprocess.run(["bash", "bench/device_check.sh", str(out)], cwd=root, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    dc = res["device_check"]
    assert list(dc["phases"]) == ["imports", "e2e"] and dc["phases"]["e2e"]["rc"] == 0 and dc["skipped"] == []
    assert todo.read_text().split() == [] and "every requested phase ran" in p.stdout
    e2e = res["e2e"]
    systems = [r["system"] for r in e2e["rows"]]
    assert systems[0] == "jaxllm" and systems.count("hf generate") == 2 and e2e["rows"][1]["requests"] == 2
    assert e2e["roofline"]["decode_s_per_token"] > 0 and e2e["micro"]["copy_gbytes_per_s"] > 0
    assert e2e["decode_attention"] == {"mode": "skipped", "reason": "cpu backend", "group": None}  # CPU: not tuned
    assert set(e2e["ratios"]) == {"jaxllm_vs_hf_batch1", "jaxllm_vs_hf_batch2"}
    for name, kinds in (("decode", {"decode"}), ("mixed", {"mixed", "decode"})):  # "profile" rode on e2e's engine
        prof = e2e[f"profile_{name}"]
        assert prof["num_steps"] > 0 and set(prof["kinds"]) <= kinds
        assert ("mixed" in prof["kinds"]) is (name == "mixed")  # the first steps prefill beside decodes
        parts = sum(prof["categories_us"].values()) + prof["idle_us"]
        assert abs(parts - prof["window_us"]) <= 1e-6 * prof["window_us"] + 1 and prof["categories_us"]["matmul"] > 0
    assert "profile" not in dc["phases"]
    import tarfile

    with tarfile.open(tmp_path / "profile_decode.tgz") as tgz:  # the trace and the bucket's HLO come back
        names = tgz.getnames()
    assert any(n.endswith(".trace.json.gz") for n in names) and "./step.hlo.txt" in names, names
    art = e2e["article"]  # --smoke: 12 chat-like requests scaled to the tiny model, on the same engine
    assert art["requests"] == art["completed"] == 12 and not art["truncated"] and art["compiles"] == 0
    assert art["itl_ms"]["n"] > 0 and art["ttft_ms"]["n"] == 12 and art["output_tokens_per_s"] > 0
