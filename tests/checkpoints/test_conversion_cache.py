"""The converted-GGUF cache: a hit skips the GGUF parse and returns exactly what a conversion does;
a changed file, a damaged entry or `off` fall back to converting."""
import os

import numpy as np
import pytest

from checkpoints import conversion_cache, gguf_loader
from checkpoints.gguf_loader import load_gguf
from jaxllm.models.quant import QuantWeight
from tests.checkpoints.gguf_tiny import write_gguf_from_hf
from tests.models.hf_tiny import make_tiny_hf


@pytest.fixture(params=[("Q4_1", "keep"), ("Q4_0", "fp32"), ("Q8_0", "keep")])
def gguf_file(request, tmp_path, monkeypatch):
    """Kept 4-bit (int4 q with uint4 + offsets for Q4_1), dequantized to fp32, and kept int8."""
    qtype, mode = request.param
    monkeypatch.setenv("JAXLLM_GGUF_Q4", mode)
    hf_dir = make_tiny_hf("llama", str(tmp_path))
    path = write_gguf_from_hf(hf_dir, str(tmp_path / f"tiny-{qtype}.gguf"), qtype)
    monkeypatch.setenv("JAXLLM_GGUF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(conversion_cache, "MIN_BYTES", 0)  # the tiny file counts as large
    return path


def _parses(monkeypatch):
    """Counts GGUF parses from here on."""
    calls = []
    real = gguf_loader.open_gguf
    monkeypatch.setattr(gguf_loader, "open_gguf", lambda p: calls.append(p) or real(p))
    return calls


def _same(a, b):
    (ca, pa), (cb, pb) = a, b
    assert ca == cb
    assert pa.keys() == pb.keys()
    for k in pa:
        a, b = pa[k], pb[k]
        if isinstance(a, QuantWeight):  # the same q (dtype included), scales and offsets, exactly
            assert isinstance(b, QuantWeight) and (a.offset is None) == (b.offset is None)
            for x, y in [(a.q, b.q), (a.scale, b.scale)] + ([(a.offset, b.offset)] if a.offset is not None else []):
                assert x.dtype == y.dtype and x.shape == y.shape
                np.testing.assert_array_equal(np.asarray(x).astype(np.float32), np.asarray(y).astype(np.float32))
            continue
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    return sum(isinstance(v, QuantWeight) for v in pa.values())


def test_hit_skips_the_parse_and_equals_the_conversion(gguf_file, monkeypatch):
    first = load_gguf(gguf_file)  # converts and writes the entry
    entry = conversion_cache.entry_dir(gguf_file)
    assert os.path.isfile(os.path.join(entry, "params.safetensors"))
    calls = _parses(monkeypatch)
    second = load_gguf(gguf_file)
    assert calls == []
    kept = _same(first, second)
    assert (kept == 0) == (os.environ["JAXLLM_GGUF_Q4"] == "fp32")  # kept projections come back as QuantWeights
    monkeypatch.setenv("JAXLLM_GGUF_CACHE", "off")  # the uncached conversion, for reference
    _same(load_gguf(gguf_file), second)
    assert calls == [gguf_file]


def test_changed_file_or_converter_misses_and_replaces_the_entry(gguf_file, tmp_path, monkeypatch):
    load_gguf(gguf_file)
    st = os.stat(gguf_file)
    os.utime(gguf_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    calls = _parses(monkeypatch)
    load_gguf(gguf_file)
    assert calls == [gguf_file]
    load_gguf(gguf_file)
    assert calls == [gguf_file]  # the entry was rewritten for the new identity
    monkeypatch.setattr(conversion_cache, "_converter_key", lambda: "edited loader")
    load_gguf(gguf_file)
    assert calls == [gguf_file] * 2
    assert len(os.listdir(tmp_path / "cache")) == 1  # one entry per path: nothing piles up


def test_damaged_entry_is_converted_again(gguf_file, monkeypatch):
    want = load_gguf(gguf_file)
    params = os.path.join(conversion_cache.entry_dir(gguf_file), "params.safetensors")
    with open(params, "r+b") as f:
        f.truncate(os.path.getsize(params) // 2)
    calls = _parses(monkeypatch)
    _same(load_gguf(gguf_file), want)
    assert calls == [gguf_file]
    assert os.path.getsize(params) > 0 and load_gguf(gguf_file) and calls == [gguf_file]  # rewritten


def test_off_and_small_files_write_nothing(gguf_file, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLLM_GGUF_CACHE", "off")
    load_gguf(gguf_file)
    monkeypatch.setenv("JAXLLM_GGUF_CACHE", str(tmp_path / "cache2"))
    monkeypatch.setattr(conversion_cache, "MIN_BYTES", os.path.getsize(gguf_file) + 1)
    load_gguf(gguf_file)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "cache2").exists()
