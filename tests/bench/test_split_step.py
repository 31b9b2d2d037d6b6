"""bench/split_step.py end to end on the tiny dummy model: both variants run and are timed."""
import re

from bench import split_step


def test_split_step_times_both_variants(capsys):
    assert split_step.main(["--model", "tiny-llama", "--batches", "2", "--context", "20", "--rounds", "2",
                            "--steps", "1"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"batch +2: split +([0-9.]+) ms +fused +([0-9.]+) ms +split / fused ([0-9.]+)", out)
    assert m and all(float(x) > 0 for x in m.groups()), out
