"""Pulling a model from Hugging Face into the hub cache, through huggingface_hub.

The files go where `hf_hub_download` puts them (blobs named by sha256, snapshot
links), so the Hugging Face CLI, transformers, llama.cpp's -hf and LM Studio's
HF import see them, and Ebbtide's registry lists them (engines.registry.hf_cache).
Before any byte is written, the files' sizes (from the repo listing) are held
against the free space of the cache's disk. Downloads are plain HTTP: a dropped
connection resumes within the call from where it stopped (Range), a cancel stops
at the next chunk and the library deletes its temporary file. After a file
arrives, its sha256 is checked against the hub's; a mismatch removes it and its
snapshot link, so no broken model is ever listed.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from app.pull.choose import RepoFile, choose_files
from app.pull.errors import ChecksumMismatch, HubUnavailable, NotEnoughDisk, NothingToPull
from app.pull.names import PullRef
from app.pull.progress import ProgressSink, PullProgress, bar_factory

log = logging.getLogger(__name__)

DISK_MARGIN_BYTES = 256 << 20  # left free after a pull: a full disk breaks more than the download
HASH_BLOCK = 8 << 20


@dataclass(frozen=True)
class PullConfig:
    cache_dir: Path                 # the Hugging Face hub cache (EngineConfig.resolved_hf_cache_dir())
    endpoint: str | None = None     # None: huggingface_hub's own (HF_ENDPOINT or huggingface.co)
    disk_margin_bytes: int = DISK_MARGIN_BYTES


@dataclass(frozen=True)
class PullResult:
    ref: PullRef
    files: tuple[Path, ...]         # the snapshot paths, first part first
    total_bytes: int


def _plain_http() -> None:
    """Xet's native downloader neither resumes through our Range path nor stops between
    chunks when a pull is cancelled: Ebbtide's pulls use plain HTTP."""
    from huggingface_hub import constants

    constants.HF_HUB_DISABLE_XET = True


def list_repo_files(ref: PullRef, config: PullConfig) -> list[RepoFile]:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        info = HfApi(endpoint=config.endpoint).model_info(ref.repo_id, files_metadata=True)
    except RepositoryNotFoundError as exc:
        raise NothingToPull(f"no Hugging Face repo named {ref.repo_id} (or it is private or gated)") from exc
    except Exception as exc:
        if _is_transport(exc):
            raise HubUnavailable(f"cannot list {ref.repo_id}: {exc}") from exc
        raise
    return [RepoFile(s.rfilename, s.lfs.size if s.lfs else s.size, s.lfs.sha256 if s.lfs else None)
            for s in info.siblings or ()]


def _is_transport(exc: BaseException) -> bool:
    """An HTTP error answer, or the connection failing (huggingface_hub's httpx2 errors)."""
    from huggingface_hub.errors import HfHubHTTPError

    return isinstance(exc, (HfHubHTTPError, OSError)) or type(exc).__module__.split(".")[0] in ("httpx2", "httpx")


def _blob(config: PullConfig, ref: PullRef, sha256: str | None) -> Path | None:
    if not sha256:
        return None
    return config.cache_dir / f"models--{ref.repo_id.replace('/', '--')}" / "blobs" / sha256


def check_room(ref: PullRef, files: list[RepoFile], config: PullConfig) -> None:
    """Refuse before downloading when the cache's disk lacks room for the missing files."""
    needed = sum(f.size or 0 for f in files if not ((b := _blob(config, ref, f.sha256)) and b.is_file()))
    probe = config.cache_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed + config.disk_margin_bytes > free:
        raise NotEnoughDisk(f"{ref.repo_id}: {needed / 1e9:.2f} GB to download but {free / 1e9:.2f} GB free on "
                            f"the disk of {config.cache_dir} (keeping {config.disk_margin_bytes >> 20} MiB spare)")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, expected: str | None, name: str) -> None:
    """The file's sha256 against the hub's; a mismatch removes the blob and its link."""
    if not expected:
        return
    actual = sha256_of(path)
    if actual == expected:
        return
    blob = path.resolve()
    blob.unlink(missing_ok=True)
    if path.is_symlink() or path.exists():
        path.unlink(missing_ok=True)
    raise ChecksumMismatch(f"{name}: sha256 {actual[:12]}... is not the hub's {expected[:12]}...; "
                           "the file was removed, pull again")


def download(ref: PullRef, file: RepoFile, config: PullConfig, sink: ProgressSink,
             cancel: threading.Event) -> Path:
    from huggingface_hub import hf_hub_download

    digest = f"sha256:{file.sha256}" if file.sha256 else None
    status = f"pulling {file.sha256[:12]}" if file.sha256 else f"pulling {file.path}"
    try:
        path = Path(hf_hub_download(ref.repo_id, file.path, cache_dir=str(config.cache_dir),
                                    endpoint=config.endpoint, tqdm_class=bar_factory(status, digest, sink, cancel)))
    except Exception as exc:
        if _is_transport(exc):
            raise HubUnavailable(f"cannot download {file.path}: {exc}") from exc
        raise
    size = path.stat().st_size
    sink(PullProgress(status, digest, size, size))  # a cached file reports no bytes on its own
    sink(PullProgress("verifying sha256 digest"))
    verify(path, file.sha256, file.path)
    return path


def pull(ref: PullRef, config: PullConfig, sink: ProgressSink,
         cancel: threading.Event | None = None) -> PullResult:
    """List the repo, choose the file(s), check room, download and verify each."""
    _plain_http()
    cancel = cancel or threading.Event()
    files = choose_files(list_repo_files(ref, config), ref.quant, ref.repo_id)
    check_room(ref, files, config)
    # After the checks, so an unknown repo or quant and a full disk are HTTP errors, not stream lines.
    sink(PullProgress("pulling manifest"))
    os.makedirs(config.cache_dir, exist_ok=True)
    paths = tuple(download(ref, f, config, sink, cancel) for f in files)
    sink(PullProgress("success"))
    log.info("pulled %s: %s", ref.name, ", ".join(str(p) for p in paths))
    return PullResult(ref, paths, sum(p.stat().st_size for p in paths))
