"""A vLLM user's `vllm serve` launch line works with `python -m serving` (serving/vllm_flags.py,
serving/http_args.py): vLLM's flags parse into the same settings, the meaningless ones are named in
one INFO line, the ones needing a capability jaxllm lacks stop the start with one `error:` line and
exit 2; serving/README.md's table names every flag of the table."""
from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys

import pytest

from jaxllm.cli_args import engine_config_from_args, human_int
from serving import __main__ as server_main
from serving.http_args import http_fields_from_args
from serving.vllm_flags import IGNORED, OK, REFUSED, TABLE, check_compat, compat_verdicts

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# what a vLLM user pastes (vllm serve MODEL ...), with our --http-port added
LAUNCH = ["fake:max_num_seqs=4", "--http-port", "0", "--enable-chunked-prefill", "--trust-remote-code",
          "--enforce-eager", "--uvicorn-log-level", "WARNING", "--root-path", "/api", "--allowed-origins",
          '["https://ui.example"]', "--allow-credentials", "--enable-prompt-tokens-details",
          "--enable-force-include-usage", "--response-role", "bot", "--return-tokens-as-token-ids",
          "--disable-fastapi-docs", "--disable-uvicorn-access-log", "--swap-space", "8", "-tp", "1", "-pp", "1",
          "--max-model-len", "32K", "--max-num-batched-tokens", "4k", "--dtype", "half", "-q", "int8",
          "--gpu-memory-utilization", "0.85", "--disable-log-requests", "--max-log-len", "100", "--seed", "7",
          "--cudagraph-capture-sizes", "1", "2", "4", "--compilation-config", '{"level": 3}',
          "--no-enable-prefix-caching", "--distributed-executor-backend", "mp", "--served-model-name", "my-model",
          "--default-chat-template-kwargs", '{"enable_thinking": false}', "--ssl-certfile", "c.pem",
          "--ssl-keyfile", "k.pem"]


def test_vllm_launch_line_parses_into_our_settings():
    args = server_main.parse_args(LAUNCH)
    cfg = server_main.server_config(args)
    eng = engine_config_from_args(args)
    assert args.model == "fake:max_num_seqs=4"  # the positional MODEL is --model
    assert (cfg.root_path, cfg.allowed_origins, cfg.allowed_methods, cfg.allow_credentials) == (
        "/api", ("https://ui.example",), ("*",), True)
    assert (cfg.uvicorn_log_level, cfg.fastapi_docs, cfg.response_role, cfg.served_model_name) == (
        "warning", False, "bot", "my-model")
    assert cfg.enable_prompt_tokens_details and cfg.enable_force_include_usage and cfg.return_tokens_as_token_ids
    assert (cfg.enable_log_requests, cfg.max_log_len) == (False, 100)
    assert cfg.default_chat_template_kwargs == {"enable_thinking": False}
    assert (cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca) == ("c.pem", "k.pem", None)  # vLLM's --ssl-* names
    assert (eng.max_model_len, eng.max_num_batched_tokens, eng.dtype, eng.quantization) == (
        32768, 4000, "float16", "int8")
    assert (eng.tensor_parallel_size, eng.enable_prefix_caching, eng.seed, eng.gpu_memory_utilization) == (
        1, False, 7, 0.85)
    # the INFO line names exactly the meaningless ones; honoured values (-pp 1, --enable-chunked-prefill,
    # --disable-uvicorn-access-log: what jaxllm does anyway) are not in it
    ignored = check_compat(args)
    assert [e.split(" ", 1)[0] for e in ignored] == [
        "--trust-remote-code", "--enforce-eager", "--distributed-executor-backend=mp", "--swap-space=8.0",
        "--cudagraph-capture-sizes=1", "--compilation-config={\"level\":"], ignored
    assert "(a preempted request is recomputed, never swapped to host memory)" in ignored[3]


def test_defaults_are_vllms_where_it_has_them():
    cfg = server_main.server_config(server_main.parse_args([]))
    assert (cfg.allowed_origins, cfg.allowed_methods, cfg.allowed_headers, cfg.allow_credentials) == (
        ("*",), ("*",), ("*",), False)
    assert (cfg.root_path, cfg.fastapi_docs, cfg.response_role, cfg.enable_log_requests) == ("", True, "assistant",
                                                                                             False)
    assert not (cfg.enable_prompt_tokens_details or cfg.enable_force_include_usage or cfg.return_tokens_as_token_ids)
    assert check_compat(server_main.parse_args([])) == []


@pytest.mark.parametrize("argv,needle", [
    (["-pp", "2"], "--pipeline-parallel-size=2 is not supported by jaxllm: no pipeline parallelism"),
    (["--data-parallel-size", "4"], "--data-parallel-size=4 is not supported by jaxllm: no data parallelism"),
    (["--cpu-offload-gb", "8"], "--cpu-offload-gb=8.0 is not supported by jaxllm: weights stay on the device"),
    (["--kv-transfer-config", '{"kv_connector": "X"}'], "--kv-transfer-config={\"kv_connector\": \"X\"} is not "
                                                          "supported by jaxllm: no KV connectors"),
    # vLLM V1 refuses these too ("Concurrent Partial Prefill is not supported"), then dropped them
    (["--max-num-partial-prefills", "2"], "--max-num-partial-prefills=2 is not supported by jaxllm: no concurrent "
                                          "partial prefill (vLLM V1 refuses it too)"),
    (["--max-long-partial-prefills", "2"], "--max-long-partial-prefills=2 is not supported by jaxllm"),
    (["--runner", "pooling"], "--runner=pooling is not supported by jaxllm: the runner follows --task"),
    (["--ssl-cert-reqs", "2"], "--ssl-cert-reqs=2 is invalid without --ssl-ca-certs"),
])
def test_refused_flags_are_one_line_and_exit_2(argv, needle, capsys):
    assert server_main.main(["fake:", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err


def test_several_served_names_and_keys_and_vllms_env_key(monkeypatch):
    """vLLM's --served-model-name A B C (answers report A, requests may name any) and --api-key K1 K2
    (any passes); without --api-key the key is $JAXLLM_API_KEY, else vLLM's $VLLM_API_KEY."""
    for env in ("JAXLLM_API_KEY", "VLLM_API_KEY"):
        monkeypatch.delenv(env, raising=False)
    cfg = server_main.server_config(server_main.parse_args(["--served-model-name", "a", "b", "c", "--api-key",
                                                            "k1", "k2"]))
    assert (cfg.served_model_name, cfg.served_model_aliases, cfg.api_key) == ("a", ("b", "c"), ("k1", "k2"))
    assert cfg.model_names("m") == ("a", "b", "c")
    cfg = server_main.server_config(server_main.parse_args([]))
    assert (cfg.served_model_name, cfg.served_model_aliases, cfg.api_key, cfg.model_names("m")) == (
        None, (), None, ("m",))
    monkeypatch.setenv("VLLM_API_KEY", "from-vllm")
    assert server_main.server_config(server_main.parse_args([])).api_key == ("from-vllm",)
    assert server_main.server_config(server_main.parse_args(["--api-key", "flag"])).api_key == ("flag",)
    monkeypatch.setenv("JAXLLM_API_KEY", "ours")
    assert server_main.server_config(server_main.parse_args([])).api_key == ("ours",)
    with pytest.raises(ValueError, match=r"served_model_name=\['a', 'a'\] is invalid: names must be non-empty and "
                                         r"distinct"):
        server_main.server_config(server_main.parse_args(["--served-model-name", "a", "a"]))
    lora = ["--enable-lora", "--lora-modules", "b=/tmp/x", "--served-model-name", "a", "b"]
    with pytest.raises(ValueError, match="lora_modules name 'b' is invalid: it is a --served-model-name"):
        server_main.server_config(server_main.parse_args(lora))


def test_tokenizer_info_and_load_tracking_are_our_flags_now():
    names = {f.name for f in TABLE}
    assert not {"--enable-tokenizer-info-endpoint", "--enable-server-load-tracking"} & names
    cfg = server_main.server_config(server_main.parse_args(["--enable-tokenizer-info-endpoint",
                                                            "--enable-server-load-tracking"]))
    assert cfg.enable_tokenizer_info_endpoint and cfg.enable_server_load_tracking
    cfg = server_main.server_config(server_main.parse_args(["--no-enable-server-load-tracking"]))
    assert not (cfg.enable_tokenizer_info_endpoint or cfg.enable_server_load_tracking)


def test_refusal_as_a_process_has_no_traceback():
    out = subprocess.run([sys.executable, "-m", "serving", "fake:", "--pipeline-parallel-size", "2"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == "", out
    assert out.stderr.strip().splitlines() == ["error: --pipeline-parallel-size=2 is not supported by jaxllm: no "
                                               "pipeline parallelism: shard over devices with --tensor-parallel-size"]


@pytest.mark.parametrize("argv,verdict", [
    (["-pp", "1"], OK), (["--data-parallel-size", "1"], OK), (["--cpu-offload-gb", "0"], OK),
    (["--api-server-count", "1"], OK), (["--api-server-count", "2"], REFUSED), (["--no-enforce-eager"], OK),
    (["--no-enable-chunked-prefill"], IGNORED), (["--enable-chunked-prefill"], OK), (["--logprobs-mode",
                                                                                      "processed_logits"], REFUSED),
    (["--tokenizer-mode", "auto"], OK), (["--device", "cuda"], IGNORED), (["--preemption-mode", "swap"], REFUSED),
])
def test_value_dependent_verdicts(argv, verdict):
    ignored, refused = compat_verdicts(server_main.parse_args(argv))
    got = REFUSED if refused else IGNORED if ignored else OK
    assert got == verdict, (argv, ignored, refused)


def test_ssl_ca_certs_maps_to_mutual_tls_only_when_required():
    fields, ignored = http_fields_from_args(server_main.parse_args(["--ssl-ca-certs", "ca.pem"]))
    assert fields["tls_client_ca"] is None and ignored == [
        "--ssl-ca-certs=ca.pem (no client certificate is asked for without --ssl-cert-reqs 2)"]
    fields, ignored = http_fields_from_args(server_main.parse_args(["--ssl-ca-certs", "ca.pem", "--ssl-cert-reqs", "2"]))
    assert fields["tls_client_ca"] == "ca.pem" and ignored == []


def test_positional_model_and_model_flag():
    assert server_main.parse_args(["m1"]).model == "m1"
    assert server_main.parse_args(["m1", "--model", "m1"]).model == "m1"
    assert server_main.parse_args(["--model", "m2"]).model == "m2"
    with pytest.raises(SystemExit) as e:
        server_main.parse_args(["m1", "--model=m2"])
    assert e.value.code == 2


def test_human_readable_ints():
    """vLLM's forms: k/m/g/t decimal, K/M/G/T binary, decimals only where the product is whole."""
    cases = {"32k": 32_000, "32K": 32 * 1024, "25.6k": 25_600, "1.1k": 1_100, "4G": 4 * 2 ** 30, "4g": 4 * 10 ** 9,
             "2048": 2048, "1.5K": 1536}
    assert {t: human_int(t) for t in cases} == cases
    for bad in ("1.5", "12x", "k", "1.0001k", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="is invalid: need an integer"):
            human_int(bad)


def test_every_table_flag_parses_and_is_in_the_readme():
    """Each flag of the table takes a value of its kind (or --x / --no-x), and serving/README.md's
    "vLLM's serve flags" section names it (the table there is what users read)."""
    with open(os.path.join(ROOT, "serving", "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme[readme.index("### vLLM's serve flags: where we stand"):]
    section = section[:section.index("\n## ")]
    named = set(re.findall(r"`(--?[a-z0-9][a-z0-9-]*)", section))
    missing = []
    for flag in TABLE:
        value = {int: "1", float: "1"}.get(flag.type, "x")
        argv = [flag.name] if flag.kind == "bool" else [flag.name, value]
        args = server_main.parse_args(argv)
        assert hasattr(args, flag.dest), flag.name
        if flag.name not in named:
            missing.append(flag.name)
    assert not missing, f"serving/README.md does not list: {missing}"


def test_ignored_flags_are_one_info_line(caplog, monkeypatch):
    """The start-up line (main logs it before the engine is built); the server itself is not started
    here: serve() is replaced by a stub that returns 0."""
    async def no_serve(cfg, factory):
        return 0

    monkeypatch.setattr(server_main, "serve", no_serve)
    monkeypatch.setattr(server_main.os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    monkeypatch.setattr(logging, "shutdown", lambda: None)  # main's would close pytest's log handlers
    with caplog.at_level(logging.INFO, logger="serving"), pytest.raises(SystemExit) as e:
        server_main.main(["fake:", "--enforce-eager", "--swap-space", "4", "--log-level", "info", "--port", "8000",
                          "--root-path", "/api", "--disable-fastapi-docs"])
    assert e.value.code == 0
    lines = [r.getMessage() for r in caplog.records if "vLLM flags ignored" in r.getMessage()]
    assert lines == ["serving: vLLM flags ignored: --enforce-eager (no eager mode: XLA compiles every bucket at "
                     "start (a compile after warm-up is a bug)); --swap-space=4.0 (a preempted request is "
                     "recomputed, never swapped to host memory)"]
    # a vLLM line's --port is its HTTP port: HTTP-only flags without --http-port are called out
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == ["serving: --root-path, --disable-fastapi-docs set the OpenAI HTTP API, which is off: give "
                      "--http-port (--port 8000 is gRPC's; vLLM's --port is its HTTP port)"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="serving"), pytest.raises(SystemExit):
        server_main.main(["fake:", "--log-level", "info"])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or "ignored" in r.getMessage()]


def test_log_config_file(tmp_path, capsys, monkeypatch):
    import json

    async def no_serve(cfg, factory):
        return 0

    monkeypatch.setattr(server_main, "serve", no_serve)
    monkeypatch.setattr(server_main.os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    monkeypatch.setattr(logging, "shutdown", lambda: None)  # main's would close pytest's log handlers
    name = "jaxllm.test_log_config_file"
    path = tmp_path / "log.json"
    # incremental: levels only (a full dictConfig would close pytest's own log handlers too)
    path.write_text(json.dumps({"version": 1, "incremental": True, "loggers": {name: {"level": "ERROR"}}}))
    with pytest.raises(SystemExit):
        server_main.main(["fake:", "--log-config-file", str(path)])
    assert logging.getLogger(name).level == logging.ERROR
    path.write_text("[1, 2]")  # not a dictConfig
    assert server_main.main(["fake:", "--log-config-file", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --log-config-file={path} is invalid: ") and err.count("\n") == 1, err
