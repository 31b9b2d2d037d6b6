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


def test_reports_host_time_with_priorities_and_bad_words(capsys):
    assert host_overhead.main(["--num-seqs", "4", "--steps", "5", "--scheduling-policy", "priority",
                               "--priorities", "3", "--bad-words", "the", "--bad-words", "once upon"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"4 sequences, 5 decode steps, priority \(3 levels\), 2 bad words: host time per step "
                     r"median [0-9.]+ ms", out), out


def test_priority_sched_bench_preempts_in_the_tight_pool(capsys):
    from bench import priority_sched

    assert priority_sched.main(["--num-seqs", "8", "--steps", "60", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"(ample|tight) pool \( *\d+ blocks\)  (fcfs|priority) +schedule\+update +([0-9.]+) us/step "
                      r"median .*preemptions per run (\d+)", out)
    assert len(rows) == 4, out
    assert all(float(us) > 0 for _, _, us, _ in rows)
    assert {pool: int(n) > 0 for pool, _, _, n in rows} == {"ample": False, "tight": True}, out
