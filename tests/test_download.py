"""Resumable verified downloads (against a loopback server) and safe archive extraction."""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from fixtures_http import FileServer

from vlmcompress.data.download import (
    ChecksumError, DownloadError, UnsafeArchiveError, download, extract, member_names, part_path,
    read_member,
)

DATA = os.urandom(3 * (1 << 20) + 12345)        # > 3 chunks, not a multiple of the chunk size
SHA = hashlib.sha256(DATA).hexdigest()
FAST = {"timeout_s": 2.0, "retries": 2, "progress": False, "backoff_s": 0.0}


@pytest.fixture
def srv():
    with FileServer({"/f.bin": DATA}) as state:
        yield state


# --- download ------------------------------------------------------------------------

def test_full_download_verifies_and_reports_progress(srv, tmp_path, capsys):
    out = download(srv.url("/f.bin"), tmp_path / "sub" / "f.bin", sha256=SHA.upper(),
                   timeout_s=2.0, retries=0, progress=True)
    assert out.read_bytes() == DATA
    assert not part_path(out).exists()
    assert "100.0%" in capsys.readouterr().err


def test_existing_verified_file_is_not_downloaded_again(srv, tmp_path):
    dest = tmp_path / "f.bin"
    download(srv.url("/f.bin"), dest, sha256=SHA, **FAST)
    n = len(srv.log)
    download(srv.url("/f.bin"), dest, sha256=SHA, **FAST)
    assert len(srv.log) == n


def test_existing_corrupt_file_is_replaced(srv, tmp_path):
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"junk")
    download(srv.url("/f.bin"), dest, size=len(DATA), **FAST)
    assert dest.read_bytes() == DATA


def test_interrupted_download_resumes_with_range(srv, tmp_path):
    srv.drop_after["/f.bin"] = [1_500_000]
    dest = download(srv.url("/f.bin"), tmp_path / "f.bin", sha256=SHA, **FAST)
    assert dest.read_bytes() == DATA
    assert srv.log == [("/f.bin", None), ("/f.bin", "bytes=1500000-")]


def test_part_file_from_an_earlier_run_is_resumed(srv, tmp_path):
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(DATA[:777])
    download(srv.url("/f.bin"), dest, sha256=SHA, **FAST)
    assert dest.read_bytes() == DATA and srv.log == [("/f.bin", "bytes=777-")]


def test_server_ignoring_range_restarts_cleanly(srv, tmp_path):
    srv.drop_after["/f.bin"] = [1_000_000]
    srv.ignore_range = True
    dest = download(srv.url("/f.bin"), tmp_path / "f.bin", size=len(DATA), **FAST)
    assert dest.read_bytes() == DATA
    assert len(srv.log) == 2 and srv.log[1][1] == "bytes=1000000-"


def test_complete_part_file_and_416_is_accepted(srv, tmp_path):
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(DATA)
    download(srv.url("/f.bin"), dest, sha256=SHA, **FAST)
    assert dest.read_bytes() == DATA


def test_part_longer_than_expected_size_is_discarded(srv, tmp_path):
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(DATA + b"extra")
    download(srv.url("/f.bin"), dest, size=len(DATA), **FAST)
    assert dest.read_bytes() == DATA and srv.log == [("/f.bin", None)]


@pytest.mark.parametrize("kw", [{"sha256": "0" * 64}, {"size": len(DATA) + 1}])
def test_checksum_mismatch_leaves_no_file(srv, tmp_path, kw):
    dest = tmp_path / "f.bin"
    with pytest.raises(ChecksumError, match="mismatch") as err:
        download(srv.url("/f.bin"), dest, **kw, **FAST)
    assert "\n" not in str(err.value) and srv.url("/f.bin") in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_retries_are_bounded(srv, tmp_path):
    srv.status["/f.bin"] = [503] * 10
    with pytest.raises(DownloadError, match="failed after 3 attempts.*503"):
        download(srv.url("/f.bin"), tmp_path / "f.bin", **FAST)
    assert len(srv.log) == 3


def test_transient_error_then_success(srv, tmp_path):
    srv.status["/f.bin"] = [500]
    assert download(srv.url("/f.bin"), tmp_path / "f.bin", sha256=SHA, **FAST).read_bytes() == DATA


def test_not_found_fails_at_once(srv, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(srv.url("/missing.bin"), tmp_path / "m.bin", **FAST)
    assert len(srv.log) == 1 and not (tmp_path / "m.bin").exists()


def test_stalled_server_times_out_instead_of_hanging(srv, tmp_path):
    srv.stall_s["/f.bin"] = 30.0
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match="failed after 2 attempts"):
        download(srv.url("/f.bin"), tmp_path / "f.bin", timeout_s=0.3, retries=1, progress=False,
                 backoff_s=0.0)
    assert time.monotonic() - t0 < 5


def test_refused_connection_is_an_error(tmp_path):
    with FileServer({}) as state:
        url = state.url("/x")
    with pytest.raises(DownloadError, match="failed after 1 attempts"):
        download(url, tmp_path / "x", timeout_s=1.0, retries=0, progress=False)


def test_only_http_urls(tmp_path):
    with pytest.raises(ValueError, match="only http"):
        download("file:///etc/passwd", tmp_path / "p", timeout_s=1, retries=0)


# --- archives ------------------------------------------------------------------------

def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
    return path


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def test_extract_zip_with_filter(tmp_path):
    arc = _zip(tmp_path / "a.zip", {"top/a.txt": b"a", "top/sub/b.txt": b"b", "top/c.json": b"{}"})
    out = extract(arc, tmp_path / "out", lambda n: n.endswith(".txt"))
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["top/a.txt", "top/sub/b.txt"]
    assert (out / "top/sub/b.txt").read_bytes() == b"b"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp left


def test_extract_replaces_existing_folder_and_keeps_inside_links(tmp_path):
    arc = _tar(tmp_path / "a.tar.gz", [("d/x.txt", b"x"), _link("d/l", "x.txt"),
                                       _link("d/h", "d/x.txt", tarfile.LNKTYPE)])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    out = extract(arc, tmp_path / "out")
    assert not (out / "old.txt").exists()
    assert (out / "d/l").is_symlink() and (out / "d/l").read_bytes() == b"x"
    assert (out / "d/h").read_bytes() == b"x" and not (out / "d/h").is_symlink()


@pytest.mark.parametrize("name", ["../evil.txt", "a/../../evil.txt", "/abs/evil.txt", "..\\evil.txt",
                                  "C:/evil.txt"])
def test_zip_path_traversal_is_refused(tmp_path, name):
    arc = _zip(tmp_path / "bad.zip", {"ok.txt": b"fine", name: b"pwned"})
    with pytest.raises(UnsafeArchiveError, match="bad.zip"):
        extract(arc, tmp_path / "x" / "out")
    assert not (tmp_path / "x" / "out").exists() and not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / "x" / "evil.txt").exists()


@pytest.mark.parametrize("member", [
    ("../evil.txt", b"p"), ("/tmp/evil.txt", b"p"),
    _link("l", "/etc/passwd"), _link("d/l", "../../etc"),
    _link("h", "../outside", tarfile.LNKTYPE), _link("dev", "", tarfile.CHRTYPE),
])
def test_tar_unsafe_members_are_refused(tmp_path, member):
    arc = _tar(tmp_path / "bad.tar.gz", [("ok.txt", b"ok"), member])
    with pytest.raises(UnsafeArchiveError):
        extract(arc, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_symlink_chain_escaping_is_refused(tmp_path):
    # Each link is harmless alone; together x -> y/../z with y -> . points outside.
    arc = _tar(tmp_path / "chain.tar", [_link("x", "y/../z"), _link("y", ".")])
    with pytest.raises(UnsafeArchiveError, match="resolves outside"):
        extract(arc, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_write_through_symlinked_dir_is_refused(tmp_path):
    # d -> y/../victim looks inside, but with y -> . it is a sibling of the output folder.
    arc = _tar(tmp_path / "w.tar", [_link("y", "."), _link("d", "y/../victim"), ("d/f.txt", b"p")])
    with pytest.raises(UnsafeArchiveError, match="'d/f.txt' resolves outside via a link"):
        extract(arc, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.tar"]       # nothing written, no temp left


def test_not_an_archive_and_corrupt_archive(tmp_path):
    (tmp_path / "a.zip").write_bytes(b"not an archive at all")
    with pytest.raises(ValueError, match="not a zip or tar"):
        extract(tmp_path / "a.zip", tmp_path / "out")
    good = _zip(tmp_path / "g.zip", {"f.txt": b"hello world" * 100})
    raw = bytearray(good.read_bytes())
    raw[40:60] = b"\xff" * 20                         # damage the member data
    (tmp_path / "c.zip").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="c.zip"):
        extract(tmp_path / "c.zip", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_read_member_by_trailing_path(tmp_path):
    arc = _zip(tmp_path / "a.zip", {"annotations/x.json": b"1", "annotations/y.json": b"2",
                                    "other/y.json": b"3"})
    assert read_member(arc, "x.json") == b"1"
    assert read_member(arc, "annotations/y.json") == b"2"
    with pytest.raises(ValueError, match="several members"):
        read_member(arc, "y.json")
    with pytest.raises(ValueError, match="no member named 'z.json'"):
        read_member(arc, "z.json")
    assert member_names(arc) == ["annotations/x.json", "annotations/y.json", "other/y.json"]
