"""bench/step_memory.py on CPU: the compiled step and bare layer scans keep the donated KV cache in
place (temp far below one cache array), and the script says so. The tests after the first compile the
steps alone (--steps-only: the sampling, prompt-logprobs and block-copy programs are not what they read)."""
import json

from bench import step_memory


def test_step_updates_the_cache_in_place(tmp_path, capsys):
    out = tmp_path / "mem.json"
    rc = step_memory.main(["--cache-mib", "64", "--layers", "2", "--hidden", "256", "--heads", "4", "--kv-heads", "2",
                           "--max-num-seqs", "8", "--max-num-batched-tokens", "64", "--probes", "--json", str(out)])
    assert rc == 0, capsys.readouterr().out
    doc = json.loads(out.read_text())["step_memory"]
    steps = [r for r in doc["rows"] if r["bucket"].startswith("('step'")]
    assert steps and all(r["alias_size_in_bytes"] >= 2 * doc["cache_bytes"] for r in steps)  # K and V donated
    assert all(r["temp_over_cache"] < 0.5 for r in steps)
    assert all(v < 0.05 for v in doc["probes"].values())
    # without --steps-only (device_check's memory phase) every program warm-up compiles is reported
    assert {r["bucket"].split("'")[1] for r in doc["rows"]} >= {"step", "sample", "prompt_lp", "copy_blocks"}


def test_one_kv_head_is_not_copied(tmp_path, capsys):
    """MQA (one kv head): the cache's size-1 head axis once let XLA give the written cache a layout
    of its own and copy it back after every layer (issue 18)."""
    out = tmp_path / "mem.json"
    rc = step_memory.main(["--cache-mib", "32", "--layers", "2", "--hidden", "256", "--heads", "4", "--kv-heads", "1",
                           "--max-num-seqs", "8", "--max-num-batched-tokens", "64", "--steps-only", "--json", str(out)])
    assert rc == 0, capsys.readouterr().out
    rows = json.loads(out.read_text())["step_memory"]["rows"]
    steps = [r for r in rows if r["bucket"].startswith("('step'")]
    assert steps and all(r["cache_sized_copies"] == [] and r["temp_over_cache"] < 0.1 for r in steps)
    assert len(steps) == len(rows) == 2  # --steps-only: the decode and the mixed bucket's step, nothing else


def test_unrolled_layers_copy_no_weight(tmp_path, capsys, monkeypatch):
    """Issue 12: with per-layer weights (the unroll layer loop) the compiled decode and mixed steps
    slice no weight (0 bytes copied per step) and their temp stays well below one layer's weights.
    The scan loop over stacked weights: with the CPU's in-place stacked dot (jaxllm/models/stacked_dot.py,
    steps of <= 64 tokens: both buckets here) no weight copy either; with it off
    (JAXLLM_CPU_STACKED_DOT=xla) the same detector finds a copy of every layer's weights."""
    monkeypatch.setenv("JAXLLM_LAYER_LOOP", "auto")  # main() sets them; restored after the test
    monkeypatch.setenv("JAXLLM_CPU_STACKED_DOT", "auto")
    docs = {}
    for loop, sdot in (("unroll", "auto"), ("scan", "auto"), ("scan", "xla")):
        out = tmp_path / f"{loop}-{sdot}.json"
        rc = step_memory.main(["--cache-mib", "16", "--layers", "2", "--hidden", "512", "--heads", "4", "--kv-heads", "2",
                               "--max-num-seqs", "8", "--max-num-batched-tokens", "64", "--layer-loop", loop,
                               "--stacked-dot", sdot, "--steps-only", "--json", str(out)])
        assert rc == 0, capsys.readouterr().out
        docs[loop, sdot] = json.loads(out.read_text())["step_memory"]
    unroll, in_place, copied = docs["unroll", "auto"], docs["scan", "auto"], docs["scan", "xla"]
    assert unroll["layer_loop"] == "unroll" and in_place["layer_loop"] == copied["layer_loop"] == "scan"
    for doc in (unroll, in_place):
        steps = [r for r in doc["rows"] if r["bucket"].startswith("('step'")]
        assert len(steps) == 2, steps  # the decode and the mixed bucket
        for r in steps:
            assert r["weight_bytes_copied_per_step"] == 0 and r["weight_copies"] == [], r
            if r["bucket"].endswith("True)"):  # decode
                assert r["temp_size_in_bytes"] < 0.5 * doc["layer_weight_bytes"], r
    copied_steps = [r for r in copied["rows"] if r["bucket"].startswith("('step'")]
    assert copied_steps and all(r["weight_bytes_copied_per_step"] >= 2 * copied["layer_weight_bytes"] // 2
                                for r in copied_steps), copied_steps


def test_fp8_measures_the_engine_fixed_scale_cache(tmp_path, capsys):
    """--kv-cache-dtype fp8 compiles the engine's step (build_engine's ``scales_fixed`` cache): in place,
    and its optimized HLO computes no per-write absmax (the first-write path's two per layer, K and V,
    are what tests/runner/test_kv_calibration.py's pattern finds on a raw cache)."""
    from tests.runner.test_kv_calibration import _absmax_reductions

    out, hlo = tmp_path / "mem.json", tmp_path / "hlo"
    rc = step_memory.main(["--cache-mib", "16", "--layers", "2", "--hidden", "256", "--heads", "4", "--kv-heads", "2",
                           "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--kv-cache-dtype", "fp8",
                           "--steps-only", "--hlo-dir", str(hlo), "--json", str(out)])
    assert rc == 0, capsys.readouterr().out
    doc = json.loads(out.read_text())["step_memory"]
    assert doc["kv_scales_fixed"] and not doc["copies_cache"]
    files = sorted(hlo.iterdir())
    assert len(files) == sum(r["bucket"].startswith("('step'") for r in doc["rows"]) > 0
    for f in files:
        assert _absmax_reductions(f.read_text(), 2) == [], f.name
