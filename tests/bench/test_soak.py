"""The short abort soak (bench/soak.py, 400 requests, half cancelled at random points) against a
real loopback server: nothing leaks, every completed output equals its offline reference."""
import json


def test_short_abort_soak(tmp_path):
    from bench import soak

    out = tmp_path / "soak.json"
    rc = soak.main(["--requests", "400", "--concurrency", "32", "--warmup", "40",
                    "--output-json", str(out)])
    res = json.loads(out.read_text())
    assert rc == 0, {k: res[k] for k in ("leaks", "mismatched_ids", "unfinished_normal",
                                         "rss_growth_mb")}
    assert res["requests"] == 400 and 150 <= res["cancelled"] <= 250
    assert set(res["cancel_modes"]) == set(soak.MODES)
    assert res["leaked_blocks"] == 0 and res["leaked_requests"] == 0
    assert res["mismatched_outputs"] == 0 and res["checked_outputs"] >= 200
    assert res["preemptions"] > 0  # the small cache preempts: aborts meet preempted requests too
    cancelled_codes = {k.split(":")[1] for k in res["outcomes"] if not k.startswith(("normal", "after"))}
    assert {"CANCELLED", "DEADLINE_EXCEEDED"} <= cancelled_codes
    assert all(k.endswith(":OK") for k in res["outcomes"] if k.startswith("normal"))
