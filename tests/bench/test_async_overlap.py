"""bench/async_overlap.py drives the real engine in both modes around one runner and reports the
device idle time between decode steps (on a tiny random llama here; SmolLM2 is the bench's default)."""
import re

from bench import async_overlap
from tests.models.hf_tiny import make_tiny_hf


def test_reports_idle_between_steps_for_both_modes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JAXLLM_COMPILE_CACHE", str(tmp_path / "xla"))
    path = make_tiny_hf("llama", str(tmp_path))
    assert async_overlap.main(["--model", path, "--num-seqs", "2", "--steps", "4", "--skip", "3",
                               "--max-model-len", "128", "--max-num-batched-tokens", "64"]) == 0
    out = capsys.readouterr().out
    for mode in ("sync", "async"):
        m = re.search(rf"{mode}   2 seqs: +([0-9.]+) ms/step, device busy median +([0-9.]+) ms, idle between "
                      rf"steps median +([0-9.]+) ms", out)
        assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0, out
