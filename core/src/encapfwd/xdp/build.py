"""Compile a BPF C source to an object file with clang, cached by content.

    from encapfwd.xdp.build import build
    obj = build("dispatch.c", {"MAX_SERVERS": 256})     # a source shipped in encapfwd/xdp/
    obj = build("/abs/path/prog.c")                      # or any absolute path

The object is ``<cache>/<stem>-<sha256>.o`` where the digest covers the source, every local header it
includes (``#include "..."``, recursively), the libbpf headers' version, the clang version and the full
command line (flags and defines). A hit costs one hash; a miss compiles into a temporary file in the cache
folder and renames it into place, so concurrent builds never see a half-written object.

The cache folder is ``$ENCAPFWD_BPF_CACHE``, else ``$XDG_CACHE_HOME/encapfwd``, else ``~/.cache/encapfwd``.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

from encapfwd.xdp import BPFError

#: Where sources shipped with encapfwd live (``build("name.c")`` looks here).
PACKAGE_DIR = Path(__file__).resolve().parent
#: Compiler flags, before the include folder and the defines.
CLANG_FLAGS = ("-O2", "-g", "-Wall", "-Werror", "-target", "bpf")
NO_CLANG = "clang is not installed: run ./dev setup or apt-get install clang libbpf-dev"
LIBBPF_VERSION_HEADER = Path("/usr/include/bpf/libbpf_version.h")

_INCLUDE = re.compile(rb'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)
_DEFINE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def cache_dir() -> Path:
    """The folder holding compiled objects (not created here)."""
    explicit = os.environ.get("ENCAPFWD_BPF_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "encapfwd"


def _first_line(argv: List[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout.strip() else ""


@functools.lru_cache(maxsize=None)
def multiarch_include() -> Optional[str]:
    """The multiarch include folder holding ``asm/types.h`` (``/usr/include/x86_64-linux-gnu``), or None
    when ``/usr/include/asm`` exists or no such folder is found (clang then reports the missing header)."""
    candidates = [_first_line(["gcc", "-print-multiarch"]), f"{platform.machine()}-linux-gnu"]
    for triplet in candidates:
        if triplet and os.path.exists(f"/usr/include/{triplet}/asm/types.h"):
            return f"/usr/include/{triplet}"
    if os.path.exists("/usr/include/asm/types.h"):
        return None
    found = sorted(glob.glob("/usr/include/*/asm/types.h"))
    return os.path.dirname(os.path.dirname(found[0])) if found else None


@functools.lru_cache(maxsize=None)
def clang_version(clang: str) -> str:
    """The first line of ``clang --version`` (part of the cache key)."""
    return _first_line([clang, "--version"])


def local_headers(source: Path) -> List[Path]:
    """Every file reached through ``#include "..."`` from *source*, recursively, in a stable order.

    A quoted include is looked up next to the file that includes it; one that is not there is left to clang.
    """
    seen: Dict[Path, None] = {}
    todo = [source]
    while todo:
        current = todo.pop(0)
        for name in _INCLUDE.findall(current.read_bytes()):
            header = (current.parent / name.decode()).resolve()
            if header.is_file() and header not in seen and header != source:
                seen[header] = None
                todo.append(header)
    return list(seen)


def resolve_source(source_name: Union[str, Path]) -> Path:
    """An absolute path as given, else the file of that name shipped in ``encapfwd/xdp/``."""
    path = Path(source_name)
    if not path.is_absolute():
        path = PACKAGE_DIR / path
    if not path.is_file():
        raise BPFError(f"BPF source not found: {path}")
    return path.resolve()


def _define_flags(defines: Optional[Mapping[str, object]]) -> List[str]:
    flags = []
    for name, value in sorted((defines or {}).items()):
        if not _DEFINE_NAME.match(name):
            raise BPFError(f"invalid define name for a BPF build: {name!r}")
        flags.append(f"-D{name}" if value is None else f"-D{name}={value}")
    return flags


def command(source: Path, output: Union[str, Path], defines: Optional[Mapping[str, object]] = None,
            clang: str = "clang") -> List[str]:
    """The clang command line that compiles *source* into *output*."""
    include = multiarch_include()
    return [clang, *CLANG_FLAGS, *([f"-I{include}"] if include else []), *_define_flags(defines),
            "-c", str(source), "-o", str(output)]


def _clang_error(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if "error:" in line:
            return line
    return lines[0] if lines else "no diagnostic"


def build(source_name: Union[str, Path], defines: Optional[Mapping[str, object]] = None) -> Path:
    """Compile *source_name* (a file in ``encapfwd/xdp/`` or an absolute path) with ``-D`` *defines*
    (``{"NAME": value}``; value None for a bare ``-DNAME``) and return the cached object's path.

    Raises :class:`BPFError` with one line: clang missing, or clang's first error line.
    """
    source = resolve_source(source_name)
    clang = shutil.which("clang")
    if clang is None:
        raise BPFError(NO_CLANG)
    argv = command(source, "OUT", defines, clang="clang")
    digest = hashlib.sha256()
    for part in (source.read_bytes(), *(h.read_bytes() for h in local_headers(source))):
        digest.update(len(part).to_bytes(8, "little") + part)
    if LIBBPF_VERSION_HEADER.exists():
        digest.update(LIBBPF_VERSION_HEADER.read_bytes())
    digest.update(clang_version(clang).encode() + b"\0" + "\0".join(argv).encode())
    folder = cache_dir()
    target = folder / f"{source.stem}-{digest.hexdigest()}.o"
    if target.exists():
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{source.stem}-", suffix=".o.tmp")
        os.close(fd)
    except OSError as exc:
        raise BPFError(f"cannot write the BPF object cache {folder}: {exc.strerror}") from None
    try:
        proc = subprocess.run(command(source, tmp, defines, clang=clang), capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            raise BPFError(f"compiling {source.name} failed: {_clang_error(proc.stderr)}", log=proc.stderr)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


__all__ = ["CLANG_FLAGS", "NO_CLANG", "build", "cache_dir", "command", "local_headers", "multiarch_include",
           "resolve_source"]
