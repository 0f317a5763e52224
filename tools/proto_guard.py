"""Guards the protos like a public API: `buf lint` (buf's style guide, with the AIP exceptions in
protos/buf.yaml) and `buf breaking` against the previous commit on main.

Both run on descriptor sets built by protoc (grpc_tools) with the googleapis protos that ship in the
googleapis-common-protos package: buf's own module resolution would fetch them from the Buf Schema
Registry, which is out of reach here.

    python -m tools.proto_guard                 # lint the working tree, breaking vs HEAD~1
    python -m tools.proto_guard --against REV   # breaking vs another git revision
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

import google.api.annotations_pb2
from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTOS = REPO_ROOT / "protos"
CONFIG = PROTOS / "buf.yaml"
# site-packages, where googleapis-common-protos keeps google/api/*.proto.
GOOGLEAPIS = Path(google.api.annotations_pb2.__file__).parents[2]
GRPC_TOOLS_INCLUDE = Path(protoc.__file__).parent / "_proto"


class GuardError(Exception):
    """A check failed; the message is buf's or protoc's output."""


def buf() -> str:
    found = shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf")
    if found is None:
        raise GuardError("the buf CLI is not installed (buf-bin, in the dev extras)")
    return found


def descriptor_set(proto_root: Path, out: Path) -> Path:
    """Every .proto under `proto_root` (its ferry/ tree) with imports and source info, as buf reads it."""
    files = sorted(str(p.relative_to(proto_root)) for p in proto_root.rglob("*.proto"))
    if not files:
        raise GuardError(f"no .proto files under {proto_root}")
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{GOOGLEAPIS}",
        f"-I{GRPC_TOOLS_INCLUDE}",
        "--include_imports",
        "--include_source_info",
        f"--descriptor_set_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise GuardError(f"protoc could not build the descriptor set of {proto_root}")
    return out


def _image(path: Path) -> str:
    return f"{path}#format=binpb"


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise GuardError((result.stdout + result.stderr).strip() or f"{argv[1]} failed")


def lint(image: Path, config: Path = CONFIG) -> None:
    _run([buf(), "lint", _image(image), "--config", str(config), "--path", "ferry"])


def breaking(image: Path, against: Path, config: Path = CONFIG) -> None:
    """Fails when `image` breaks a client built from `against` (rules in protos/buf.yaml)."""
    _run(
        [
            buf(),
            "breaking",
            _image(image),
            "--against",
            _image(against),
            "--config",
            str(config),
            "--against-config",
            str(config),
            "--path",
            "ferry",
        ]
    )


def protos_at(revision: str, into: Path) -> Path | None:
    """The protos/ tree of a git revision, or None when the revision or its protos do not exist."""
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", "--format=tar", revision, "protos"],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        return None
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into / "protos"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.proto_guard", description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="HEAD~1", help="git revision to check breaking changes against")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ferry-protos-") as scratch:
        work = Path(scratch)
        try:
            current = descriptor_set(PROTOS, work / "current.binpb")
            lint(current)
            print("buf lint: every proto follows the style guide (protos/buf.yaml)")
            previous_root = protos_at(args.against, work / "previous")
            if previous_root is None:
                print(f"buf breaking: skipped, {args.against} is not in this clone's history")
                return 0
            breaking(current, descriptor_set(previous_root, work / "previous.binpb"))
            print(f"buf breaking: no breaking change against {args.against}")
        except GuardError as err:
            print(err, file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
