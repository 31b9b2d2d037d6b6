"""Weight updates in place (vLLM's ``model.load_weights(iterable of (name, tensor))`` and
``reload_weights``, what RLHF loops call after each training step): new values written into the
runner's existing device arrays with the same shapes, dtypes and shardings, so the compiled step
programs run them as they are (weights are jit arguments: nothing compiles).

``load_weights(runner, weights)``: HF-named tensors (numpy, jax, torch CPU; any float dtype, cast to
the model's) mapped tensor by tensor as the HF loader maps them (checkpoints/hf_tensor_map.py), then
placed as ``build_model`` places them: q/k/v and gate/up fused in shard-major order for the
tensor-parallel size with the kv heads repeated (jaxllm/models/fusion.py), per layer or stacked as
the model holds them. A partial set changes only what it names: the other parts of a fused weight are
read back from the device. Everything is checked (names, shapes, dtypes) before anything changes;
each replaced device array is freed as its successor is placed (no second copy of the model).

Refused by name: MoE models, classifier heads built from LM-head rows, and quantized projections
(``--quantization`` or a prequantized checkpoint): re-quantizing on device would compile the
quantizer after warm-up; ``reload_weights(path)`` loads a quantized model whole instead.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import jax
import numpy as np

from checkpoints.hf_tensor_map import SKIPPED_PREFIXES, canonical_name, hf_tensor_map
from jaxllm.models.fusion import FUSED, FUSED_PARTS, placement_plan
from jaxllm.models.llama_params import param_shapes
from jaxllm.runner.sleep import check_like, delete_arrays, specs_of

_FLOAT_KINDS = ("float32", "float16", "bfloat16", "float64")


def to_numpy(name: str, value: Any) -> np.ndarray:
    """A numpy array of `value` (numpy, jax, torch CPU tensor; torch bf16 kept bit-exact)."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, jax.Array):
        return np.asarray(jax.device_get(value))
    mod = type(value).__module__
    if mod.startswith("torch"):
        import torch

        t = value.detach()
        if t.device.type != "cpu":
            raise ValueError(f"tensor {name}: is on device {t.device}; load_weights takes CPU tensors (.cpu())")
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    raise ValueError(f"tensor {name}: is a {type(value).__name__}; load_weights takes numpy arrays, jax arrays "
                     f"or torch CPU tensors")


def _leaf_key(path) -> tuple:
    """A state leaf's path as plain keys: ('embed',), ('layers', 'wqkv') or ('layers', 3, 'wqkv')."""
    keys = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            keys.append(k.key)
        elif isinstance(k, jax.tree_util.SequenceKey):
            keys.append(k.idx)
    return tuple(keys)


def _inverse_fn(fn, shapes):
    """For a fusing `fn(np, *parts)` (a permutation with repeats): per part, the flat positions in the
    fused array that hold each of its elements (read one back with `fused.ravel()[pos]`)."""
    sizes = [int(np.prod(s)) for s in shapes]
    offsets = np.cumsum([0] + sizes)
    ids = [np.arange(o, o + n, dtype=np.int64).reshape(s) for o, n, s in zip(offsets, sizes, shapes)]
    fused = np.asarray(fn(np, *ids)).ravel()
    pos = np.empty(offsets[-1], np.int64)
    pos[fused] = np.arange(fused.size, dtype=np.int64)
    return [pos[o:o + n].reshape(s) for o, n, s in zip(offsets[:-1], sizes, shapes)]


@dataclasses.dataclass
class _Held:
    """One held weight (a state leaf) and the checkpoint params it is made of."""
    index: int  # position among the state's leaves
    parts: tuple[str, ...]
    fn: Any  # fuse(np, *parts) or None
    stacked: bool  # a "layers.*" leaf holding every layer [L, ...]


class WeightUpdater:
    """A runner's HF name → held-leaf map, built once (from the checkpoint config and TP layout)."""

    def __init__(self, runner, checkpoint_config):
        c = checkpoint_config
        if c.is_moe:
            raise ValueError(f"load_weights is not supported for the {c.architecture} MoE model (its experts and "
                             f"router are not mapped); use reload_weights(path) with a checkpoint directory")
        self.config = c
        self.names = hf_tensor_map(c)
        self.shapes = {k: v[1:] if k.startswith("layers.") else v for k, v in param_shapes(c).items()}
        layout = getattr(runner, "layout", None)
        kv_repeat, tp = (layout.kv_repeat, layout.tp) if layout is not None else (1, 1)
        expert_tp = getattr(layout, "expert_tp", None)
        leaves = jax.tree_util.tree_leaves_with_path(runner.state)
        keys = {_leaf_key(p): i for i, (p, _) in enumerate(leaves)}
        self.quantized = {k[:-1] + (k[-1][:-len("_scale")],) for k in keys if str(k[-1]).endswith("_scale")}
        self.held: dict[tuple, _Held] = {}  # (held name, layer or None) -> _Held
        for held, parts, fn in placement_plan(param_shapes(c), kv_repeat, tp, expert_tp):
            short = held.split(".", 1)[1] if held.startswith("layers.") else held
            if ("layers", short) in keys:
                self.held[(held, None)] = _Held(keys[("layers", short)], parts, fn, True)
            elif (short,) in keys:
                self.held[(held, None)] = _Held(keys[(short,)], parts, fn, False)
            else:
                for i in range(c.num_layers):
                    self.held[(held, i)] = _Held(keys[("layers", i, short)], parts, fn, False)
        self._inverse: dict[str, list] = {}

    def _leaf(self, param: str, layer: int | None) -> tuple[tuple, _Held]:
        held = FUSED_PARTS.get(param, param)
        key = (held, layer) if (held, layer) in self.held else (held, None)
        return key, self.held[key]

    def _is_quantized(self, param: str) -> bool:
        held = FUSED_PARTS.get(param, param)
        short = held.split(".", 1)[1] if held.startswith("layers.") else held
        return any(k[-1] == short for k in self.quantized)

    def loadable(self) -> set[int]:
        """Indices of the state leaves ``load_weights`` writes (the others: buffers, scales)."""
        return {h.index for h in self.held.values()}

    def missing(self, names: set[str]) -> list[str]:
        """The checkpoint tensors a full load needs that ``names`` lacks (a tied lm_head is not needed:
        hf_tensor_map has no entry for it), in checkpoint order."""
        return [n for n in self.names if n not in names]

    def collect(self, weights: Iterable, dtype, seen: set[str] | None = None) -> dict[tuple, dict]:
        """Checked updates: {leaf key: {(part, layer): one layer's slice in the checkpoint layout}}.
        ValueError naming the tensor for an unknown name, a wrong shape or a non-float dtype. The
        canonical names applied are added to ``seen``."""
        updates: dict[tuple, dict] = {}
        for item in weights:
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
                raise ValueError(f"weights: every item must be a (name, tensor) pair, got {type(item).__name__}")
            raw_name, value = item
            name = canonical_name(raw_name)
            if name.startswith(SKIPPED_PREFIXES) or (name == "lm_head.weight" and self.config.tie_word_embeddings):
                continue  # what the loader skips: a vision tower; a tied model's lm_head is its embedding
            entry = self.names.get(name)
            if entry is None:
                raise ValueError(f"tensor {raw_name}: unknown to this {self.config.architecture} model (expected HF "
                                 f"names such as model.layers.0.self_attn.q_proj.weight; {len(self.names)} in all)")
            arr = to_numpy(raw_name, value)
            if tuple(arr.shape) != entry.hf_shape:
                raise ValueError(f"tensor {raw_name}: shape {tuple(arr.shape)} does not match the model's "
                                 f"{entry.hf_shape}")
            if np.dtype(arr.dtype).name not in _FLOAT_KINDS:
                raise ValueError(f"tensor {raw_name}: dtype {arr.dtype} is invalid: must be a float dtype "
                                 f"({', '.join(_FLOAT_KINDS)})")
            if seen is not None:
                seen.add(name)
            for t in entry.targets:
                if self._is_quantized(t.param):
                    raise ValueError(f"tensor {raw_name}: the model holds {t.param} quantized; load_weights writes "
                                     f"unquantized weights only (use reload_weights(path) for a quantized model)")
                key, _ = self._leaf(t.param, t.layer)
                updates.setdefault(key, {})[(t.param, t.layer)] = np.asarray(t.convert(arr), dtype=dtype)
        return updates

    def _parts_of(self, host_slice: np.ndarray, h: _Held, held: str) -> list[np.ndarray]:
        if held not in self._inverse:
            self._inverse[held] = _inverse_fn(h.fn, [self.shapes[p] for p in h.parts])
        flat = host_slice.ravel()
        return [flat[pos] for pos in self._inverse[held]]

    def apply(self, runner, updates: dict[tuple, dict]) -> int:
        """Write `updates` into the runner's state; returns the number of leaves replaced."""
        leaves, treedef = jax.tree.flatten(runner.state)
        for (held, layer), parts in updates.items():
            h = self.held[(held, layer)]
            leaf = leaves[h.index]
            layers = sorted({lay for _, lay in parts}, key=lambda x: -1 if x is None else x)
            whole = h.fn is None or all((p, lay) in parts for p in h.parts for lay in layers)
            if h.stacked:
                whole = whole and len(layers) == self.config.num_layers
            host = np.array(jax.device_get(leaf)) if not whole else np.empty(leaf.shape, leaf.dtype)
            for lay in layers:
                cur = host[lay] if h.stacked else host
                if h.fn is None:
                    new = parts[(h.parts[0], lay)]
                else:
                    have = None if all((p, lay) in parts for p in h.parts) else self._parts_of(cur, h, held)
                    new = h.fn(np, *[parts.get((p, lay)) if (p, lay) in parts else have[j]
                                     for j, p in enumerate(h.parts)])
                if h.stacked:
                    host[lay] = new
                else:
                    host = np.asarray(new, dtype=leaf.dtype)
            leaves[h.index] = jax.device_put(np.asarray(host, dtype=leaf.dtype), leaf.sharding)
            leaf.delete()  # one copy of the model on the device at any time
        runner.state = jax.tree.unflatten(treedef, leaves)
        return len(updates)


def updater(runner) -> WeightUpdater:
    """The runner's WeightUpdater, built on first use (ValueError for a model load_weights refuses)."""
    up = getattr(runner, "_weight_updater", None)
    if up is None:
        up = runner._weight_updater = WeightUpdater(runner, runner.checkpoint_config)
    return up


def load_weights(runner, weights: Iterable) -> int:
    """The runner's weights updated from `weights` ((HF name, tensor) pairs); returns the number of
    tensors applied. Nothing changes when any tensor is refused (ValueError naming it). While the
    weights are discarded (a level-2 sleep's wake-up: zeros) only a full set is taken, and it clears
    the mark; a partial one is refused naming what it lacks."""
    if runner.state is None:
        raise RuntimeError("load_weights: the weights are asleep; wake_up(tags=['weights']) first")
    up = updater(runner)
    seen: set[str] = set()
    updates = up.collect(weights, runner.state_dtype, seen)
    sleep = runner._sleep
    if sleep.discarded:
        missing = up.missing(seen)
        if missing:
            shown = ", ".join(missing[:4]) + (f", ... ({len(missing) - 4} more)" if len(missing) > 4 else "")
            raise ValueError(f"weights: {len(missing)} of the model's {len(up.names)} tensors missing ({shown}); the "
                             f"weights were discarded by sleep(level=2), so load_weights must write every one of "
                             f"them (or call reload_weights(path)); nothing was changed")
    up.apply(runner, updates)
    sleep.discarded = False
    return sum(len(v) for v in updates.values())


def reload_from(runner, path: str | None) -> None:
    """The runner's weights replaced by the checkpoint at `path` (None: the one the engine was built
    from), loaded and built as at start (quantized as configured), placed with the same shardings."""
    if runner.state is None:
        raise RuntimeError("reload_weights: the weights are asleep; wake_up(tags=['weights']) first")
    if runner.reload_weights is None:
        raise RuntimeError("reload_weights: this runner has no checkpoint source (only engines built by "
                           "build_engine reload a checkpoint)")
    state = runner.reload_weights(**({"model": path} if path else {}))
    specs = specs_of(runner.state)
    check_like(state, specs, f"reload_weights({path!r})" if path else "reload_weights()")
    state = jax.device_put(state, jax.tree.map(lambda s: s.sharding, specs))
    delete_arrays(runner.state)
    runner.state = state
    runner._sleep.discarded = False
