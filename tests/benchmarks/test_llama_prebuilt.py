"""benchmarks/llama_prebuilt.py: a llama.cpp bin/ packed into parts the device tool brings
back, and restored on the next machine only when it was built from the sources carried;
llama_peer.start_build then skips the build (here with a fake bin/: no nvcc on this machine)."""
from __future__ import annotations

import os
import stat

from benchmarks import llama_peer, llama_prebuilt


def fake_bin(root, size=1 << 20):
    bin_dir = root / "llama.cpp-build" / "bin"
    bin_dir.mkdir(parents=True)
    for tool in llama_peer.TARGETS:
        path = bin_dir / tool
        path.write_bytes(b"#!/bin/sh\necho " + tool.encode() + b"\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    (bin_dir / "libggml-cuda.so").write_bytes(os.urandom(size))      # incompressible: several parts
    return bin_dir


def test_packed_in_parts_and_restored_when_the_sources_match(tmp_path, monkeypatch):
    monkeypatch.setattr(llama_prebuilt, "PART_BYTES", 400 << 10)
    sources = tmp_path / "carried" / "llama.cpp-src.tar.xz"
    sources.parent.mkdir()
    sources.write_bytes(b"the sources")
    built = fake_bin(tmp_path / "machine1")
    files = llama_prebuilt.pack(built, sources, sources.parent)
    assert len(files) == 4 and all(f.stat().st_size <= 400 << 10 for f in files)       # 3 parts + manifest

    restored = tmp_path / "machine2"
    build = llama_peer.start_build(sources, restored)
    assert build.cached and build.process is None            # no build started
    for tool in llama_peer.TARGETS:
        assert os.access(build.binary(tool), os.X_OK)
    assert (build.bin_dir / "libggml-cuda.so").read_bytes() == (built / "libggml-cuda.so").read_bytes()
    env = llama_prebuilt.tool_env(build.binary("llama-bench"))
    assert env["LD_LIBRARY_PATH"].split(":")[0] == str(build.bin_dir)


def test_other_sources_or_a_missing_part_mean_a_build(tmp_path):
    sources = tmp_path / "carried" / "llama.cpp-src.tar.xz"
    sources.parent.mkdir()
    sources.write_bytes(b"the sources")
    llama_prebuilt.pack(fake_bin(tmp_path / "machine1", size=1000), sources, sources.parent)
    sources.write_bytes(b"newer sources")
    assert not llama_prebuilt.unpack(sources.parent, sources, tmp_path / "machine2")
    sources.write_bytes(b"the sources")
    next(sources.parent.glob("*.part00")).unlink()
    assert not llama_prebuilt.unpack(sources.parent, sources, tmp_path / "machine3")


def test_a_build_too_big_to_carry_is_not_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(llama_prebuilt, "MAX_PACKED", 1000)
    sources = tmp_path / "src.tar.xz"
    sources.write_bytes(b"s")
    assert llama_prebuilt.pack(fake_bin(tmp_path / "m", size=50_000), sources, tmp_path / "out") == []
    assert list((tmp_path / "out").iterdir()) == []


def test_a_prebuilt_that_does_not_start_here_is_removed_for_a_build(tmp_path):
    sources = tmp_path / "carried" / "llama.cpp-src.tar.xz"
    sources.parent.mkdir()
    sources.write_bytes(b"the sources")
    built = fake_bin(tmp_path / "machine1", size=1000)
    (built / "llama-completion").write_bytes(
        b"#!/bin/sh\necho 'llama-completion: error while loading shared libraries: libcublas.so.13' >&2\nexit 127\n")
    llama_prebuilt.pack(built, sources, sources.parent)

    build = llama_peer.Build(tmp_path / "machine2", sources)
    assert not llama_peer._restored_and_runs(sources, build)
    assert not build.bin_dir.exists()                       # gone: the sources are built instead
    assert "libcublas.so.13" in llama_prebuilt.runs_here(built)


def test_the_tools_find_the_machines_cublas(tmp_path, monkeypatch):
    cuda = tmp_path / "cuda"
    (cuda / "lib64").mkdir(parents=True)
    (cuda / "lib64" / "libcublas.so.13").write_bytes(b"")
    monkeypatch.setenv("CUDA_HOME", str(cuda))
    assert str(cuda / "lib64") in llama_prebuilt.tool_env(tmp_path / "bin" / "llama-bench")["LD_LIBRARY_PATH"].split(":")
