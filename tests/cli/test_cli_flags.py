"""One flag vocabulary across `python -m jaxllm.generate`, `python -m serving`,
`python -m serving.run_batch` and `python -m serving.client`: every flag has a sentence, a visible default and its choices; the
renamed flags and their old spellings; one-line argparse errors; quiet JAX loggers."""
from __future__ import annotations

import argparse
import logging
import re

import pytest

from jaxllm import generate
from jaxllm.cli_args import configure_logging, sampling_fields_from_args, sampling_params_from_args
from serving import __main__ as server_main
from serving import client, run_batch, vllm_flags

PARSERS = {"generate": generate.build_parser, "serving": server_main.build_parser, "client": client.build_parser,
           "run_batch": run_batch.build_parser}


def _actions(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_flag_has_help_default_and_choices(name):
    parser = PARSERS[name]()
    formatter = parser._get_formatter()
    text = parser.format_help()
    visible_dests = {a.dest for a in _actions(parser) if a.help != argparse.SUPPRESS}
    for action in _actions(parser):
        flag = "/".join(action.option_strings) or action.dest
        if action.help == argparse.SUPPRESS:  # only old spellings of a shown flag, and vLLM's compat table, hide
            assert action.dest in visible_dests or action.dest.startswith(vllm_flags._DEST), \
                f"{name} {flag}: hidden and not an alias"
            continue
        assert action.help and len(action.help.split()) >= 3, f"{name} {flag}: no sentence"
        shown = formatter._expand_help(action)
        assert "default" in shown.lower(), f"{name} {flag}: the help does not say its default: {shown!r}"
        if action.default not in (None, False, argparse.SUPPRESS) and "(default: " not in action.help:
            assert f"(default: {action.default})" in shown, (name, flag, shown)
        if action.choices:
            assert "{" + ",".join(map(str, action.choices)) + "}" in text, f"{name} {flag}: choices not listed"


def test_engine_flags_are_one_set():
    """The server takes exactly generate's engine flags, with the same defaults and choices."""
    def engine_flags(parser):
        group = next(g for g in parser._action_groups if g.title == "engine")
        return {a.dest: (a.option_strings, a.default, a.choices) for a in group._group_actions}
    gen, srv = engine_flags(generate.build_parser()), engine_flags(server_main.build_parser())
    assert gen == srv == engine_flags(run_batch.build_parser())
    assert gen["model"][1] == "smollm2-135m"  # the server no longer requires --model
    assert gen["dtype"][2] == ("auto", "float32", "bfloat16", "float16")
    assert gen["load_format"][2] == ("auto", "safetensors", "gguf", "dummy", "orbax")
    assert gen["kv_cache_dtype"][1:] == ("auto", ("auto", "fp8"))  # vLLM's --kv-cache-dtype
    args = generate.build_parser().parse_args(["--kv-cache-dtype", "fp8"])
    from jaxllm.cli_args import engine_config_from_args

    assert engine_config_from_args(args).kv_cache_dtype == "fp8"
    assert engine_config_from_args(args).calculate_kv_scales is True  # calibrated fp8 scales by default
    args = generate.build_parser().parse_args(["--kv-cache-dtype", "fp8", "--no-calculate-kv-scales"])
    assert engine_config_from_args(args).calculate_kv_scales is False  # vLLM's fixed 1.0
    assert engine_config_from_args(args).enable_expert_parallel is False
    args = server_main.build_parser().parse_args(["--tensor-parallel-size", "2", "--enable-expert-parallel"])
    assert engine_config_from_args(args).enable_expert_parallel is True  # vLLM's --enable-expert-parallel
    assert server_main.build_parser().parse_args([]).model == "smollm2-135m"


def test_sampling_flags_are_one_set():
    """The client's sampling flags are generate's (same names), unset = the server's default."""
    def sampling(parser):
        return {s for a in parser._actions if a.help != argparse.SUPPRESS and a.dest in
                {"sampling_seed", *client.SAMPLING_FIELDS} for s in a.option_strings}
    gen_flags = {s for s in sampling(generate.build_parser()) if s != "--seed"}  # --seed: engine seed
    assert gen_flags == sampling(client.build_parser())
    args = client.build_parser().parse_args(["x"])
    assert all(v is None for v in sampling_fields_from_args(args).values()), vars(args)


def test_seed_and_stop_token_ids_spellings():
    gen = generate.build_parser().parse_args(["--seed", "7", "--sampling-seed", "3", "--stop-token-ids", "1", "2",
                                              "--stop-token-ids", "5"])
    assert gen.seed == 7  # engine seed
    params = sampling_params_from_args(gen)
    assert params.seed == 3 and params.stop_token_ids == [1, 2, 5]
    cli = client.build_parser()
    a = cli.parse_args(["p", "--sampling-seed", "4", "--stop-token-ids", "1", "2", "--stop-token-ids", "3"])
    assert sampling_fields_from_args(a)["seed"] == 4 and a.stop_token_ids == [1, 2, 3]
    old = cli.parse_args(["--seed", "9", "--stop-token-id", "1", "--stop-token-id", "2", "p"])  # hidden aliases
    assert sampling_fields_from_args(old)["seed"] == 9 and old.stop_token_ids == [1, 2]
    assert "--stop-token-id " not in cli.format_help() and "  --seed" not in cli.format_help()


def test_client_api_key_default_names_env_without_showing_it(monkeypatch):
    monkeypatch.setenv("JAXLLM_API_KEY", "hunter2")
    for name in ("serving", "client"):
        assert "hunter2" not in PARSERS[name]().format_help()
    assert server_main.build_parser().parse_args([]).api_key == "hunter2"
    assert client._metadata(None) == (("authorization", "Bearer hunter2"),)
    assert client._metadata("") is None and client._metadata("k") == (("authorization", "Bearer k"),)
    monkeypatch.delenv("JAXLLM_API_KEY")
    assert client._metadata(None) is None


@pytest.mark.parametrize("name,argv,needle", [
    ("generate", ["--max-tokens", "x"], "argument --max-tokens: invalid int value: 'x'"),
    ("serving", ["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    ("client", ["--top-k", "1.5", "p"], "argument --top-k: invalid int value: '1.5'"),
])
def test_argparse_errors_are_one_line(name, argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        PARSERS[name]().parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and needle in err, err


def test_log_level_quiets_jax_unless_debug():
    saved = {n: logging.getLogger(n).level for n in ("", "jaxllm", "jax", "absl", "grpc")}
    try:
        configure_logging("info")
        assert logging.getLogger("serving").isEnabledFor(logging.INFO)
        for name in ("jax._src.xla_bridge", "jax._src.compilation_cache"):  # "Unable to initialize
            assert not logging.getLogger(name).isEnabledFor(logging.INFO)  # backend", "Resetting cache"
            assert logging.getLogger(name).isEnabledFor(logging.WARNING)
        configure_logging("debug")
        assert logging.getLogger("jax._src.xla_bridge").isEnabledFor(logging.DEBUG)
        configure_logging("warning")
        assert not logging.getLogger("jaxllm").isEnabledFor(logging.INFO)
    finally:
        for n, lvl in saved.items():
            logging.getLogger(n).setLevel(lvl)


def test_structured_output_flags(tmp_path, capsys):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    path = tmp_path / "schema.json"
    path.write_text(__import__("json").dumps(schema))
    gen = generate.build_parser()
    assert sampling_params_from_args(gen.parse_args(["--json-schema", str(path)])).structured_outputs.json == schema
    so = sampling_params_from_args(gen.parse_args(["--choice", "yes", "--choice", "no"])).structured_outputs
    assert so.choice == ["yes", "no"] and so.regex is None
    assert sampling_params_from_args(gen.parse_args([])).structured_outputs is None
    with pytest.raises(ValueError, match=r"structured_outputs \(regex='a\+', json_object=True\) is invalid"):
        sampling_params_from_args(gen.parse_args(["--regex", "a+", "--json-object"]))  # checked on construction
    # the client sends the same flags as the proto's oneof
    args = client.build_parser().parse_args(["p", "--regex", "[0-9]+"])
    req = client.build_request("p", **{k: v for k, v in sampling_fields_from_args(args).items()
                                       if k in client.SAMPLING_FIELDS})
    assert req.sampling.structured_outputs.regex == "[0-9]+"
    for argv, needle in [(["--json-schema", str(tmp_path / "missing.json")], "argument --json-schema: '"),
                         (["--grammar", str(tmp_path)], "argument --grammar: '")]:
        with pytest.raises(SystemExit):
            gen.parse_args(argv)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err and "is invalid: cannot read it" in err, err
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(SystemExit):
        gen.parse_args(["--json-schema", str(tmp_path / "bad.json")])
    assert "a JSON schema must be an object" in capsys.readouterr().err


def test_vllm_compat_flags_hide_from_help_and_list_with_their_own(capsys):
    """--help stays jaxllm's flags; --help-vllm-flags prints every compat-table flag with a sentence."""
    parser = server_main.build_parser()
    assert "--enforce-eager" not in parser.format_help() and "--help-vllm-flags" in parser.format_help()
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--help-vllm-flags"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for f in vllm_flags.TABLE:
        assert re.search(rf"^  {re.escape(f.name)}[ ,\n]", out, re.M), f.name
    assert "vLLM's default" in out
