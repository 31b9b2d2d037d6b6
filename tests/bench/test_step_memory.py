"""bench/step_memory.py on CPU: the compiled step and bare layer scans keep the donated KV cache in
place (temp far below one cache array), and the script says so."""
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
