"""Generates the `ferry` protobuf/gRPC modules and their type stubs when ferry-client is built.

The protos come from the repository's `protos/` (a build inside the checkout) or from the sdist's own
`protos/` copy (a build from the sdist). googleapis' `google/api`, `google/rpc` protos come from
`googleapis-common-protos`, the well-known types from `grpcio-tools`; both are build requirements.

A regular wheel gets the modules from a scratch folder (the checkout is left alone); an editable
install writes them into `src/ferry/` (ignored by git), where the editable path finds them. Ferry's
`make proto` runs this file as a script to regenerate `src/ferry/` after a proto change.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def proto_root(root: Path = HERE) -> Path:
    for candidate in (root / "protos", root.parents[1] / "protos"):
        if (candidate / "ferry").is_dir():
            return candidate
    raise RuntimeError(f"ferry-client: no protos/ferry beside {root} or in the repository above it")


def generate(out: Path, protos: Path | None = None) -> list[Path]:
    """Writes ferry/**/*_pb2.py, *_pb2_grpc.py and their .pyi stubs under `out`; returns the files."""
    import google.api.annotations_pb2 as annotations
    from grpc_tools import protoc

    protos = protos or proto_root()
    googleapis = Path(annotations.__file__).resolve().parents[2]
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    sources = sorted(str(p.relative_to(protos)) for p in protos.rglob("*.proto"))
    staging = Path(tempfile.mkdtemp(prefix="ferry-protos-"))
    try:
        args = [
            "grpc_tools.protoc",
            f"-I{protos}",
            f"-I{googleapis}",
            f"-I{well_known}",
            f"--python_out={staging}",
            f"--grpc_python_out={staging}",
            f"--mypy_out={staging}",
            f"--mypy_grpc_out={staging}",
            *sources,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("ferry-client: protoc failed on " + " ".join(sources))
        for folder in [staging / "ferry", *(p for p in (staging / "ferry").rglob("*") if p.is_dir())]:
            (folder / "__init__.py").touch()
        (staging / "ferry" / "py.typed").touch()
        # Swap the new tree in whole, so that a reader never sees a half-written package.
        target = out / "ferry"
        out.mkdir(parents=True, exist_ok=True)
        fresh = Path(tempfile.mkdtemp(prefix=".ferry-new-", dir=out))
        shutil.move(str(staging / "ferry"), fresh / "ferry")
        old = out / f".ferry-old-{fresh.name}"
        if target.exists():
            target.rename(old)
        (fresh / "ferry").rename(target)
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(fresh, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sorted(p for p in (out / "ferry").rglob("*") if p.is_file())


try:
    from hatchling.builders.hooks.plugin.interface import BuildHookInterface
except ImportError:  # run as a script by `make proto`: hatchling is not needed
    BuildHookInterface = object  # type: ignore[assignment,misc]


class ProtoBuildHook(BuildHookInterface):  # type: ignore[misc,valid-type]
    PLUGIN_NAME = "ferry-protos"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        root = Path(self.root)
        protos = proto_root(root)
        if version == "editable":
            generate(root / "src", protos)
            return
        # A scratch folder of our own (self.directory is the output folder, shared with the wheel).
        self._scratch = Path(tempfile.mkdtemp(prefix="ferry-client-build-"))
        out = self._scratch
        files = generate(out, protos)
        for path in files:
            build_data["force_include"][str(path)] = str(path.relative_to(out))

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        scratch = getattr(self, "_scratch", None)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    # python hatch_build.py [OUT]: regenerate OUT/ferry (default: src/ferry beside this file).
    destination = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "src"
    for written in generate(destination):
        print(written)
