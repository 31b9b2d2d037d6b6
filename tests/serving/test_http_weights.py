"""Weight reloads over HTTP: vLLM's ``POST /collective_rpc`` with ``method: reload_weights`` (and
``kwargs.weights_path``), behind the API key and --enable-sleep-mode, over the real host engine and a
fake runner that records the reloads it is asked for and refuses a path that is not a directory (as
the checkpoint loader does). The device side (weights written, outputs, compiles) is
tests/engine/test_weight_update.py."""

from __future__ import annotations

import os

import grpc
import httpx
import pytest

from http_helpers import ThreadedServer
from jaxllm.engine.engine import LLMEngine
from test_http_sleep import AUTH, BODY, KEY, SleepyRunner, _grpc_code
from test_http_sleep import make_engine as sleep_engine


class ReloadingRunner(SleepyRunner):
    """Also the real runner's level-2 contract: waking the weights leaves them discarded (no step may
    run) until a reload."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.reloads: list[str | None] = []
        self.level = 0
        self.weights_discarded = False

    def sleep(self, level: int) -> int:
        self.level = level
        return super().sleep(level)

    def wake_up(self, tags) -> None:
        if "weights" in tags and "weights" in self.asleep and self.level == 2:
            self.weights_discarded = True
        super().wake_up(tags)

    def dispatch(self, out):
        if self.weights_discarded and out.seqs:
            raise AssertionError("a step ran on discarded weights")
        return super().dispatch(out)

    def load_weights(self, weights) -> int:
        return len(list(weights))

    def reload_weights_from(self, path):
        if self.asleep & {"weights"}:
            raise AssertionError("a reload ran while the weights sleep")
        if path is not None and not os.path.isdir(path):
            raise ValueError(f"{path}: no such file or directory")
        self.reloads.append(path)
        self.weights_discarded = False


def make_engine(enable_sleep_mode: bool = True) -> LLMEngine:
    return sleep_engine(enable_sleep_mode, runner_cls=ReloadingRunner)


@pytest.fixture(scope="module")
def srv():
    s = ThreadedServer(make_engine(), api_key=KEY)
    yield s
    s.close()


def rpc(h, body, **kw):
    return h.post("/collective_rpc", json=body, headers=AUTH, **kw)


def test_reload_from_a_path_and_from_the_original(srv, tmp_path):
    runner = srv.engine.runner
    with httpx.Client(base_url=srv.base_url, timeout=30) as h:
        assert h.post("/collective_rpc", json={"method": "reload_weights"}).status_code == 401  # the key
        r = rpc(h, {"method": "reload_weights", "kwargs": {"weights_path": str(tmp_path)}})
        assert (r.status_code, r.json()) == (200, {"results": [None]}), r.text
        r = rpc(h, {"method": "reload_weights"})
        assert r.status_code == 200, r.text
        assert runner.reloads[-2:] == [str(tmp_path), None]
        assert h.post("/v1/completions", json=BODY, headers=AUTH).status_code == 200


def test_bad_bodies_name_their_field_and_change_nothing(srv):
    runner = srv.engine.runner
    done = len(runner.reloads)
    cases = [({"kwargs": {}}, "method", "method: missing"),
             ({"method": "load_weights"}, "method", "tensors cannot travel as JSON strings"),
             ({"method": "execute_model"}, "method", "method='execute_model' is invalid"),
             ({"method": "reload_weights", "kwargs": {"weights_dir": "/x"}}, "kwargs.weights_dir", "weights_path only"),
             ({"method": "reload_weights", "args": ["/x"]}, "args", "pass kwargs.weights_path"),
             ({"method": "reload_weights", "kwargs": {"weights_path": 3}}, "kwargs.weights_path", "must be a checkpoint"),
             ({"method": "reload_weights", "timeout": -1}, "timeout", "timeout=-1 is invalid"),
             ({"method": "reload_weights", "kwargs": {"weights_path": "/nonexistent/ckpt"}}, "kwargs.weights_path",
              "/nonexistent/ckpt: no such file or directory")]
    with httpx.Client(base_url=srv.base_url, timeout=30) as h:
        for body, param, needle in cases:
            r = rpc(h, body)
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == param and needle in err["message"], (body, r.text)
        r = h.post("/collective_rpc", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "body", r.text
        assert h.post("/v1/completions", json=BODY, headers=AUTH).status_code == 200  # the engine serves on
    assert len(runner.reloads) == done


def test_a_reload_waits_for_running_requests_or_says_why(srv):
    body = {**BODY, "max_tokens": 4000, "ignore_eos": True, "stream": True}  # 3 ms steps: runs for seconds
    runner = srv.engine.runner
    done = len(runner.reloads)
    with httpx.Client(base_url=srv.base_url, headers=AUTH, timeout=30) as h:
        srv.wait_idle()
        with h.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()  # kept: a dropped iterator closes the stream (a disconnect aborts it)
            next(line for line in lines if line)
            refused = rpc(h, {"method": "reload_weights", "timeout": 0.2})
        assert refused.status_code == 503 and "1 request(s) unfinished" in refused.json()["error"]["message"]
        assert len(runner.reloads) == done
        short = {**BODY, "max_tokens": 60, "ignore_eos": True, "stream": True}
        with h.stream("POST", "/v1/completions", json=short) as r:
            lines = r.iter_lines()
            next(line for line in lines if line)
            ok = rpc(h, {"method": "reload_weights"})  # waits for the 60 tokens, then runs
            assert ok.status_code == 200, ok.text
            assert "[DONE]" in "\n".join(lines)  # the request ran to its end first
        assert len(runner.reloads) == done + 1


def test_asleep_weights_refuse_and_the_flag_gates_the_route(srv):
    with httpx.Client(base_url=srv.base_url, headers=AUTH, timeout=30) as h:
        assert h.post("/sleep", params={"level": 2}).status_code == 200
        r = rpc(h, {"method": "reload_weights"})
        assert r.status_code == 503 and "wake_up(tags=['weights'])" in r.json()["error"]["message"], r.text
        assert h.post("/wake_up", params={"tags": "weights"}).status_code == 200
        assert rpc(h, {"method": "reload_weights"}).status_code == 200  # vLLM's order: weights, reload, kv
        assert h.post("/wake_up").status_code == 200
    s = ThreadedServer(make_engine(enable_sleep_mode=False))
    try:
        with httpx.Client(base_url=s.base_url, timeout=30) as h:
            r = h.post("/collective_rpc", json={"method": "reload_weights"})
            assert r.status_code == 404 and "--enable-sleep-mode" in r.json()["error"]["message"], r.text
    finally:
        s.close()


def test_after_level_2_requests_get_503_until_a_reload(srv, tmp_path):
    runner = srv.engine.runner
    with httpx.Client(base_url=srv.base_url, headers=AUTH, timeout=30) as h:
        assert h.post("/sleep", params={"level": 2}).status_code == 200
        assert h.post("/wake_up").status_code == 200
        assert h.get("/is_sleeping").json() == {"is_sleeping": False}  # every tag awake (vLLM's)
        r = h.post("/v1/completions", json=BODY)
        assert r.status_code == 503 and "discarded by sleep(level=2)" in r.json()["error"]["message"], r.text
        code, details = srv.call(_grpc_code(srv.server.port))
        assert code == grpc.StatusCode.UNAVAILABLE and "reload_weights(path)" in details
        assert h.get("/health").json() == {"status": "SERVING"}  # alive; no probe runs on discarded weights
        s = srv.wait_idle()
        assert s.num_free_blocks == s.num_blocks  # the refusals held no block
        assert rpc(h, {"method": "reload_weights", "kwargs": {"weights_path": str(tmp_path)}}).status_code == 200
        assert runner.reloads[-1] == str(tmp_path) and not runner.weights_discarded
        assert h.post("/v1/completions", json=BODY).status_code == 200
