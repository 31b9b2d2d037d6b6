"""Bad checkpoints give one-line CheckpointErrors that name the file and the problem."""
import json
import os
import shutil

import pytest

from checkpoints import CheckpointError, load_checkpoint
from checkpoints.loader import packaged_model_path
from tests.models.hf_tiny import make_tiny_hf


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_hf("llama", str(tmp_path_factory.mktemp("err")))


def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def assert_one_line(err: Exception, *needles: str):
    msg = str(err)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(tmp_path / "nope"))
    assert_one_line(e.value, str(tmp_path / "nope"), "no such file")


def test_unsupported_architecture(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path / "gpt")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["model_type"] = "gpt_neox"
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d)
    assert_one_line(e.value, "config.json", "gpt_neox", "unsupported architecture")


def test_truncated_safetensors(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path / "trunc")
    f = os.path.join(d, "model.safetensors")
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d)
    assert_one_line(e.value, "model.safetensors", "corrupt or truncated")


def test_garbage_safetensors(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path / "garbage")
    with open(os.path.join(d, "model.safetensors"), "wb") as fh:
        fh.write(b"\x00\x01not a safetensors file" * 10)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d)
    assert_one_line(e.value, "model.safetensors", "corrupt or truncated")


def test_config_weight_shape_mismatch(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path / "mismatch")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["intermediate_size"] = 128  # the weights have 96
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d)
    assert_one_line(e.value, "mlp.gate_proj.weight", "(96, 64)", "(128, 64)")


def test_missing_tensor(hf_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = copy_dir(hf_dir, tmp_path / "missing")
    f = os.path.join(d, "model.safetensors")
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, f)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d)
    assert_one_line(e.value, "model.layers.1.mlp.up_proj.weight", "missing")


def test_truncated_gguf(tmp_path):
    src = packaged_model_path("smollm2-135m")
    dst = tmp_path / "cut.gguf"
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fo.write(fi.read(os.path.getsize(src) // 3))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(dst))
    assert_one_line(e.value, "cut.gguf", "corrupt or truncated")


def test_not_a_gguf(tmp_path):
    dst = tmp_path / "text.gguf"
    dst.write_text("hello, I am not a model\n" * 100)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(dst))
    assert_one_line(e.value, "text.gguf", "corrupt or truncated")


def test_bad_load_format():
    with pytest.raises(CheckpointError) as e:
        load_checkpoint("smollm2-135m", load_format="pickle")
    assert_one_line(e.value, "load_format='pickle'", "gguf")


def test_cli_reports_one_line_error(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "jaxllm.generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 2
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no such file" in lines[0], r.stderr
