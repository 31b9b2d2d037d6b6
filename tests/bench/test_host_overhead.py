"""bench/host_overhead.py runs the real engine core (scheduler, detokenizer, stop checks) around an
instant runner and reports a per-step host time."""
import re

from bench import host_overhead


def test_reports_host_time_per_step(capsys):
    assert host_overhead.main(["--num-seqs", "4", "--steps", "5"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"4 sequences, 5 decode steps: host time per step median ([0-9.]+) ms", out)
    assert m and float(m.group(1)) > 0, out


def test_reports_host_time_with_adapters(capsys):
    assert host_overhead.main(["--num-seqs", "4", "--steps", "5", "--num-adapters", "2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"4 sequences, 5 decode steps, 2 adapters: host time per step median [0-9.]+ ms", out), out
