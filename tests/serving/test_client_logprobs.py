"""python -m serving.client --logprobs K / --prompt-logprobs K prints logprob tables built from the
gRPC messages (which carry no rank: exact inside the top-K, ">K" outside)."""
from __future__ import annotations

import re
import subprocess
import sys

from grpc_health.v1 import health_pb2

from serving.client import logprob_rows
from serving.proto.jaxllm.v1 import generation_pb2 as pb
from test_serving_process import ROOT, ServerProcess


def _top(*pairs):
    return [pb.TopLogprob(token_id=t, logprob=lp) for t, lp in pairs]


def test_rows_from_the_proto_rank_inside_and_outside_the_top_k():
    inside = pb.TokenLogprobs(token_id=7, logprob=-0.9, top_logprobs=_top((3, -0.2), (7, -0.9)))
    outside = pb.TokenLogprobs(token_id=5, logprob=-4.0, top_logprobs=_top((3, -0.2), (8, -0.7), (5, -4.0)))
    rows = logprob_rows([7, 5], [inside, outside], 2, text=lambda t: f"<{t}>")
    assert rows[0].rank == 2 and rows[0].logprob == -0.9 and rows[0].text == "<7>"
    assert [a.token_id for a in rows[0].top] == [3, 7]
    assert rows[1].rank == ">2" and [a.token_id for a in rows[1].top] == [3, 8]  # itself is not a top-2
    prompt = [pb.PromptTokenLogprobs(present=False), pb.PromptTokenLogprobs(present=True, logprobs=_top((9, -1.5)))]
    rows = logprob_rows([4, 9], prompt, 1, text=str)
    assert rows[0].logprob is None and rows[0].rank is None and rows[1].rank == 1


def test_client_cli_prints_the_tables():
    srv = ServerProcess("--model", "fake")
    try:
        srv.wait_status(health_pb2.HealthCheckResponse.SERVING)
        out = subprocess.run([sys.executable, "-m", "serving.client", "--target", srv.target, "--max-tokens", "3",
                              "--temperature", "0", "--logprobs", "2", "--prompt-logprobs", "1", "abc"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    finally:
        srv.close()
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "abc"
    gen = lines[lines.index("logprobs of the generated tokens:") + 2:]
    plp = lines[lines.index("prompt logprobs (position 0 has none):") + 2:][:3]
    # the fake engine echoes the prompt; its logprob of token t is -0.5 - 0.01 * (t % 7), then t+1, t+2
    # at 1 and 2 less; the prompt tokens after the first get -1.0
    for pos, ch in enumerate("abc"):
        t = ord(ch)
        lp = -0.5 - 0.01 * (t % 7)
        want = (rf"^\s+{pos}\s+'{ch}' \({t}\)\s+{lp:.4f}\s+1\s+#1 '{ch}' {lp:.4f}\s+"
                rf"#2 '{chr(t + 1)}' {lp - 1:.4f}$")
        assert re.match(want, gen[pos]), (want, gen[pos])
    assert re.match(r"^\s+0\s+'a' \(97\)\s+-\s+-$", plp[0]), plp
    assert re.match(r"^\s+1\s+'b' \(98\)\s+-1\.0000\s+1\s+#1 'b' -1\.0000$", plp[1]), plp
