"""python -m jaxllm.generate --logprobs / --prompt-logprobs on a tiny random HF llama: the printed
tables agree with transformers' log_softmax, and the --output JSONL keeps {"token_id": logprob}."""
from __future__ import annotations

import json
import re

import numpy as np

from jaxllm.generate import main
from tests.models.hf_tiny import hf_logits, make_tiny_hf

ROW = re.compile(r"^\s+(\d+)\s+.*?\((\d+)\)\s+(-?\d+\.\d+|-)\s+(\S+)(.*)$")


def tables(stdout: str) -> dict[str, list[tuple]]:
    """{title: [(pos, token id, logprob | None, rank, [alternative logprobs])]} from the CLI output."""
    out, rows = {}, None
    for line in stdout.splitlines():
        if line.endswith(":") and "logprobs" in line:
            rows = out.setdefault(line, [])
        elif rows is not None and (m := ROW.match(line)):
            pos, tid, lp, rank, rest = m.groups()
            alts = [float(x) for x in re.findall(r" (-?\d+\.\d{4})(?=\s|$)", rest)]
            rows.append((int(pos), int(tid), None if lp == "-" else float(lp), rank, alts))
        elif not line.startswith("  "):
            rows = None
    return out


def test_logprobs_tables_and_jsonl(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JAXLLM_COMPILE_CACHE", str(tmp_path / "xla"))
    model = make_tiny_hf("llama", str(tmp_path / "hf"))
    prompt = np.random.default_rng(3).integers(3, 256, 12).tolist()
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt_token_ids": prompt}) + "\n")
    rc = main(["--model", model, "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
               "--max-tokens", "4", "--temperature", "0", "--ignore-eos", "--logprobs", "3",
               "--prompt-logprobs", "2", "--no-progress", "--max-model-len", "64", "--max-num-seqs", "2",
               "--max-num-batched-tokens", "32", "--block-size", "8", "--kv-cache-memory-bytes", str(1 << 20)])
    assert rc == 0
    t = tables(capsys.readouterr().out)
    gen = t["logprobs of the generated tokens:"]
    plp = t["prompt logprobs (position 0 has none):"]
    line = json.loads((tmp_path / "out.jsonl").read_text())
    c = line["outputs"][0]
    # the JSONL is unchanged: plain {"token_id": logprob} per generated token
    assert len(c["logprobs"]) == 4 and all(isinstance(v, float) for e in c["logprobs"] for v in e.values())
    ids = c["token_ids"]
    ref = hf_logits(model, [prompt + ids])[0]
    ref = ref - ref.max(-1, keepdims=True)
    ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))  # [len, V] log_softmax
    assert [r[:2] for r in gen] == list(enumerate(ids))
    for (pos, tid, lp, rank, alts), entry in zip(gen, c["logprobs"]):
        row = ref[len(prompt) - 1 + pos]
        assert abs(lp - row[tid]) < 2e-4 and abs(lp - entry[str(tid)]) < 1e-4
        assert rank == "1"  # greedy
        np.testing.assert_allclose(alts, np.sort(row)[::-1][:3], atol=2e-4)  # the top-3, best first
    assert [r[:2] for r in plp] == list(enumerate(prompt))
    assert plp[0][2] is None and plp[0][3] == "-"  # nothing predicts the first prompt token
    for pos, tid, lp, rank, alts in plp[1:]:
        row = ref[pos - 1]
        assert abs(lp - row[tid]) < 2e-4
        assert 1 + (row > row[tid] + 1e-4).sum() <= int(rank) <= 1 + (row > row[tid] - 1e-4).sum()
        np.testing.assert_allclose(alts, np.sort(row)[::-1][:2], atol=2e-4)
    assert max(int(r[3]) for r in plp[1:]) > 2  # random prompt tokens: ranks beyond the top-2
