"""Shared helpers for the benches: seeded workloads, machine/commit info, tables, percentiles, JSON."""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import random
import subprocess
import sys

# Make `python bench/x.py` work from the repo root (bench/ is not a package on sys.path otherwise).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Token ids below this are special/control tokens in the models we bench (SmolLM2: 0..16, Llama: 0..2);
# random prompts avoid them so that no EOS / chat marker lands in a prompt.
FIRST_PLAIN_TOKEN = 100


@dataclasses.dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int
    prompt: str | None = None  # text, when the workload came from text

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def parse_range(s: str) -> tuple[int, int]:
    """"128" → (128, 128); "64..512" or "64:512" → (64, 512) inclusive."""
    for sep in ("..", ":", "-"):
        if sep in s:
            lo, hi = s.split(sep, 1)
            lo, hi = int(lo), int(hi)
            break
    else:
        lo = hi = int(s)
    if lo < 1 or hi < lo:
        raise ValueError(f"range {s!r} is invalid: need 1 <= lo <= hi")
    return lo, hi


def synthetic_requests(num: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab_size: int,
                       seed: int = 0) -> list[BenchRequest]:
    """`num` requests with prompt lengths and output lengths drawn uniformly (inclusive) from the
    ranges and prompt tokens drawn uniformly from the plain part of the vocabulary. Same seed →
    same workload, on every machine (Python's Mersenne Twister)."""
    rng = random.Random(seed)
    lo_tok = min(FIRST_PLAIN_TOKEN, vocab_size // 2)
    out = []
    for _ in range(num):
        n_in = rng.randint(*input_len)
        n_out = rng.randint(*output_len)
        out.append(BenchRequest([rng.randrange(lo_tok, vocab_size) for _ in range(n_in)], n_out))
    return out


def add_workload_args(ap) -> None:
    """The synthetic workload's flags, the same in every bench (defaults: issue 4's workload)."""
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", default="64..512", help="prompt length: N or LO..HI (inclusive)")
    ap.add_argument("--output-len", default="64..256", help="output length: N or LO..HI (inclusive)")


def workload_from_args(args, vocab_size: int, seed: int = 0) -> list[BenchRequest]:
    """synthetic_requests from add_workload_args' flags."""
    return synthetic_requests(args.num_prompts, parse_range(args.input_len), parse_range(args.output_len),
                              vocab_size, seed)


def jsonl_requests(path: str, tokenizer, output_len: tuple[int, int], seed: int = 0,
                   num: int | None = None) -> list[BenchRequest]:
    """A JSONL of {"prompt": str} or {"prompt_token_ids": [...]} (optional "output_len"/"max_tokens")."""
    rng = random.Random(seed)
    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            n_out = obj.get("output_len") or obj.get("max_tokens") or rng.randint(*output_len)
            if "prompt_token_ids" in obj:
                out.append(BenchRequest(list(obj["prompt_token_ids"]), int(n_out)))
            elif "prompt" in obj:
                out.append(BenchRequest(list(tokenizer.encode(obj["prompt"])), int(n_out), obj["prompt"]))
            else:
                raise ValueError(f"{path}:{lineno}: need 'prompt' or 'prompt_token_ids'")
            if num is not None and len(out) >= num:
                break
    return out


# ----- machine / provenance -----------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu_model(), "cores": os.cpu_count(), "loadavg_1_5_15": loadavg(), "commit": git_rev(),
            "python": platform.python_version(), "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    try:
        import jax
        info["jax"] = jax.__version__
        info["backend"] = jax.default_backend()
        info["device"] = str(jax.devices()[0].device_kind)
    except Exception:  # noqa: BLE001 - info only
        pass
    return info


# ----- statistics / output ------------------------------------------------------------
def percentile(xs, q: float) -> float:
    """Linear-interpolated percentile (numpy's default), NaN for an empty list."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100.0
    f = int(k)
    c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)


def summarize(xs) -> dict:
    xs = list(xs)
    if not xs:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "p99": float("nan"), "n": 0}
    return {"mean": sum(xs) / len(xs), "p50": percentile(xs, 50), "p90": percentile(xs, 90),
            "p99": percentile(xs, 99), "n": len(xs)}


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec such as '.1f' or '')."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        line = []
        for key, _, spec in columns:
            v = r.get(key)
            if v is None:
                line.append("-")
            elif isinstance(v, float) and spec:
                line.append(format(v, spec))
            else:
                line.append(str(v))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    out = []
    for j, line in enumerate(cells):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def log_machine() -> dict:
    """machine_info(), logged in one line (CPU, cores, load, commit) at a bench's start."""
    machine = machine_info()
    log(f"machine: {machine['cpu']} x{machine['cores']}, load {machine['loadavg_1_5_15']}, commit {machine['commit']}")
    return machine


def print_results(rows: list[dict], columns: list[tuple[str, str, str]], ratios: dict[str, float],
                  ratio_unit: str = "") -> None:
    """The throughput table, each row's note, then the jaxllm-vs-baseline ratios."""
    print(format_table(rows, columns))
    for r in rows:
        if r["note"]:
            print(f"  {r['system']} (batch {r['batch']}): {r['note']}")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x{ratio_unit}")


def write_json(path: str, obj) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")


def merge_json(path: str, key: str, value) -> None:
    """Sets `key` in the JSON object stored at `path` (created if missing), keeping other keys:
    the device check's phases each write their own key into one file."""
    doc = {}
    if os.path.exists(path):
        with open(path) as f:
            doc = json.load(f)
    doc[key] = value
    write_json(path, doc)


# Bytes per element of the HLO dtypes the benches read shapes of.
HLO_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "f8e4m3fn": 1}


def hlo_instructions(text: str):
    """(computation, line) for each line inside a computation of an HLO module's text; computation
    is "ENTRY" for the entry computation, else its name as written ("%fused_computation.3", ...)."""
    comp = ""
    for ln in text.splitlines():
        if ln and not ln[0].isspace() and ln.rstrip().endswith("{"):
            comp = "ENTRY" if ln.startswith("ENTRY") else ln.split()[0]
            continue
        yield comp, ln


def hlo_elements(dims: str) -> int:
    """Elements of an HLO shape's dimension list ("4,2048,16" -> 131072; "" -> 1)."""
    n = 1
    for d in dims.split(","):
        if d:
            n *= int(d)
    return n


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)
