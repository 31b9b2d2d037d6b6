"""Cache of converted GGUF checkpoints: the stacked params (safetensors: dequantized ones in fp32,
kept-quantized projections as their q / scale / offset arrays in their own dtypes, 4-bit q stored
one value a byte) and the config the metadata implies (JSON), so a restart skips the pure-Python GGUF parse and the
dequantization (SmolLM2-135M Q4_1: 5.9 s of a ~16 s warm start; a cache hit reads 0.5 GB instead).

One entry per GGUF path (so a changed file or loader replaces its entry instead of adding
another 4 bytes per parameter); the entry records the file's identity (size, mtime), the gguf
package's version and the converter's source, and any difference is a miss, so an edited loader
never serves stale weights. ``JAXLLM_GGUF_CACHE``: the directory (default ``~/.cache/jaxllm/gguf``)
or ``off``. Files under ``MIN_BYTES`` are not cached: they parse fast, and tests write many. A
damaged entry is a miss; a read-only or full disk only costs the conversion next time.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import shutil

import numpy as np

MIN_BYTES = 64 << 20
_CONVERTER_SOURCES = ("gguf_loader.py", "gguf_quant.py", "assemble.py", "conversion_cache.py")


def cache_root() -> str | None:
    root = os.environ.get("JAXLLM_GGUF_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxllm", "gguf"))
    return None if root.strip().lower() in ("off", "0", "") else root


@functools.lru_cache(maxsize=1)
def _converter_key() -> str:
    h = hashlib.sha256(importlib.metadata.version("gguf").encode())
    here = os.path.dirname(os.path.abspath(__file__))
    for name in _CONVERTER_SOURCES:
        with open(os.path.join(here, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def entry_dir(path: str) -> str | None:
    """The cache entry for this GGUF path, or None when caching is off or the file is small."""
    root = cache_root()
    if root is None or os.stat(path).st_size < MIN_BYTES:
        return None
    return os.path.join(root, hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:24])


def identity(path: str) -> str:
    """What an entry must match: the file's size and mtime, the converter, and the resolved
    JAXLLM_GGUF_Q4 mode (an entry written with Q4 dequantized to fp32 must not stand in for a 4-bit load)."""
    from checkpoints.gguf_quant import q4_mode

    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}:{_converter_key()}:q4={q4_mode()}"


def load(path: str) -> tuple[dict, dict] | None:
    """(HF-style config dict, {param name: fp32 array or QuantWeight of numpy arrays}) from the
    cache, or None on a miss."""
    entry = entry_dir(path)
    if entry is None or not os.path.isfile(os.path.join(entry, "params.safetensors")):
        return None
    from safetensors.numpy import load_file

    try:
        with open(os.path.join(entry, "config.json")) as f:
            meta = json.load(f)
        if meta.get("identity") != identity(path):
            return None  # the file or the converter changed: save() replaces the entry
        return meta["config"], _unflatten(load_file(os.path.join(entry, "params.safetensors")),
                                          meta.get("quant", {}))
    except Exception:  # truncated or foreign files: convert again (save() replaces the entry)
        return None


def _flatten(params: dict) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Arrays safetensors can store, and {param name: q's dtype} for the QuantWeights among them
    (`name::q` / `name::scale` / `name::offset`; int4 / uint4 q as int8 / uint8 of the same values)."""
    from jaxllm.models.quant import QuantWeight

    flat, quant = {}, {}
    for k, v in params.items():
        if not isinstance(v, QuantWeight):
            flat[k] = np.ascontiguousarray(v, dtype=np.float32)
            continue
        q = np.asarray(v.q)
        quant[k] = q.dtype.name
        wide = {"int4": np.int8, "uint4": np.uint8}.get(q.dtype.name)
        flat[f"{k}::q"] = np.ascontiguousarray(q if wide is None else q.astype(wide))
        flat[f"{k}::scale"] = np.ascontiguousarray(v.scale)
        if v.offset is not None:
            flat[f"{k}::offset"] = np.ascontiguousarray(v.offset)
    return flat, quant


def _unflatten(flat: dict[str, np.ndarray], quant: dict[str, str]) -> dict:
    import ml_dtypes

    from jaxllm.models.quant import QuantWeight

    params = {k: v for k, v in flat.items() if "::" not in k}
    for k, dtype in quant.items():
        q = flat[f"{k}::q"]
        if dtype in ("int4", "uint4"):
            q = q.astype(getattr(ml_dtypes, dtype))
        params[k] = QuantWeight(q, flat[f"{k}::scale"], flat.get(f"{k}::offset"))
    return params


def save(path: str, hf: dict, params: dict) -> None:
    entry = entry_dir(path)
    if entry is None:
        return
    from safetensors.numpy import save_file

    tmp, old = f"{entry}.tmp{os.getpid()}", f"{entry}.old{os.getpid()}"
    try:
        os.makedirs(tmp, exist_ok=True)
        flat, quant = _flatten(params)
        save_file(flat, os.path.join(tmp, "params.safetensors"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({"identity": identity(path), "config": hf, "quant": quant}, f)
        if os.path.isdir(entry):
            os.replace(entry, old)  # the stale or damaged entry, removed below
        os.replace(tmp, entry)  # atomic: readers see a whole entry or none
    except OSError:
        pass  # read-only or full disk, or another process won the race
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
