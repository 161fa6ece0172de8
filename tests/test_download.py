"""Tests of locallearn.data.download, served from a local HTTP server (no internet)."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from locallearn.data import download as D
from locallearn.data.download import download, extract, fetch, verify
from locallearn.data.images import load_images

PAYLOAD = bytes(np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8))
MD5 = hashlib.md5(PAYLOAD).hexdigest()
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


@dataclass
class Server:
    """A local HTTP server; ``files`` maps URL paths to bytes, behaviour set per test."""

    base: str
    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[dict] = field(default_factory=list)
    honour_range: bool = True
    cut_after: int | None = None  # close the connection after this many body bytes
    cut_times: int = 0  # how many responses are cut (then serve normally)
    bytes_sent: int = 0

    def url(self, path: str) -> str:
        return self.base + path


@pytest.fixture
def server() -> Iterator[Server]:
    state: Server

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output clean
            pass

        def do_HEAD(self):
            if self.path not in state.files:
                self.send_error(404, "Not Found")
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(state.files[self.path])))
            self.end_headers()

        def do_GET(self):
            state.requests.append({"path": self.path, "range": self.headers.get("Range")})
            data = state.files.get(self.path)
            if data is None:
                self.send_error(404, "Not Found")
                return
            start = 0
            rng = self.headers.get("Range")
            status = 200
            if rng and state.honour_range:
                start = int(rng.removeprefix("bytes=").split("-")[0])
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            body = data[start:]
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if state.cut_after is not None and state.cut_times > 0:
                state.cut_times -= 1
                body = body[: state.cut_after]
                self.close_connection = True
            state.bytes_sent += len(body)  # counted before sending: the client may finish first
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state = Server(base=f"http://127.0.0.1:{httpd.server_address[1]}")
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture(autouse=True)
def no_retry_delay(monkeypatch):
    monkeypatch.setattr(D, "RETRY_DELAY_S", 0.0)


# ----------------------------------------------------------------------------------------------
# fetch


def test_fetch_whole_file(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    dest = fetch(server.url("/data.bin"), tmp_path / "data.bin", md5=MD5, sha256=SHA256,
                 progress=False)
    assert dest == tmp_path / "data.bin" and dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "data.bin.part").exists()
    assert server.requests[0]["range"] is None


def test_fetch_resumes_a_partial_file(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD[:123_456])
    fetch(server.url("/data.bin"), tmp_path / "data.bin", md5=MD5, progress=False)
    assert server.requests[0]["range"] == "bytes=123456-"
    assert server.bytes_sent == len(PAYLOAD) - 123_456  # only the missing bytes travelled
    assert hashlib.sha256((tmp_path / "data.bin").read_bytes()).hexdigest() == SHA256


def test_fetch_restarts_when_server_ignores_range(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    server.honour_range = False
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD[:1000])
    fetch(server.url("/data.bin"), tmp_path / "data.bin", md5=MD5, progress=False)
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD


def test_fetch_complete_part_file_gets_416(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD)
    fetch(server.url("/data.bin"), tmp_path / "data.bin", md5=MD5, progress=False)
    assert server.bytes_sent == 0 and (tmp_path / "data.bin").read_bytes() == PAYLOAD


def test_fetch_resumes_after_a_dropped_connection(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    server.cut_after, server.cut_times = 100_000, 1
    fetch(server.url("/data.bin"), tmp_path / "data.bin", md5=MD5, progress=False)
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD
    assert [r["range"] for r in server.requests] == [None, "bytes=100000-"]


def test_fetch_reports_truncation_and_keeps_part(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    server.cut_after, server.cut_times = 50_000, 1
    with pytest.raises(RuntimeError, match="bytes kept in .*data.bin.part, call again") as err:
        fetch(server.url("/data.bin"), tmp_path / "data.bin", md5=MD5, progress=False,
              retries=0)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "data.bin").exists()
    assert (tmp_path / "data.bin.part").read_bytes() == PAYLOAD[:50_000]
    # the next call resumes and completes
    fetch(server.url("/data.bin"), tmp_path / "data.bin", md5=MD5, progress=False)
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD


def test_fetch_detects_corrupt_download(server, tmp_path):
    corrupt = bytearray(PAYLOAD)
    corrupt[1000] ^= 0xFF
    server.files["/data.bin"] = bytes(corrupt)
    with pytest.raises(ValueError, match=rf"MD5 hash of downloaded file \(data.bin\) does not "
                       rf"match the known hash: expected md5:{MD5}") as err:
        fetch(server.url("/data.bin"), tmp_path / "data.bin", md5=MD5, progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "data.bin").exists() and not (tmp_path / "data.bin.part").exists()


def test_fetch_detects_truncated_file_on_server(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD[:-10]  # a complete response of a truncated file
    with pytest.raises(ValueError, match="SHA256 hash of downloaded file"):
        fetch(server.url("/data.bin"), tmp_path / "data.bin", sha256=SHA256, progress=False)
    assert not (tmp_path / "data.bin").exists()


def test_fetch_detects_corrupt_partial_file(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    (tmp_path / "data.bin.part").write_bytes(b"\0" * 5000)  # wrong bytes from an earlier run
    with pytest.raises(ValueError, match="does not match the known hash"):
        fetch(server.url("/data.bin"), tmp_path / "data.bin", md5=MD5, progress=False)
    assert not (tmp_path / "data.bin.part").exists()
    fetch(server.url("/data.bin"), tmp_path / "data.bin", md5=MD5, progress=False)
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD


def test_fetch_verifies_existing_destination(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    dest = tmp_path / "data.bin"
    dest.write_bytes(PAYLOAD)
    fetch(server.url("/data.bin"), dest, md5=MD5, progress=False)
    assert server.requests == []  # nothing downloaded
    dest.write_bytes(PAYLOAD[:-1])  # a stale or damaged copy is never used: fetched anew
    fetch(server.url("/data.bin"), dest, md5=MD5, progress=False)
    assert len(server.requests) == 1 and dest.read_bytes() == PAYLOAD


def test_fetch_checks_both_checksums(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    with pytest.raises(ValueError, match="md5 checksum mismatch"):
        fetch(server.url("/data.bin"), tmp_path / "data.bin", md5="0" * 32, sha256=SHA256,
              progress=False)


def test_downloader_reports_availability(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    get = D.ResumableDownload(tmp_path / "x.part", progress=False, timeout=2)
    assert get(server.url("/data.bin"), None, None, check_only=True)
    assert not get("http://127.0.0.1:9/x.bin", None, None, check_only=True)
    assert not get((tmp_path / "none.bin").as_uri(), None, None, check_only=True)


def test_fetch_http_error_and_bad_scheme(server, tmp_path):
    with pytest.raises(RuntimeError, match="HTTP 404"):
        fetch(server.url("/missing.bin"), tmp_path / "x.bin", progress=False)
    with pytest.raises(ValueError, match="unsupported URL scheme"):
        fetch("ftp://example.org/x.bin", tmp_path / "x.bin", progress=False)


def test_fetch_unreachable_host_is_runtime_error(tmp_path):
    with pytest.raises(RuntimeError, match="failed after 1 attempts: cannot connect"):
        fetch("http://127.0.0.1:9/x.bin", tmp_path / "x.bin", progress=False, retries=0,
              timeout=2)


def test_fetch_file_url_and_resume(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(PAYLOAD)
    fetch(src.as_uri(), tmp_path / "a.bin", md5=MD5, progress=False)
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD
    (tmp_path / "b.bin.part").write_bytes(PAYLOAD[:777])
    fetch(src.as_uri(), tmp_path / "b.bin", sha256=SHA256, progress=False)
    assert (tmp_path / "b.bin").read_bytes() == PAYLOAD
    with pytest.raises(RuntimeError, match="is not a file"):
        fetch((tmp_path / "none.bin").as_uri(), tmp_path / "c.bin", progress=False)


def test_verify(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(PAYLOAD)
    verify(p)
    verify(p, md5=MD5.upper(), sha256=SHA256)
    with pytest.raises(ValueError, match="md5 checksum mismatch"):
        verify(p, md5="0" * 32)


# ----------------------------------------------------------------------------------------------
# extract


def _tar_gz(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
    return buf.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_extract_round_trip(tmp_path, kind):
    members = {"top/a.txt": b"alpha", "top/sub/b.bin": PAYLOAD[:100], "top/./c.txt": b"c"}
    archive = tmp_path / f"arch.{kind}"
    archive.write_bytes(_tar_gz(members) if kind == "tar.gz" else _zip(members))
    dest = tmp_path / "out"
    created = extract(archive, dest)
    assert created == [dest / "top"]
    assert (dest / "top/a.txt").read_bytes() == b"alpha"
    assert (dest / "top/sub/b.bin").read_bytes() == PAYLOAD[:100]
    assert (dest / "top/c.txt").read_bytes() == b"c"
    assert sorted(p.name for p in dest.iterdir()) == ["top"]  # no staging folder left


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
@pytest.mark.parametrize("bad", ["../evil.txt", "top/../../evil.txt", "/tmp/evil.txt"])
def test_extract_refuses_escaping_paths(tmp_path, kind, bad):
    members = {"top/ok.txt": b"ok", bad: b"evil"}
    archive = tmp_path / f"arch.{kind}"
    archive.write_bytes(_tar_gz(members) if kind == "tar.gz" else _zip(members))
    dest = tmp_path / "a" / "b" / "out"
    with pytest.raises(ValueError, match="unsafe archive"):
        extract(archive, dest)
    assert not (tmp_path / "a" / "b" / "evil.txt").exists()
    assert not (tmp_path / "a" / "evil.txt").exists()
    assert list(dest.iterdir()) == []  # nothing was moved into place


def test_extract_refuses_links(tmp_path):
    archive = tmp_path / "arch.tar.gz"
    archive.write_bytes(_tar_gz({"top/ok.txt": b"ok"}, links={"top/link": "/etc/passwd"}))
    with pytest.raises(ValueError, match="link or special file"):
        extract(archive, tmp_path / "out")


def test_extract_corrupt_archive(tmp_path):
    good = _tar_gz({"top/a.bin": PAYLOAD})
    archive = tmp_path / "arch.tar.gz"
    archive.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        extract(archive, tmp_path / "out")
    archive2 = tmp_path / "arch.rar"
    archive2.write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown archive type"):
        extract(archive2, tmp_path / "out")


# ----------------------------------------------------------------------------------------------
# download


def _mini_cifar_archive() -> bytes:
    rng = np.random.default_rng(5)
    members = {}
    for fname in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, 4)]}
        members[f"cifar-10-batches-py/{fname}"] = pickle.dumps(batch, protocol=2)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
             b"ship", b"truck"]
    members["cifar-10-batches-py/batches.meta"] = pickle.dumps({b"label_names": names})
    return _tar_gz(members)


def test_download_fetches_verifies_and_extracts(server, tmp_path, monkeypatch):
    archive = _mini_cifar_archive()
    server.files["/cifar-10-python.tar.gz"] = archive
    res = D.Resource("cifar10", server.url("/cifar-10-python.tar.gz"), "cifar-10-python.tar.gz",
                     hashlib.md5(archive).hexdigest(), "cifar-10-batches-py")
    monkeypatch.setitem(D.RESOURCES, "cifar10", res)
    root = tmp_path / "data"
    path = download("cifar10", root, progress=False)
    assert path == root / "cifar-10-batches-py" and (path / "test_batch").is_file()
    assert load_images("cifar10", root, "train").images.shape == (20, 3, 32, 32)
    n_requests = len(server.requests)
    assert download("CIFAR-10", root, progress=False) == path  # already there: no request
    assert len(server.requests) == n_requests


def test_download_never_extracts_a_corrupt_archive(server, tmp_path, monkeypatch):
    archive = _mini_cifar_archive()
    server.files["/cifar-10-python.tar.gz"] = archive[:-100]
    res = D.Resource("cifar10", server.url("/cifar-10-python.tar.gz"), "cifar-10-python.tar.gz",
                     hashlib.md5(archive).hexdigest(), "cifar-10-batches-py")
    monkeypatch.setitem(D.RESOURCES, "cifar10", res)
    with pytest.raises(ValueError, match="does not match the known hash"):
        download("cifar10", tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_download_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="no download for dataset 'folder'; downloadable: cifar10"):
        download("folder", tmp_path)


#: The archives' checksums as the datasets' official pages publish them (facts from outside
#: the code, so a typo in ``RESOURCES`` fails here).
PUBLISHED_MD5 = {
    "cifar10": "c58f30108f718f92721af3b95e74349a",
    "stl10": "91f7769df0f17e558f3565bffb0c7dfb",
    "tiny-imagenet": "90528d7ca1a48142e341f4ef8d21d0de",
}


@pytest.mark.parametrize("alias, key", [("CIFAR-10", "cifar10"), ("stl_10", "stl10"),
                                        ("tiny-imagenet-200", "tiny-imagenet")])
def test_download_asks_for_the_official_archive_and_checksum(tmp_path, monkeypatch, alias, key):
    asked = []

    def fake_fetch(url, dest, md5=None, progress=True, **kwargs):
        asked.append((url, Path(dest).name, md5))
        return Path(dest)

    def fake_extract(archive, root):
        (Path(root) / D.RESOURCES[key].folder).mkdir()

    monkeypatch.setattr(D, "fetch", fake_fetch)
    monkeypatch.setattr(D, "extract", fake_extract)
    download(alias, tmp_path, progress=False)
    (url, name, md5), = asked
    assert md5 == PUBLISHED_MD5[key]
    assert url.startswith(("https://", "http://")) and url.rsplit("/", 1)[1] == name
    assert set(D.RESOURCES) == set(PUBLISHED_MD5)
