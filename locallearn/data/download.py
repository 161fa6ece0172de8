"""Download, verify and extract the official image dataset archives, through pooch.

:func:`download` fetches one dataset's official archive into ``root``, checks its MD5 checksum and
extracts it there, so that :func:`locallearn.data.images.load_images` can read ``root``;
:func:`fetch` is the lower-level step (one URL to one file). Both are ``pooch.retrieve`` calls:
pooch checks the checksum, keeps a file that matches (an existing one is not downloaded again, a
stale one is fetched anew) and deletes one that does not, naming the file and both hashes. Two
parts are this module's own, because pooch's do not do them:

* :class:`ResumableDownload`, the downloader: bytes go to ``<dest>.part``; an interrupted transfer
  resumes from the bytes already there (HTTP ``Range``) ``retries`` times, then stops with a
  one-line RuntimeError that keeps the ``.part`` file for the next call; ``file://`` URLs work;
* :class:`SafeExtract`, the processor: extraction accepts only regular files and folders whose
  paths stay inside the destination (no absolute paths, no ``..``, no links or device files) and
  unpacks into a temporary folder renamed into place only when the whole archive is out.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import pooch

from locallearn.data.images import DATASETS, Resource, dataset_info

__all__ = ["RESOURCES", "Resource", "ResumableDownload", "SafeExtract", "download", "extract",
           "fetch", "verify"]

#: Seconds to wait before retry ``k`` (multiplied by ``k``); tests set it to 0.
RETRY_DELAY_S = 2.0
_CHUNK = 1 << 20
_USER_AGENT = "locallearn-download/0.1 (python urllib)"


#: ``name -> Resource`` of the datasets with a public download (a view of
#: :data:`locallearn.data.images.DATASETS`, the one table of datasets)
RESOURCES: dict[str, Resource] = {
    name: info.download for name, info in DATASETS.items() if info.download is not None
}


def download(name: str, root: str | Path, progress: bool = True,
             keep_archive: bool = True) -> Path:
    """Download, verify and extract dataset ``name`` into ``root``; return the extracted folder.

    Args:
        name: ``cifar10``, ``stl10`` or ``tiny-imagenet``.
        root: folder to download into (created if needed). Afterwards
            ``load_images(name, root, split)`` reads it.
        progress: show a progress bar.
        keep_archive: keep the verified archive next to the extracted folder.

    Returns:
        The extracted folder, e.g. ``root / "cifar-10-batches-py"``. If it already exists it is
        returned at once: nothing is downloaded.

    Raises:
        ValueError: unknown name, checksum mismatch, unsafe archive.
        RuntimeError: network failure (the partial download is kept for the next call).
    """
    try:
        key = dataset_info(name).name
    except ValueError:
        key = str(name)
    if key not in RESOURCES:
        raise ValueError(
            f"no download for dataset {name!r}; downloadable: {', '.join(sorted(RESOURCES))}"
        )
    res = RESOURCES[key]
    root_path = Path(root).expanduser()
    target = root_path / res.folder
    if target.is_dir():
        return target
    root_path.mkdir(parents=True, exist_ok=True)
    archive = fetch(res.url, root_path / res.filename, md5=res.md5, progress=progress)
    SafeExtract(res.folder, keep_archive)(str(archive), "download", None)
    return target


class SafeExtract:
    """A pooch processor: extract the archive safely beside it (:func:`extract`) and check that
    it held ``folder``; return that folder. Drops the archive unless ``keep_archive``."""

    def __init__(self, folder: str, keep_archive: bool = True):
        self.folder, self.keep_archive = folder, keep_archive

    def __call__(self, fname: str, action: str, pooch_instance) -> str:
        archive = Path(fname)
        target = archive.parent / self.folder
        if action == "fetch" and target.is_dir():
            return str(target)
        extract(archive, archive.parent)
        if not target.is_dir():
            raise ValueError(f"archive {archive} did not contain the expected folder "
                             f"{self.folder}/")
        if not self.keep_archive:
            archive.unlink(missing_ok=True)
        return str(target)


# ----------------------------------------------------------------------------------------------
# checksums


def verify(path: str | Path, md5: str | None = None, sha256: str | None = None) -> None:
    """Check ``path`` against the given checksums; raise ValueError on a mismatch.

    Does nothing when neither checksum is given.
    """
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if expected is None:
            continue
        got = pooch.file_hash(str(path), alg=algorithm)
        if got.lower() != expected.strip().lower():
            raise ValueError(
                f"{algorithm} checksum mismatch for {path}: got {got}, expected {expected}; "
                "the file is corrupt or truncated"
            )


# ----------------------------------------------------------------------------------------------
# fetching


def fetch(
    url: str,
    dest: str | Path,
    md5: str | None = None,
    sha256: str | None = None,
    *,
    progress: bool = True,
    retries: int = 3,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest`` with ``pooch.retrieve``, resuming a partial download.

    Args:
        url: ``http://``, ``https://`` or ``file://`` address.
        dest: the file to create. If it exists and matches the checksum, nothing is downloaded;
            if it does not match, it is downloaded anew.
        md5: expected MD5 checksum (hex), checked before ``dest`` is created.
        sha256: expected SHA-256 checksum (hex), checked likewise.
        progress: show a progress bar.
        retries: how many times a transfer that stops early is resumed before giving up.
        timeout: socket timeout in seconds.

    Raises:
        ValueError: the downloaded bytes do not match a checksum (they are deleted), or the URL's
            scheme is not one of the three.
        RuntimeError: the transfer failed or stayed incomplete after ``retries`` resumptions;
            the bytes received so far stay in ``<dest>.part`` for the next call.
    """
    dest = Path(dest).expanduser()
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https", "file"):
        raise ValueError(f"unsupported URL scheme in {url!r}; use http, https or file")
    known = f"sha256:{sha256}" if sha256 else f"md5:{md5}" if md5 else None
    downloader = ResumableDownload(dest.with_name(dest.name + ".part"), progress=progress,
                                   retries=retries, timeout=timeout)
    pooch.retrieve(url, known_hash=known, fname=dest.name, path=dest.parent,
                   downloader=downloader)
    if sha256 and md5:
        verify(dest, md5=md5)
    return dest


class ResumableDownload:
    """A pooch downloader that resumes: the bytes collect in ``part`` across calls and retries;
    when the file is complete it moves to the place pooch asked for (``output_file``)."""

    def __init__(self, part: Path, progress: bool = True, retries: int = 3,
                 timeout: float = 60.0):
        self.part, self.progress, self.retries, self.timeout = part, progress, retries, timeout

    def __call__(self, url: str, output_file, pooch_instance, check_only: bool = False):
        if check_only:
            return self._available(url)
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        attempt = 0
        while True:
            try:
                done = _transfer(url, self.part, self.progress, self.timeout, scheme)
            except _TransientError as exc:
                if attempt >= self.retries:
                    kept = _size(self.part)
                    tail = (f"{kept} bytes kept in {self.part}, call again to resume" if kept
                            else "nothing was received")
                    raise RuntimeError(
                        f"download of {url} failed after {attempt + 1} attempts: {exc}; {tail}"
                    ) from None
                attempt += 1
                time.sleep(RETRY_DELAY_S * attempt)
                continue
            if done:
                break
            # The server could not serve the missing range of a partial file that is already
            # complete or larger than the file: start again from scratch, once.
            self.part.unlink(missing_ok=True)
            if attempt >= self.retries:
                raise RuntimeError(f"download of {url} failed: the server refused every byte "
                                   "range")
            attempt += 1
        # pooch checks the hash of output_file and deletes it on a mismatch: bytes that fail
        # the check are never resumed from
        os.replace(self.part, output_file)

    def _available(self, url: str) -> bool:
        if urllib.parse.urlsplit(url).scheme.lower() == "file":
            return Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path)).is_file()
        request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": _USER_AGENT})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout):
                return True
        except (urllib.error.URLError, OSError):
            return False


class _TransientError(Exception):
    """A transfer problem worth resuming (connection reset, early end of data, timeout)."""


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _transfer(url: str, part: Path, progress: bool, timeout: float, scheme: str) -> bool:
    """Append the missing bytes of ``url`` to ``part``.

    Returns True when ``part`` holds the complete file (as far as the server says), False when
    the partial file must be discarded (the server refused its range). Raises _TransientError
    when the transfer stopped early and RuntimeError on a permanent failure.
    """
    if scheme == "file":
        return _transfer_file(url, part, progress)
    offset = _size(part)
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            exc.close()
            total = _content_range_total(exc.headers.get("Content-Range", ""))
            if total is not None and total == offset:
                return True  # the partial file is already complete
            return False
        exc.close()
        if exc.code >= 500 or exc.code == 429:
            raise _TransientError(f"HTTP {exc.code} {exc.reason}") from None
        raise RuntimeError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _TransientError(f"cannot connect: {reason}") from None

    with response:
        status = getattr(response, "status", 200)
        length = response.headers.get("Content-Length")
        remaining = int(length) if length is not None and length.isdigit() else None
        if offset and status == 206:
            start = _content_range_start(response.headers.get("Content-Range", ""))
            if start != offset:
                raise RuntimeError(
                    f"download of {url} failed: asked for bytes from {offset}, server sent "
                    f"Content-Range {response.headers.get('Content-Range')!r}"
                )
            mode = "ab"
        else:
            offset, mode = 0, "wb"  # full response: (re)start from the first byte
        total = offset + remaining if remaining is not None else None
        received = _copy_stream(response, part, mode, offset, total, progress, url)
    if remaining is not None and received < remaining:
        raise _TransientError(f"connection closed after {received} of {remaining} bytes")
    return True


def _copy_stream(source, part: Path, mode: str, offset: int, total: int | None,
                 progress: bool, url: str) -> int:
    from tqdm.auto import tqdm

    received = 0
    name = PurePosixPath(urllib.parse.urlsplit(url).path).name or url
    with open(part, mode) as out, tqdm(
        total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
        desc=name, disable=not progress,
    ) as bar:
        while True:
            try:
                block = source.read(_CHUNK)
            except (OSError, ValueError) as exc:  # reset connection, timeout, bad chunking
                out.flush()
                raise _TransientError(
                    f"transfer interrupted after {received} bytes: {exc}"
                ) from None
            except Exception as exc:  # http.client.IncompleteRead and relatives
                out.flush()
                raise _TransientError(
                    f"transfer interrupted after {received} bytes: {type(exc).__name__}"
                ) from None
            if not block:
                break
            out.write(block)
            received += len(block)
            bar.update(len(block))
    return received


def _transfer_file(url: str, part: Path, progress: bool) -> bool:
    source_path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
    if not source_path.is_file():
        raise RuntimeError(f"download of {url} failed: {source_path} is not a file")
    total = source_path.stat().st_size
    offset = _size(part)
    if offset > total:
        return False
    with open(source_path, "rb") as src:
        src.seek(offset)
        _copy_stream(src, part, "ab" if offset else "wb", offset, total, progress, url)
    return True


def _content_range_start(value: str) -> int | None:
    # "bytes START-END/TOTAL"
    try:
        unit, _, rest = value.strip().partition(" ")
        return int(rest.split("-", 1)[0]) if unit == "bytes" else None
    except ValueError:
        return None


def _content_range_total(value: str) -> int | None:
    # "bytes */TOTAL" (in a 416 response) or "bytes START-END/TOTAL"
    try:
        total = value.strip().rsplit("/", 1)[1]
        return int(total) if total != "*" else None
    except (IndexError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------
# extraction


def _safe_relpath(name: str, archive: Path) -> PurePosixPath | None:
    """Validate one archive member name; return its relative path (None for the root itself)."""
    clean = name.replace("\\", "/")
    if clean.startswith("/") or (len(clean) > 1 and clean[1] == ":"):
        raise ValueError(f"unsafe archive {archive}: member {name!r} has an absolute path")
    parts = [p for p in PurePosixPath(clean).parts if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ValueError(f"unsafe archive {archive}: member {name!r} leaves the destination")
    return PurePosixPath(*parts) if parts else None


def extract(archive: str | Path, dest: str | Path) -> list[Path]:
    """Extract a ``.tar.gz``/``.tgz``/``.tar`` or ``.zip`` archive safely into ``dest``.

    The archive is unpacked into a temporary folder inside ``dest``; each top-level entry is
    then moved into ``dest`` (an existing entry of the same name is replaced). Nothing outside
    ``dest`` is ever written.

    Returns:
        The top-level paths created in ``dest``.

    Raises:
        ValueError: unknown archive type, or a member with an absolute path, a ``..`` component,
            or a type other than file or folder (links, devices). ``dest`` is left unchanged.
    """
    archive = Path(archive)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    lower = archive.name.lower()
    staging = dest / f".extract-{archive.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        if lower.endswith(".zip"):
            _extract_zip(archive, staging)
        elif lower.endswith((".tar.gz", ".tgz", ".tar")):
            _extract_tar(archive, staging)
        else:
            raise ValueError(f"unknown archive type {archive.name!r}; expected .tar.gz, .tgz, "
                             ".tar or .zip")
        created = []
        for entry in sorted(staging.iterdir()):
            target = dest / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(entry, target)
            created.append(target)
        return created
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract_tar(archive: Path, staging: Path) -> None:
    try:
        tf = tarfile.open(archive, mode="r:*")
    except (tarfile.TarError, OSError) as exc:
        raise ValueError(f"cannot open archive {archive}: {exc}") from None
    with tf:
        try:
            for member in tf:
                rel = _safe_relpath(member.name, archive)
                if rel is None:
                    continue
                target = staging.joinpath(*rel.parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                elif member.isfile():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    source = tf.extractfile(member)
                    if source is None:
                        raise ValueError(f"cannot read member {member.name!r} of {archive}")
                    with source, open(target, "wb") as out:
                        shutil.copyfileobj(source, out, _CHUNK)
                else:
                    raise ValueError(
                        f"unsafe archive {archive}: member {member.name!r} is a link or special "
                        "file; only files and folders are extracted"
                    )
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise ValueError(f"archive {archive} is corrupt or truncated: {exc}") from None


def _extract_zip(archive: Path, staging: Path) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"cannot open archive {archive}: {exc}") from None
    with zf:
        try:
            for info in zf.infolist():
                rel = _safe_relpath(info.filename, archive)
                if rel is None:
                    continue
                mode = (info.external_attr >> 16) & 0o170000
                if mode not in (0, 0o100000, 0o040000):
                    raise ValueError(
                        f"unsafe archive {archive}: member {info.filename!r} is a link or "
                        "special file; only files and folders are extracted"
                    )
                target = staging.joinpath(*rel.parts)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out, _CHUNK)
        except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as exc:
            raise ValueError(f"archive {archive} is corrupt or truncated: {exc}") from None
