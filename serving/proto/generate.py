"""Regenerate the committed gRPC stubs: ``make proto`` = ``python -m serving.proto.generate``.

Runs grpc_tools.protoc over ``serving/proto/jaxllm/v1/*.proto`` (proto path ``serving/proto``, so
the descriptors keep their canonical names ``jaxllm/v1/<file>.proto`` for reflection) and writes
``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` beside the protos. protoc emits
``from jaxllm.v1 import x_pb2``, which would resolve to the *engine* package ``jaxllm``; the
imports are rewritten to ``serving.proto.jaxllm.v1`` so the stubs import inside ``serving``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE_DIR = PROTO_ROOT / "jaxllm" / "v1"
PY_PACKAGE = "serving.proto.jaxllm.v1"


def _fix_imports(path: Path) -> None:
    text = path.read_text()
    fixed = re.sub(r"^from jaxllm\.v1 import ", f"from {PY_PACKAGE} import ", text, flags=re.M)
    fixed = re.sub(r"^import jaxllm\.v1\.", f"import {PY_PACKAGE}.", fixed, flags=re.M)
    if fixed != text:
        path.write_text(fixed)


def main() -> int:
    from grpc_tools import protoc  # grpcio-tools: a test/dev dependency only
    import importlib.resources

    protos = sorted(PACKAGE_DIR.glob("*.proto"))
    if not protos:
        print(f"no .proto files under {PACKAGE_DIR}", file=sys.stderr)
        return 1
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={well_known}",
        f"--python_out={PROTO_ROOT}",
        f"--pyi_out={PROTO_ROOT}",
        f"--grpc_python_out={PROTO_ROOT}",
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    rc = protoc.main(args)
    if rc != 0:
        print(f"protoc failed with exit code {rc}", file=sys.stderr)
        return rc
    for path in PACKAGE_DIR.glob("*_pb2*.py*"):
        _fix_imports(path)
    for d in (PROTO_ROOT / "jaxllm", PACKAGE_DIR):
        (d / "__init__.py").touch()
    print(f"generated stubs for {', '.join(p.name for p in protos)} in {PACKAGE_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
