"""`finetune data fetch` against a real HTTP server on 127.0.0.1 serving archives built here."""

import hashlib
import http.server
import io
import os
import re
import threading
import zipfile

import pytest

from pipeline.fetch import FetchError, fetch


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with HTTP Range support (what S3 and CDNs give a resuming client)."""

    requests: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404)
            return
        data = open(path, "rb").read()
        rng = self.headers.get("Range")
        type(self).requests.append((self.path, rng))
        start = int(re.match(r"bytes=(\d+)-", rng).group(1)) if rng else 0
        if start >= len(data) and rng:
            self.send_response(416)
            self.end_headers()
            return
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


@pytest.fixture
def server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    RangeHandler.requests = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: RangeHandler(*a, directory=str(served)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def make_zip(path, members: dict) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    path.write_bytes(buf.getvalue())
    return hashlib.sha1(buf.getvalue()).hexdigest()


MEMBERS = {f"hotdog/{split}/{c}/{i}.png": os.urandom(3000) for split in ("train", "test")
           for c in ("hotdog", "not-hotdog") for i in range(3)}


def test_fetch_then_cached(server, tmp_path):
    served, url = server
    sha1 = make_zip(served / "hotdog.zip", MEMBERS)
    dest = tmp_path / "data"
    folder = fetch(f"{url}/hotdog.zip", dest=str(dest), sha1=sha1)
    assert folder == str(dest / "hotdog")
    assert sorted(os.listdir(dest / "hotdog" / "train")) == ["hotdog", "not-hotdog"]
    n = len(RangeHandler.requests)
    assert fetch(f"{url}/hotdog.zip", dest=str(dest), sha1=sha1) == folder
    assert len(RangeHandler.requests) == n  # nothing downloaded the second time


def test_interrupted_download_resumes_with_range(server, tmp_path):
    served, url = server
    sha1 = make_zip(served / "hotdog.zip", MEMBERS)
    data = (served / "hotdog.zip").read_bytes()
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "hotdog.zip.part").write_bytes(data[:5000])  # what a killed download leaves
    fetch(f"{url}/hotdog.zip", dest=str(dest), sha1=sha1)
    assert RangeHandler.requests == [("/hotdog.zip", "bytes=5000-")]
    assert (dest / "hotdog.zip").read_bytes() == data


def test_wrong_sha1_refused_and_deleted(server, tmp_path):
    served, url = server
    make_zip(served / "hotdog.zip", MEMBERS)
    dest = tmp_path / "data"
    with pytest.raises(FetchError, match="does not match"):
        fetch(f"{url}/hotdog.zip", dest=str(dest), sha1="0" * 40)
    assert not (dest / "hotdog.zip").exists() and not (dest / "hotdog").exists()


def test_zip_slip_refused(server, tmp_path):
    served, url = server
    sha1 = make_zip(served / "evil.zip", {"evil/train/a/1.png": b"x", "../../escaped.txt": b"pwned"})
    with pytest.raises(FetchError, match="escapes"):
        fetch(f"{url}/evil.zip", dest=str(tmp_path / "data"), sha1=sha1)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path.parent / "escaped.txt").exists()


def test_unreachable_and_unknown(tmp_path):
    with pytest.raises(FetchError, match="cannot download"):
        fetch("http://127.0.0.1:9/x.zip", dest=str(tmp_path), sha1="0" * 40)
    with pytest.raises(FetchError, match="known: hotdog"):
        fetch("cats", dest=str(tmp_path))
