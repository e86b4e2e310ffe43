"""llama.cpp's CUDA build kept between lent machines: packed once, carried after.

A fresh GPU machine spends ~330 s of a session's ~1,800 s of device time building
llama.cpp for sm_90 (`llama_peer.start_build`: 327 s on the H200, 298 s on the
H100) before any benchmark can compare against it. After a fresh build, `pack`
writes the build's bin/ (the four tools and the shared libraries they load) as an
xz tarball cut into parts the device tool brings back from $OUT (at most 16 MiB a
file), with a manifest naming the source tarball it was built from. The lead
copies the parts into `.gpu/` (git-ignored, carried with the sources); on the next
machine `unpack` restores bin/ in seconds when the manifest matches the sources
being carried, and the build is skipped. A different source tarball, or a part
missing, means a build as before.

    # after a GPU call that built llama.cpp fresh (files come back under files_at):
    cp <files_at>/llama-cuda-bin.* .gpu/
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import tarfile
from pathlib import Path

log = logging.getLogger("benchmarks.llama_prebuilt")
STEM = "llama-cuda-bin"
PART_BYTES = 15 << 20          # under the 16 MiB a file the device tool brings back
MAX_PACKED = 44 << 20          # beside the sources and wheels, under the 64 MiB a call carries


def tool_env(binary: str | Path) -> dict[str, str]:
    """The tools load libllama/libggml from their own folder, also where bin/ was restored
    under another path than the one it was linked in (its RPATH names the build's), and
    cuBLAS from the machine's CUDA (a bin/ built elsewhere carries no cuBLAS: hundreds of MB)."""
    dirs = [str(Path(binary).parent), os.environ.get("LD_LIBRARY_PATH", ""), *cuda_library_dirs()]
    return {**os.environ, "LD_LIBRARY_PATH": ":".join(d for d in dirs if d)}


def cuda_library_dirs() -> list[str]:
    """Where the machine keeps libcublas: the toolkit's lib64, or the pip packages torch loads."""
    roots = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "lib64", Path("/usr/local/cuda/lib64")]
    try:
        import nvidia  # the namespace package of torch's CUDA wheels
        roots += [lib for base in nvidia.__path__ for lib in Path(base).glob("*/lib")]
    except ImportError:
        pass
    found = []
    for root in roots:
        if any(root.glob("libcublas.so*")) and str(root) not in found:
            found.append(str(root))
    return found


def runs_here(bin_dir: Path, tool: str = "llama-completion") -> str:
    """'' when a restored bin/ starts on this machine, else why not (a library the loader
    cannot find, a C library too old: it was built on another machine's image)."""
    binary = bin_dir / tool
    try:
        done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60,
                              env=tool_env(binary))
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    output = done.stdout + done.stderr
    if done.returncode < 0 or done.returncode == 127 or "error while loading shared libraries" in output \
            or "version `GLIBC" in output:
        return output[-800:] or f"rc={done.returncode}"
    return ""


def source_digest(source_tar: Path) -> str:
    return hashlib.sha256(source_tar.read_bytes()).hexdigest()


def pack(bin_dir: Path, source_tar: Path, out_dir: Path) -> list[Path]:
    """bin_dir -> out_dir/STEM.tar.xz.partNN + STEM.json; [] (and nothing left) when too big."""
    out_dir.mkdir(parents=True, exist_ok=True)
    whole = out_dir / f"{STEM}.tar.xz"
    with tarfile.open(whole, "w:xz") as tar:
        tar.add(bin_dir, arcname="bin")
    size = whole.stat().st_size
    if size > MAX_PACKED:
        whole.unlink()
        log.warning("llama.cpp bin/ packs to %.1f MiB, over %d MiB: not kept", size / 2 ** 20, MAX_PACKED >> 20)
        return []
    parts = []
    with open(whole, "rb") as src:
        while chunk := src.read(PART_BYTES):
            parts.append(out_dir / f"{STEM}.tar.xz.part{len(parts):02d}")
            parts[-1].write_bytes(chunk)
    whole.unlink()
    manifest = out_dir / f"{STEM}.json"
    manifest.write_text(json.dumps({"source_sha256": source_digest(source_tar), "parts": len(parts),
                                    "bytes": size}))
    log.info("llama.cpp bin/ packed: %.1f MiB in %d parts under %s", size / 2 ** 20, len(parts), out_dir)
    return [*parts, manifest]


def unpack(carried: Path, source_tar: Path, build_dir: Path) -> bool:
    """Restore build_dir/bin from the parts in `carried` if they were built from source_tar."""
    manifest = carried / f"{STEM}.json"
    if not manifest.exists():
        return False
    record = json.loads(manifest.read_text())
    parts = [carried / f"{STEM}.tar.xz.part{i:02d}" for i in range(record["parts"])]
    if not all(p.exists() for p in parts):
        log.warning("prebuilt llama.cpp: parts missing under %s: building", carried)
        return False
    if record["source_sha256"] != source_digest(source_tar):
        log.warning("prebuilt llama.cpp was built from other sources: building")
        return False
    build_dir.mkdir(parents=True, exist_ok=True)
    whole = build_dir / f"{STEM}.tar.xz"
    with open(whole, "wb") as sink:
        for part in parts:
            sink.write(part.read_bytes())
    with tarfile.open(whole, "r:xz") as tar:
        tar.extractall(build_dir, filter="tar")
    whole.unlink()
    log.info("prebuilt llama.cpp restored under %s", build_dir / "bin")
    return True
