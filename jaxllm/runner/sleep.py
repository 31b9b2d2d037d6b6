"""Sleep mode on the device side (vLLM's ``sleep(level)`` / ``wake_up(tags)``): free the runner's
device memory between rollouts and bring it back with the very shardings the compiled step programs
were built for, so nothing compiles after a wake-up.

Two tags, as vLLM's memory pools:

* ``"weights"``: the model's nnx state (every leaf: projections, norms, embeddings, quantized
  weights and their scales) and the LoRA adapter slots. Level 1 copies them to host numpy first
  (``jax.device_get``: a tensor-parallel array comes back whole) and wake-up puts them back
  (``jax.device_put`` with each leaf's recorded sharding). Level 2 keeps no host copy of the
  model's weights: wake-up maps the memory back (vLLM's), i.e. allocates zeros of the recorded
  shapes, dtypes and shardings (one jitted allocation, cached: nothing compiles after the first)
  WITHOUT reading the checkpoint, and marks the weights *discarded* (``RunnerSleep.discarded``)
  until a full ``load_weights`` or a ``reload_weights`` writes them (the RLHF loop's next step;
  runner/weight_update.py). Leaves that ``load_weights`` cannot write (none in the dense models
  today) keep a host copy at level 2 too, as vLLM keeps a model's buffers. The LoRA slots go to
  the host at both levels: the adapters they hold are the host LoRA manager's bookkeeping.
* ``"kv_cache"``: the K/V pages and the per-row penalty state (token counts, prompt masks, last
  tokens) and the last step's hidden states. Nothing is kept: wake-up allocates zeros of the same
  shapes, dtypes and shardings (one small jitted allocation per tree, cached for later wake-ups).
  An fp8 cache's scales ([L, kv heads] f32, calibrated at start) stay on the device.

Freeing means ``jax.Array.delete()`` on every leaf, not just dropping references: an array someone
else still holds (the built model object, a tied embedding seen twice) is freed all the same, and
``jax.live_arrays()`` no longer lists it. Whether the accelerator's memory then goes back to another
process is XLA's allocator's business (README "Sleep mode").
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

TAGS = ("weights", "kv_cache")


def device_bytes(tree) -> int:
    """Bytes of the live device arrays among ``tree``'s leaves (per array, as jax counts nbytes)."""
    return sum(x.nbytes for x in jax.tree.leaves(tree) if isinstance(x, jax.Array) and not x.is_deleted())


def delete_arrays(tree) -> None:
    """Free the device buffers of ``tree``'s live arrays (``jax.Array.delete``)."""
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array) and not x.is_deleted():
            x.delete()


def specs_of(tree):
    """``tree``'s leaves as ShapeDtypeStructs carrying their shardings."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


@dataclasses.dataclass
class Offloaded:
    """One tree taken off the device: its host copy (None: dropped) and its leaves' specs."""
    host: Any
    specs: Any

    def restore(self):
        shardings = jax.tree.map(lambda s: s.sharding, self.specs)
        return jax.device_put(self.host, shardings)


def offload(tree, keep: bool) -> Offloaded:
    """Copy ``tree`` to host numpy (``keep``) and free its device buffers."""
    specs = specs_of(tree)
    host = jax.device_get(tree) if keep else None
    delete_arrays(tree)
    return Offloaded(host, specs)


def _zeros_fn(specs) -> Callable[[], Any]:
    """A jitted allocation of zeros shaped, typed and sharded like ``specs``."""
    shardings = jax.tree.map(lambda s: s.sharding, specs)
    return jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), specs), out_shardings=shardings)


def check_like(state, specs, what: str) -> None:
    """ValueError unless ``state`` has ``specs``'s tree structure, shapes and dtypes (a reload must
    fit the compiled programs)."""
    got, want = jax.tree.structure(state), jax.tree.structure(specs)
    if got != want:
        raise ValueError(f"{what}: the reloaded weights' structure differs from the weights the engine was "
                         f"built with ({got.num_leaves} leaves vs {want.num_leaves})")
    for path_x, s in zip(jax.tree.leaves_with_path(state), jax.tree.leaves(specs)):
        path, x = path_x
        if x.shape != s.shape or x.dtype != s.dtype:
            raise ValueError(f"{what}: weight {jax.tree_util.keystr(path)} is {x.dtype}{list(x.shape)}, the "
                             f"compiled programs expect {s.dtype}{list(s.shape)}")


class RunnerSleep:
    """What a sleeping ModelRunner keeps; the runner's ``sleep`` / ``wake_up`` call these."""

    def __init__(self):
        self.level = 0
        self.asleep: set[str] = set()  # tags whose device memory is freed
        self.weights: Offloaded | None = None
        self.lora: Offloaded | None = None
        self.kv: Offloaded | None = None  # (pages k, pages v, counts, prompt_mask, last_tokens)
        self._kv_template = None  # the KVCache whose k/v were freed (its scales stay live)
        self._kv_zeros = None  # cached jitted allocation of the kv_cache tag's arrays
        self._weights_zeros = None  # cached jitted allocation of the discarded weight leaves (level 2)
        self._kept: dict[int, Any] = {}  # level 2: leaf index -> host copy of a leaf load_weights cannot write
        self.discarded = False  # the weights are zeros since a level-2 wake-up, until a full load

    def sleep(self, runner, level: int) -> int:
        """Free the runner's device memory at ``level`` (1 or 2); returns the bytes freed (their nbytes;
        0 when already asleep)."""
        if level not in (1, 2):
            raise ValueError(f"level={level!r} is invalid: must be 1 (weights to host RAM, KV cache "
                             f"discarded) or 2 (both discarded)")
        if self.asleep:
            return 0
        if runner._unsampled is not None:
            raise RuntimeError("sleep() with a step waiting for its bitmask (set_bitmask): let it finish first")
        kc = runner.kv_cache
        kv_tree = (kc.k, kc.v, runner.counts, runner.prompt_mask, runner.last_tokens)
        lora = runner.lora.weights if runner.lora is not None else None
        freed = device_bytes((runner.state, lora, kv_tree, getattr(runner, "_hidden", None)))
        self._kept = {}
        if level == 2:
            loadable = loadable_leaves(runner)
            if loadable is not None:
                leaves = jax.tree.leaves(runner.state)
                self._kept = {i: jax.device_get(x) for i, x in enumerate(leaves) if i not in loadable}
        self.weights = offload(runner.state, keep=level == 1)
        self.lora = offload(lora, keep=True) if lora is not None else None
        self.kv = offload(kv_tree, keep=False)
        delete_arrays(getattr(runner, "_hidden", None))
        self._kv_template = kc
        runner.state = runner.kv_cache = runner.counts = runner.prompt_mask = runner.last_tokens = None
        runner._hidden = None
        if runner.lora is not None:
            runner.lora.weights = None
        self.level = level
        self.asleep = set(TAGS)
        return freed

    def wake_up(self, runner, tags=None) -> None:
        """Bring the tags in ``tags`` (None: all) back, with the shardings they had."""
        for tag in [t for t in TAGS if t in (TAGS if tags is None else tags) and t in self.asleep]:
            if tag == "weights":
                runner.state = self._weights(runner)
                if self.lora is not None:
                    runner.lora.weights = self.lora.restore()
                self.weights = self.lora = None
            else:
                if self._kv_zeros is None:
                    self._kv_zeros = _zeros_fn(self.kv.specs)
                k, v, runner.counts, runner.prompt_mask, runner.last_tokens = self._kv_zeros()
                runner.kv_cache = dataclasses.replace(self._kv_template, k=k, v=v)
                self._kv_template = None
            self.asleep.discard(tag)
        if not self.asleep:
            self.level = 0

    def _weights(self, runner):
        off = self.weights
        if off.host is not None:
            return off.restore()
        # level 2: the memory mapped back, contents zero (the caller loads): no checkpoint read
        specs, treedef = jax.tree.flatten(off.specs)
        if self._weights_zeros is None:
            self._weights_zeros = _zeros_fn([s for i, s in enumerate(specs) if i not in self._kept])
        zeros = iter(self._weights_zeros())
        leaves = [jax.device_put(self._kept[i], s.sharding) if i in self._kept else next(zeros)
                  for i, s in enumerate(specs)]
        self._kept = {}
        self.discarded = True
        return jax.tree.unflatten(treedef, leaves)


def loadable_leaves(runner) -> set[int] | None:
    """Indices (among ``runner.state``'s leaves) of the weights ``load_weights`` writes; None when it
    writes none (MoE, a runner without a checkpoint config): every leaf is discarded then, and only
    ``reload_weights`` restores them."""
    from jaxllm.runner.weight_update import updater

    try:
        return updater(runner).loadable()
    except (ValueError, AttributeError):
        return None
