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


def test_split_at_long_contexts_runs_the_runner_inputs(capsys):
    """--context: prompts of N random ids, one run per N; --split: the stub runner builds each step's inputs
    and the report splits a step into scheduler (of which block tables), build_inputs and the rest."""
    assert host_overhead.main(["--num-seqs", "4", "--steps", "3", "--context", "40", "--context", "70",
                               "--split", "--output-kind", "final_only"]) == 0
    out = capsys.readouterr().out
    for n in (40, 70):
        assert re.search(rf"4 sequences, 3 decode steps, output_kind final_only, {n}-token prompts: host time", out), out
    splits = re.findall(r"split, medians per step: scheduler ([0-9.]+) ms \(of which block tables ([0-9.]+) ms\), "
                        r"build_inputs ([0-9.]+) ms, rest (-?[0-9.]+) ms", out)
    assert len(splits) == 2, out
    assert all(float(build) > 0 and float(sched) > 0 for sched, _, build, _ in splits), out


def test_step_inputs_reports_arrays_and_lists(capsys):
    from bench import step_inputs

    for extra, form in (([], "int32 arrays"), (["--lists"], "lists")):
        assert step_inputs.main(["--num-seqs", "4", "--context", "100", "--iters", "3", *extra]) == 0
        out = capsys.readouterr().out
        assert re.search(rf"build_inputs, 4 decode seqs, 100-token contexts, tables as {form}: median [0-9.]+ ms",
                         out), out
