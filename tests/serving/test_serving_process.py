"""``python -m serving`` as a real process (fake engine via ``--model fake:...``): SIGTERM drain,
shutdown timeout, engine death exit code, and the ``python -m serving.client`` CLI."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.client import build_request
from serving.proto.jaxllm.v1 import generation_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]


def listening_port(proc: subprocess.Popen, timeout: float, log_lines: list[str]) -> int:
    """The port of the stdout line `serving: listening grpc=HOST:PORT`, the only stdout line."""
    deadline = time.monotonic() + timeout
    line = proc.stdout.readline()
    assert line, f"server exited early (code {proc.wait()}): {''.join(log_lines)}"
    assert time.monotonic() < deadline
    assert line.startswith("serving: listening grpc=127.0.0.1:"), line
    return int(line.rsplit(":", 1)[1])


class ServerProcess:
    def __init__(self, *args: str):
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serving", "--port", "0", "--health-probe-interval", "0.2",
             "--watchdog-timeout", "2", *args],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []  # stderr (logs)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = listening_port(self.proc, 20, self.lines)
        self.target = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.target)
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    def status(self):
        try:
            return self.health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
        except grpc.RpcError:
            return None

    def wait_status(self, status, timeout=10.0):
        deadline = time.monotonic() + timeout
        while self.status() != status:
            assert time.monotonic() < deadline, "".join(self.lines[-20:])
            time.sleep(0.02)

    def close(self):
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def spawn():
    procs = []

    def make(*args):
        p = ServerProcess(*args)
        procs.append(p)
        return p
    yield make
    for p in procs:
        p.close()


def _stream(stub, started: threading.Event, **kw):
    """Run one Generate; return ('ok', finish) or (code, details)."""
    try:
        last = None
        for r in stub.Generate(build_request(**kw), timeout=20):
            started.set()
            last = r
        return "ok", last.outputs[-1].finish_reason if last.outputs else None
    except grpc.RpcError as e:
        started.set()
        return e.code(), e.details()


def test_sigterm_drains_in_flight_refuses_new_exits_0(spawn):
    srv = spawn("--model", "fake:step_delay=0.02", "--shutdown-timeout", "10")
    srv.wait_status(health_pb2.HealthCheckResponse.SERVING)
    # the CLI client while we are at it
    out = subprocess.run([sys.executable, "-m", "serving.client", "--target", srv.target,
                          "--max-tokens", "9", "--temperature", "0", "Say hello"],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Say hello"
    bad = subprocess.run([sys.executable, "-m", "serving.client", "--target", srv.target,
                          "--top-p", "7", "x"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and "INVALID_ARGUMENT: top_p=7.0" in bad.stderr

    with cf.ThreadPoolExecutor(4) as pool:
        started = [threading.Event() for _ in range(4)]
        futs = [pool.submit(_stream, srv.stub, started[i], prompt=f"in flight {i}", max_tokens=40)
                for i in range(4)]
        for ev in started:
            assert ev.wait(10)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        srv.wait_status(health_pb2.HealthCheckResponse.NOT_SERVING, 5)
        with pytest.raises(grpc.RpcError) as ei:
            list(srv.stub.Generate(build_request("late", max_tokens=2), timeout=5))
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in ei.value.details()
        results = [f.result(timeout=20) for f in futs]
    assert all(r[0] == "ok" and r[1] == 2 for r in results), results  # 2 = LENGTH
    assert srv.proc.wait(timeout=15) == 0
    assert time.monotonic() - t0 < 10


def test_sigterm_aborts_after_shutdown_timeout(spawn):
    srv = spawn("--model", "fake:step_delay=0.02", "--shutdown-timeout", "0.5")
    srv.wait_status(health_pb2.HealthCheckResponse.SERVING)
    started = threading.Event()
    with cf.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(_stream, srv.stub, started, prompt="too long", max_tokens=250)
        assert started.wait(10)
        srv.proc.send_signal(signal.SIGTERM)
        code, details = fut.result(timeout=20)
    assert code == grpc.StatusCode.UNAVAILABLE and "--shutdown-timeout=0.5s" in details
    assert srv.proc.wait(timeout=15) == 0


def test_engine_death_internal_and_nonzero_exit(spawn):
    srv = spawn("--model", "fake:step_delay=0.01,fail_at_step=40")
    srv.wait_status(health_pb2.HealthCheckResponse.SERVING)
    started = threading.Event()
    code, details = _stream(srv.stub, started, prompt="doomed", max_tokens=250)
    assert code == grpc.StatusCode.INTERNAL and "injected fault" in details
    assert srv.proc.wait(timeout=15) == 1
    assert any("engine loop died" in line for line in srv.lines)


def test_bad_flags_exit_2():
    out = subprocess.run([sys.executable, "-m", "serving", "--model", "fake", "--tls-cert", "x.pem"],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "tls_cert/tls_key" in out.stderr


def test_serving_imports_no_jax():
    code = ("import sys, serving.server, serving.client, serving.__main__, "
            "serving.frontdoor, serving.openai_api, serving.openai_generate, "
            "jaxllm.engine.async_engine; "
            "bad = [m for m in sys.modules if m == 'jax' or m.startswith('jax.')]; "
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr


def _one_error_line(out: subprocess.CompletedProcess) -> str:
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert "Traceback" not in out.stderr
    return lines[0]


def _serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving", "--port", "0", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=env)


def test_bad_model_is_one_line_exit_2():
    out = _serve("--model", "nosuchmodel")
    assert out.returncode == 2 and out.stdout == ""  # nothing was bound
    line = _one_error_line(out)
    assert "nosuchmodel: no such file or directory" in line


def test_bad_tls_files_are_one_line_exit_2(tmp_path):
    missing = _serve("--model", "fake", "--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "k.pem"))
    assert missing.returncode == 2 and f"--tls-cert {tmp_path / 'c.pem'}: no such file" in _one_error_line(missing)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    bad = _serve("--model", "fake", "--tls-cert", str(junk), "--tls-key", str(junk))
    assert bad.returncode == 2 and "need a PEM certificate chain and its private key" in _one_error_line(bad)


def test_bad_flag_value_is_one_line_exit_2():
    out = _serve("--model", "fake", "--max-n", "many")
    assert out.returncode == 2 and "argument --max-n: invalid int value: 'many'" in _one_error_line(out)
    out = _serve("--model", "fake", "--max-n", "0")
    assert out.returncode == 2 and "max_n=0 is invalid" in _one_error_line(out)
    out = _serve("--dtype", "float64")
    assert out.returncode == 2 and "--dtype: invalid choice: 'float64'" in _one_error_line(out)


def test_port_in_use_is_one_line_exit_1():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "serving", "--model", "fake", "--port", str(port)],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stdout == ""
    line = _one_error_line(out)
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in line and "in use" in line


def test_bad_checkpoint_fails_start_with_one_line_exit_1(tmp_path):
    """The weights are read on the engine thread after the port opened: still one line, exit 1."""
    bad = tmp_path / "text.gguf"
    bad.write_text("hello, I am not a model\n" * 100)
    out = _serve("--model", str(bad), env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 1
    assert out.stdout.startswith("serving: listening grpc=127.0.0.1:"), out.stdout
    line = _one_error_line(out)
    assert line.startswith("error: engine failed to start: CheckpointError:") and "corrupt or truncated" in line


def test_client_cli_reads_api_key_env_and_prints_usage_on_its_own_line(spawn):
    srv = spawn("--model", "fake:step_delay=0.01", "--api-key", "s3cret")
    srv.wait_status(health_pb2.HealthCheckResponse.SERVING)
    cmd = [sys.executable, "-m", "serving.client", "--target", srv.target, "--max-tokens", "5",
           "--temperature", "0", "--show-usage", "Bonjour"]
    env = {k: v for k, v in os.environ.items() if k != "JAXLLM_API_KEY"}
    refused = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=30, env=env)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=30,
                         env={**env, "JAXLLM_API_KEY": "s3cret"})
    assert out.returncode == 0, out.stderr
    text, usage = out.stdout.splitlines()
    assert text == "Bonjo"  # the fake engine echoes the prompt, 5 tokens
    assert usage.startswith("finish_reason={0: 'length'} usage: prompt=7 completion=5 cached="), usage
