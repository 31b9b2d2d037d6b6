"""bench/common.py helpers (no jax)."""
import math

import pytest

from bench.common import format_table, parse_range, percentile, summarize, synthetic_requests


def test_parse_range():
    assert parse_range("128") == (128, 128)
    assert parse_range("64..512") == (64, 512)
    assert parse_range("4:8") == (4, 8)
    with pytest.raises(ValueError):
        parse_range("9..3")


def test_synthetic_requests_seeded_and_in_range():
    a = synthetic_requests(20, (5, 9), (2, 4), vocab_size=1000, seed=3)
    b = synthetic_requests(20, (5, 9), (2, 4), vocab_size=1000, seed=3)
    c = synthetic_requests(20, (5, 9), (2, 4), vocab_size=1000, seed=4)
    assert [r.prompt_token_ids for r in a] == [r.prompt_token_ids for r in b]
    assert [r.prompt_token_ids for r in a] != [r.prompt_token_ids for r in c]
    for r in a:
        assert 5 <= r.prompt_len <= 9 and 2 <= r.output_len <= 4
        assert all(100 <= t < 1000 for t in r.prompt_token_ids)


def test_percentiles_match_numpy_linear():
    xs = [5, 1, 4, 2, 3]
    assert percentile(xs, 50) == 3
    assert percentile(xs, 90) == pytest.approx(4.6)
    s = summarize(xs)
    assert s["mean"] == 3 and s["n"] == 5
    assert math.isnan(summarize([])["p99"])


def test_format_table_aligns():
    out = format_table([{"a": "x", "b": 1.2345}, {"a": "yy", "b": None}], [("a", "A", ""), ("b", "B", ".2f")])
    lines = out.splitlines()
    assert lines[0].split() == ["A", "B"] and lines[2].split() == ["x", "1.23"] and lines[3].split() == ["yy", "-"]
