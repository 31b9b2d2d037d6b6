"""An HF checkpoint's `quantization_config` → what jaxllm can load of it (an `Fp8Scheme`, or for AWQ /
GPTQ an `hf_int4.Int4Scheme`), or one line saying why not.

Loaded (weight-only, float8_e4m3fn weights with their scales, checkpoints/hf_fp8.py):
- quant_method "compressed-tensors" (llm-compressor): every `config_groups` entry's `weights` are
  `type: float, num_bits: 8` with strategy "tensor" (one scale), "channel" (one per output row) or
  "block" (`block_structure` [out, in]), stored "float-quantized". The "FP8" (static per-tensor input
  scale) and "FP8_DYNAMIC" (per-token) schemes also quantize activations to fp8: jaxllm runs those
  checkpoints weight-only (the activations stay in the model dtype; `input_scale` is not read),
  which it says in one log line.
- quant_method "fp8" (AutoFP8, HF FineGrainedFP8): per-tensor `weight_scale`, or block-wise
  `weight_scale_inv` [out/bo, in/bi] with `weight_block_size` [bo, bi] (DeepSeek-style [128, 128]);
  `activation_scheme` static or dynamic, run weight-only likewise.
- NVIDIA ModelOpt (quant_method "modelopt", or an `hf_quant_config.json` beside config.json as
  older exports write it: {"producer", "quantization": {"quant_algo", "kv_cache_quant_algo",
  "exclude_modules"}}, read by checkpoints/hf.py when config.json has no quantization_config), the
  float8 algos vLLM loads: "FP8" (per-tensor `weight_scale`, static per-tensor `input_scale`, run
  weight-only), "FP8_PER_CHANNEL_PER_TOKEN" (`weight_scale` [out], dynamic per-token activations,
  run weight-only) and "FP8_PB_WO" (weight-only, [128, 128] blocks: `weight_scale`
  [out/128, 1, in/128, 1]); KV scales with kv_cache_quant_algo "FP8" (or a float-8
  kv_cache_scheme). NVFP4, W4A16_NVFP4, MXFP8, W4A8_AWQ, INT4_AWQ, MIXED_PRECISION ... are refused.

Which tensors are quantized is read from the tensors (a float8 `weight` beside its scale), not from
`ignore` / `ignored_layers`: those list the layers left in full precision, which load as such.
AWQ and GPTQ (quant_method "awq" / "gptq", 4-bit) and compressed-tensors "pack-quantized" int4
(W4A16) are parsed by checkpoints/hf_int4.py.
Refused, naming the field, its value and what is supported: other quant methods (bitsandbytes, ...), int or non-8-bit weights, group strategies, packed formats, quantized output
activations, sparsity.
"""
from __future__ import annotations

import dataclasses

from checkpoints.errors import CheckpointError

SUPPORTED = ("'compressed-tensors' (float8 weights: per-tensor, per-channel or block scales) and 'fp8' "
             "(per-tensor or block scales), 'modelopt' (quant_algo FP8, FP8_PER_CHANNEL_PER_TOKEN or FP8_PB_WO), "
             "and 'awq' / 'gptq' (4-bit)")
_STRATEGIES = ("tensor", "channel", "block")
# ModelOpt quant_algo (upper-cased, as vLLM reads it) -> (block, activation quantization not run)
_MODELOPT = {"FP8": (None, "static fp8 per-tensor"), "FP8_PER_CHANNEL_PER_TOKEN": (None, "dynamic fp8 per-token"),
             "FP8_PB_WO": ((128, 128), None)}


@dataclasses.dataclass(frozen=True)
class Fp8Scheme:
    method: str  # "compressed-tensors" | "fp8" | "modelopt"
    block: tuple[int, int] | None  # [out, in] block of a block-scaled weight, None otherwise
    activations: str | None  # the activation quantization the checkpoint asks for and jaxllm does not run
    kv_cache: bool  # the config declares fp8 KV cache scales (kv_cache_scheme)


def _refuse(source: str, field: str, value, what: str = SUPPORTED,
            prefix: str = "quantization_config.") -> CheckpointError:
    return CheckpointError(f"{source}: {prefix}{field}={value!r} is not supported; jaxllm loads {what}")


def _block(source: str, field: str, value) -> tuple[int, int]:
    if isinstance(value, str) and "x" in value:  # older compressed-tensors wrote "128x128"
        value = value.split("x")
    try:
        bo, bi = (int(v) for v in value)
    except (TypeError, ValueError):
        raise _refuse(source, field, value, "a block [out, in] of two positive integers") from None
    if bo <= 0 or bi <= 0:
        raise _refuse(source, field, value, "a block [out, in] of two positive integers")
    return bo, bi


def parse(qc, source: str) -> Fp8Scheme:
    """`qc`: config.json's quantization_config; `source` names the file in errors."""
    if not isinstance(qc, dict):
        raise _refuse(source, "", qc)
    method = qc.get("quant_method")
    if method == "fp8":
        return _parse_fp8(qc, source)
    if method == "compressed-tensors":
        return _parse_compressed_tensors(qc, source)
    if isinstance(method, str) and method.lower().startswith("modelopt"):  # "modelopt", "modelopt_fp4"
        return parse_modelopt(qc, source)
    if method in ("awq", "gptq"):  # int4 weights: checkpoints/hf_int4.py (an Int4Scheme, not an Fp8Scheme)
        from checkpoints.hf_int4 import parse as parse_int4

        return parse_int4(qc, source)
    raise _refuse(source, "quant_method", method, SUPPORTED + "; use the full-precision checkpoint "
                  "(with --quantization int8|fp8) or a GGUF")


def _parse_fp8(qc: dict, source: str) -> Fp8Scheme:
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise _refuse(source, "fmt", fmt, "'e4m3' (float8_e4m3fn) fp8 weights")
    act = qc.get("activation_scheme", "dynamic")
    if act not in ("static", "dynamic"):
        raise _refuse(source, "activation_scheme", act, "'static' or 'dynamic' (run weight-only)")
    bs = qc.get("weight_block_size")
    block = None if bs is None else _block(source, "weight_block_size", bs)
    return Fp8Scheme("fp8", block, f"{act} fp8", kv_cache=False)


def _parse_compressed_tensors(qc: dict, source: str) -> Fp8Scheme:
    fmt = qc.get("format")
    if fmt == "pack-quantized":  # int4 weights packed in int32 (W4A16): checkpoints/hf_int4.py
        from checkpoints.hf_int4 import parse_compressed

        return parse_compressed(qc, source)
    if fmt not in (None, "float-quantized"):
        raise _refuse(source, "format", fmt, "format 'float-quantized' (float8 weights)")
    sparsity = qc.get("sparsity_config")
    if sparsity and (sparsity.get("format") not in (None, "dense") if isinstance(sparsity, dict) else True):
        raise _refuse(source, "sparsity_config.format", sparsity.get("format") if isinstance(sparsity, dict)
                      else sparsity, "dense weights (no sparsity compression)")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise _refuse(source, "config_groups", groups, "at least one group of float8 weights")
    block, acts = None, set()
    for gname, g in groups.items():
        f = f"config_groups.{gname}"
        if not isinstance(g, dict):
            raise _refuse(source, f, g, "a group with 'weights'")
        if g.get("format") not in (None, "float-quantized"):
            raise _refuse(source, f"{f}.format", g.get("format"), "format 'float-quantized' (float8 weights)")
        w = g.get("weights")
        if not isinstance(w, dict):
            raise _refuse(source, f"{f}.weights", w, "float8 weight quantization")
        if w.get("type") != "float" or w.get("num_bits") != 8:
            raise _refuse(source, f"{f}.weights.type/num_bits", f"{w.get('type')}{w.get('num_bits')}",
                          "float8 weights (type 'float', num_bits 8) in this format; int4 loads from format "
                          "'pack-quantized', int8 (W8A8 int) does not")
        if w.get("symmetric", True) is not True:
            raise _refuse(source, f"{f}.weights.symmetric", w.get("symmetric"), "symmetric float8 weights")
        if w.get("dynamic", False):
            raise _refuse(source, f"{f}.weights.dynamic", w.get("dynamic"), "weights quantized ahead (dynamic false)")
        strategy = w.get("strategy")
        if strategy not in _STRATEGIES:
            raise _refuse(source, f"{f}.weights.strategy", strategy, f"strategies {', '.join(_STRATEGIES)}")
        if strategy == "block":
            b = _block(source, f"{f}.weights.block_structure", w.get("block_structure"))
            if block not in (None, b):
                raise _refuse(source, f"{f}.weights.block_structure", list(b), f"one block size (also {list(block)})")
            block = b
        if g.get("output_activations"):
            raise _refuse(source, f"{f}.output_activations", g["output_activations"],
                          "weight quantization (output activations unquantized)")
        a = g.get("input_activations")
        if a:
            if not isinstance(a, dict) or a.get("type") != "float" or a.get("num_bits") != 8:
                raise _refuse(source, f"{f}.input_activations",
                              a if not isinstance(a, dict) else f"{a.get('type')}{a.get('num_bits')}",
                              "float8 or no input activation quantization (run weight-only)")
            acts.add(f"{'dynamic' if a.get('dynamic') else 'static'} fp8 per-{a.get('strategy', 'tensor')}")
    kv = qc.get("kv_cache_scheme")
    if kv and not (isinstance(kv, dict) and kv.get("type") == "float" and kv.get("num_bits") == 8):
        raise _refuse(source, "kv_cache_scheme", kv, "fp8 KV cache scales (type 'float', num_bits 8) or none")
    return Fp8Scheme("compressed-tensors", block, ", ".join(sorted(acts)) or None, kv_cache=bool(kv))


def parse_modelopt(qc: dict, source: str, prefix: str = "quantization_config.") -> Fp8Scheme:
    """A ModelOpt config: config.json's quantization_config {"quant_method": "modelopt", "quant_algo",
    "kv_cache_scheme", "ignore"} or hf_quant_config.json {"quantization": {"quant_algo",
    "kv_cache_quant_algo", "exclude_modules"}} (`prefix` "" names its fields). The ignore lists are
    not read: the tensors say what is quantized, as for the other methods."""
    inner = qc.get("quantization", qc) if isinstance(qc, dict) else qc
    if not isinstance(inner, dict):
        raise _refuse(source, "quantization", inner, "a ModelOpt 'quantization' object with its quant_algo", prefix)
    at = "quantization." if inner is not qc else ""
    algo = inner.get("quant_algo")
    key = str(algo).upper() if algo is not None else None
    if key not in _MODELOPT:
        raise _refuse(source, f"{at}quant_algo", algo, "ModelOpt's float8 weights (quant_algo FP8, "
                      "FP8_PER_CHANNEL_PER_TOKEN or FP8_PB_WO); NVFP4, MXFP8, W4A8/INT4 AWQ and mixed "
                      "precision are not", prefix)
    if at:  # hf_quant_config.json: a string
        kv_algo = inner.get("kv_cache_quant_algo")
        kv_field = "quantization.kv_cache_quant_algo"
    else:  # config.json: a compressed-tensors style scheme, or the string as in the file
        kv = inner.get("kv_cache_scheme")
        kv_algo, kv_field = inner.get("kv_cache_quant_algo"), "kv_cache_quant_algo"
        if kv:
            kv_field = "kv_cache_scheme"
            ok = isinstance(kv, dict) and kv.get("type") == "float" and kv.get("num_bits") == 8
            kv_algo = "FP8" if ok else kv
    if kv_algo is not None and str(kv_algo).upper() != "FP8":
        raise _refuse(source, kv_field, kv_algo, "fp8 KV cache scales (FP8) or none", prefix)
    block, acts = _MODELOPT[key]
    return Fp8Scheme("modelopt", block, acts, kv_cache=kv_algo is not None)
