"""Resumable verified downloads (against a loopback server) and safe archive extraction."""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time
import tracemalloc
import zipfile
from pathlib import Path

import pytest
from fixtures_http import FileServer

from vlmcompress.data.download import (
    MAX_SPAN_BYTES, ArchiveLimitError, ArchiveLimits, ChecksumError, DownloadError, RangesUnsupported,
    RemoteZipFile, UnsafeArchiveError, copy_member, default_deadline_s, download, extract, fetch_range,
    member_names, member_spans, part_path, read_member,
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



# --- download: deadline, caps, untrusted answers --------------------------------------

N = len(DATA)


def _one_line(err: pytest.ExceptionInfo, url: str) -> None:
    assert "\n" not in str(err.value) and url in str(err.value)


def test_default_deadline_grows_with_size():
    assert default_deadline_s(60.0, 0) == 600.0
    assert default_deadline_s(60.0, 10**8) == 600.0 + 1000.0
    assert default_deadline_s(60.0, None) > default_deadline_s(60.0, 10**8)


def test_trickling_body_stops_at_the_deadline(srv, tmp_path):
    srv.trickle_s["/f.bin"] = 0.05                 # a byte well within every socket timeout
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match=r"not complete within the 1 s deadline") as err:
        download(srv.url("/f.bin"), tmp_path / "f.bin", deadline_s=1.0, **FAST)
    assert time.monotonic() - t0 < 2.0
    _one_line(err, srv.url("/f.bin"))
    assert list(tmp_path.iterdir()) == []          # no checksum, so nothing worth resuming is kept


def test_trickling_headers_stop_at_the_deadline(srv, tmp_path):
    srv.slow_headers_s["/f.bin"] = 0.05            # urlopen itself would block for ~30 s
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match="deadline"):
        download(srv.url("/f.bin"), tmp_path / "f.bin", deadline_s=1.0, **FAST)
    assert time.monotonic() - t0 < 2.0


def test_deadline_spans_all_attempts(srv, tmp_path):
    srv.status["/f.bin"] = [503] * 100
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match="deadline"):
        download(srv.url("/f.bin"), tmp_path / "f.bin", timeout_s=1.0, retries=50, progress=False,
                 backoff_s=0.1, deadline_s=1.0)
    assert time.monotonic() - t0 < 1.5 and len(srv.log) < 10


def test_deadline_keeps_a_verifiable_part_for_later(srv, tmp_path):
    srv.trickle_s["/f.bin"] = 0.02
    dest = tmp_path / "f.bin"
    with pytest.raises(DownloadError, match="deadline"):
        download(srv.url("/f.bin"), dest, sha256=SHA, deadline_s=0.5, **FAST)
    got = part_path(dest).read_bytes()
    assert got and DATA.startswith(got) and not dest.exists()


def test_endless_body_is_cut_at_the_expected_size(srv, tmp_path):
    srv.endless.add("/f.bin")
    with pytest.raises(ChecksumError, match=f"more than the expected {N} bytes") as err:
        download(srv.url("/f.bin"), tmp_path / "f.bin", size=N, **FAST)
    _one_line(err, srv.url("/f.bin"))
    assert list(tmp_path.iterdir()) == [] and len(srv.log) == 1


def test_endless_body_is_cut_at_max_bytes(srv, tmp_path):
    srv.endless.add("/f.bin")
    with pytest.raises(DownloadError, match=r"exceeds the 1048576-byte cap \(max_bytes\)"):
        download(srv.url("/f.bin"), tmp_path / "f.bin", max_bytes=1 << 20, **FAST)
    assert list(tmp_path.iterdir()) == []


def test_announced_length_over_max_bytes_fails_before_the_body(srv, tmp_path):
    with pytest.raises(DownloadError, match=f"announces {N} bytes, more than the 1000-byte cap"):
        download(srv.url("/f.bin"), tmp_path / "f.bin", max_bytes=1000, **FAST)
    assert list(tmp_path.iterdir()) == [] and len(srv.log) == 1


@pytest.mark.parametrize("announced", [N + 1000, N - 1000])
def test_content_length_that_disagrees_with_the_size_fails_fast(srv, tmp_path, announced):
    srv.respond["/f.bin"] = lambda rng: (200, {"Content-Length": str(announced)}, DATA)
    with pytest.raises(ChecksumError, match=f"server announces {announced} bytes, expected {N}"):
        download(srv.url("/f.bin"), tmp_path / "f.bin", size=N, **FAST)
    assert list(tmp_path.iterdir()) == [] and len(srv.log) == 1


def test_content_length_larger_than_the_body_is_never_published(srv, tmp_path):
    srv.respond["/f.bin"] = lambda rng: (200, {"Content-Length": str(N + 1000)}, DATA)
    with pytest.raises(DownloadError, match=f"failed after 3 attempts .*closed after {N} of {N + 1000} bytes"):
        download(srv.url("/f.bin"), tmp_path / "f.bin", **FAST)
    assert list(tmp_path.iterdir()) == []


def test_content_length_smaller_than_the_body_fails_the_hash(srv, tmp_path):
    srv.respond["/f.bin"] = lambda rng: (200, {"Content-Length": str(N - 1000)}, DATA)
    with pytest.raises(ChecksumError, match="SHA-256 mismatch"):
        download(srv.url("/f.bin"), tmp_path / "f.bin", sha256=SHA, **FAST)
    assert list(tmp_path.iterdir()) == []


def test_stale_part_without_checksum_is_discarded(srv, tmp_path):
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(b"foreign bytes of another file")
    assert download(srv.url("/f.bin"), dest, **FAST).read_bytes() == DATA
    assert srv.log == [("/f.bin", None)]


def test_server_ignoring_range_overwrites_a_stale_part(srv, tmp_path):
    srv.ignore_range = True
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(b"x" * 777)
    assert download(srv.url("/f.bin"), dest, sha256=SHA, **FAST).read_bytes() == DATA
    assert srv.log == [("/f.bin", "bytes=777-")]


@pytest.mark.parametrize("content_range", [
    f"bytes 0-{N - 1}/{N}",            # another start than asked
    f"bytes 777-999/{N}",              # not up to the end
    f"bytes 777-{N - 1}/{N + 5}",      # another file length than the expected size
    "bytes garbage",
])
def test_wrong_content_range_is_never_appended(srv, tmp_path, content_range):
    def answer(rng):
        if rng:
            return 206, {"Content-Range": content_range, "Content-Length": str(N - 777)}, DATA[777:]
        return 200, {"Content-Length": str(N)}, DATA
    srv.respond["/f.bin"] = answer
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(DATA[:777])
    assert download(srv.url("/f.bin"), dest, size=N, **FAST).read_bytes() == DATA
    assert srv.log == [("/f.bin", "bytes=777-"), ("/f.bin", None)]


def test_partial_answer_to_a_whole_file_request_is_refused(srv, tmp_path):
    srv.respond["/f.bin"] = lambda rng: (206, {"Content-Range": f"bytes 0-99/{N}", "Content-Length": "100"},
                                         DATA[:100])
    with pytest.raises(DownloadError, match="failed after 3 attempts.*does not answer") as err:
        download(srv.url("/f.bin"), tmp_path / "f.bin", **FAST)
    _one_line(err, srv.url("/f.bin"))
    assert list(tmp_path.iterdir()) == []


def test_resume_sends_if_range_with_the_etag(srv, tmp_path):
    def answer(rng):
        if rng:
            return 206, {"Content-Range": f"bytes 1000-{N - 1}/{N}", "ETag": '"v1"'}, DATA[1000:]
        return 200, {"Content-Length": str(N), "ETag": '"v1"'}, DATA[:1000]   # dropped early
    srv.respond["/f.bin"] = answer
    assert download(srv.url("/f.bin"), tmp_path / "f.bin", **FAST).read_bytes() == DATA
    assert srv.log == [("/f.bin", None), ("/f.bin", "bytes=1000-")]
    assert "If-Range" not in srv.requests[0] and srv.requests[1]["If-Range"] == '"v1"'

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


# --- archive caps ----------------------------------------------------------------------

SMALL = ArchiveLimits(max_members=10, max_member_bytes=1 << 20, max_total_bytes=3 << 20, max_ratio=50.0,
                      ratio_after_bytes=256 << 10)


def _zip_bomb(path: Path, mib: int, name: str = "bomb.bin") -> Path:
    """A deflated member of ``mib`` MiB of zeros (~1000x), written in chunks."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open(name, "w") as fh:
            for _ in range(mib):
                fh.write(bytes(1 << 20))
    return path


def _no_leftovers(tmp_path: Path, *keep: str) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def test_zip_bomb_is_refused_by_default_limits_with_little_memory(tmp_path):
    arc = _zip_bomb(tmp_path / "b.zip", 64)
    assert arc.stat().st_size < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(ArchiveLimitError, match=r"b.zip: member 'bomb.bin' expands more than 200x"):
            read_member(arc, "bomb.bin")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 << 20                      # stops near ratio_after_bytes (8 MiB), not at 64 MiB
    with pytest.raises(ArchiveLimitError, match="max_ratio"):
        extract(arc, tmp_path / "out")
    _no_leftovers(tmp_path, "b.zip")


def test_member_over_the_size_cap_is_refused_from_its_header(tmp_path):
    arc = _zip(tmp_path / "a.zip", {"ok.txt": b"ok", "big.bin": os.urandom(2 << 20)})
    with pytest.raises(ArchiveLimitError, match=r"'big.bin' expands past 1048576 bytes \(max_member_bytes\)"):
        extract(arc, tmp_path / "out", limits=SMALL)
    with pytest.raises(ArchiveLimitError, match="max_member_bytes"):
        read_member(arc, "big.bin", limits=SMALL)
    assert read_member(arc, "ok.txt", limits=SMALL) == b"ok"
    _no_leftovers(tmp_path, "a.zip")


def test_total_cap_counts_bytes_actually_written(tmp_path):
    # Tar hard links claim size 0 in their headers but are written as full copies.
    blob = os.urandom(900 << 10)
    links = [_link(f"copy{i}", "blob.bin", tarfile.LNKTYPE) for i in range(5)]
    arc = _tar(tmp_path / "h.tar", [("blob.bin", blob), *links])
    with pytest.raises(ArchiveLimitError, match=r"h.tar: members expand past 3145728 bytes in total"):
        extract(arc, tmp_path / "out", limits=SMALL)
    _no_leftovers(tmp_path, "h.tar")
    assert (extract(arc, tmp_path / "out", limits=ArchiveLimits()) / "copy4").read_bytes() == blob


def test_tar_gz_bomb_is_refused_by_the_whole_archive_ratio(tmp_path):
    arc = _tar(tmp_path / "z.tar.gz", [("zeros.bin", bytes(4 << 20))])
    with pytest.raises(ArchiveLimitError, match="more than 50x the archive's size"):
        extract(arc, tmp_path / "out", limits=ArchiveLimits(max_ratio=50.0, ratio_after_bytes=1 << 20))
    _no_leftovers(tmp_path, "z.tar.gz")


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_member_count_cap(tmp_path, kind):
    members = {f"f{i}.txt": b"x" for i in range(11)}
    arc = (_zip(tmp_path / "m.zip", members) if kind == "zip"
           else _tar(tmp_path / "m.tar.gz", list(members.items())))
    with pytest.raises(ArchiveLimitError, match=r"more than 10 members \(max_members\)"):
        extract(arc, tmp_path / "out", limits=SMALL)
    with pytest.raises(ArchiveLimitError, match="max_members"):
        read_member(arc, "f0.txt", limits=SMALL)
    _no_leftovers(tmp_path, arc.name)


def test_zip_header_understating_the_size_is_not_trusted(tmp_path):
    arc = _zip_bomb(tmp_path / "lie.zip", 4, name="x.bin")
    raw = bytearray(arc.read_bytes())
    # Claim 100 bytes in both the local header and the central directory.
    for sig, off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        pos = raw.find(sig)
        raw[pos + off:pos + off + 4] = (100).to_bytes(4, "little")
    arc.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="lie.zip"):
        read_member(arc, "x.bin")
    with pytest.raises(ValueError, match="lie.zip"):
        extract(arc, tmp_path / "out")
    _no_leftovers(tmp_path, "lie.zip")


def test_zip_symlink_with_a_huge_target_is_refused(tmp_path):
    arc = tmp_path / "l.zip"
    with zipfile.ZipFile(arc, "w", zipfile.ZIP_DEFLATED) as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, b"a" * (1 << 20))
    with pytest.raises(UnsafeArchiveError, match="target longer than 4096 bytes"):
        member_names(arc)


# --- members of a remote zip by range requests ------------------------------------------

RANGE = {"timeout_s": 2.0, "retries": 2, "backoff_s": 0.0}


def _stored_zip(n: int, size: int = 200_000) -> tuple[bytes, dict[str, bytes]]:
    """A zip of ``n`` incompressible members (stored): spans and byte counts are exact."""
    members = {f"d/{k:03d}.bin": os.urandom(size) for k in range(n)}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue(), members


def test_fetch_range_exact_suffix_and_short_file(srv):
    body, first, total = fetch_range(srv.url("/f.bin"), 10, 19, **RANGE)
    assert (body, first, total) == (DATA[10:20], 10, len(DATA))
    body, first, _ = fetch_range(srv.url("/f.bin"), -100, None, **RANGE)
    assert (body, first) == (DATA[-100:], len(DATA) - 100)
    srv.files["/s.bin"] = b"tiny"                             # shorter than the suffix asked for
    assert fetch_range(srv.url("/s.bin"), -100, None, **RANGE) == (b"tiny", 0, 4)
    assert srv.log[-1] == ("/s.bin", "bytes=-100")


def test_fetch_range_refuses_whole_file_answers_without_reading_them(srv):
    srv.ignore_range = True
    with pytest.raises(RangesUnsupported, match="HTTP 200"):
        fetch_range(srv.url("/f.bin"), 0, 9, **RANGE)
    srv.files["/e.bin"] = b""
    srv.endless.add("/e.bin")                                 # a 200 whose body never ends
    t = time.monotonic()
    with pytest.raises(RangesUnsupported):
        fetch_range(srv.url("/e.bin"), 0, 9, **RANGE)
    assert time.monotonic() - t < 2


@pytest.mark.parametrize("header", ["bytes 0-9/100", "bytes 10-29/100", "bytes 10-19/*", "garbage"])
def test_fetch_range_refuses_another_range(srv, header):
    srv.respond["/x.bin"] = lambda rng: (206, {"Content-Range": header, "Content-Length": "10"}, b"0" * 10)
    with pytest.raises(RangesUnsupported, match=r"Content-Range|does not answer"):
        fetch_range(srv.url("/x.bin"), 10, 19, **RANGE)


def test_fetch_range_retries_a_drop_and_refuses_a_changed_file(srv):
    srv.drop_after["/f.bin"] = [5]
    assert fetch_range(srv.url("/f.bin"), 100, 199, **RANGE)[0] == DATA[100:200]
    assert len(srv.log) == 2
    with pytest.raises(DownloadError, match="the file changed"):
        fetch_range(srv.url("/f.bin"), 0, 9, total=len(DATA) + 1, **RANGE)


def test_fetch_range_deadline_ends_a_trickle(srv):
    srv.trickle_s["/f.bin"] = 0.05
    t = time.monotonic()
    with pytest.raises(DownloadError, match="deadline"):
        fetch_range(srv.url("/f.bin"), 0, 999, deadline_s=0.5, **{**RANGE, "retries": 5})
    assert time.monotonic() - t < 3


def test_fetch_range_bounds():
    with pytest.raises(ValueError, match="bad range"):
        fetch_range("http://127.0.0.1:9/x", 0, MAX_SPAN_BYTES, **RANGE)


def test_remote_zip_reads_only_the_chosen_members(tmp_path):
    data, members = _stored_zip(12)
    with FileServer({"/a.zip": data}) as srv:
        remote = RemoteZipFile(srv.url("/a.zip"), **RANGE)
        with zipfile.ZipFile(remote) as zf:
            assert sorted(zf.namelist()) == sorted(members)
            chosen = [zf.getinfo("d/003.bin"), zf.getinfo("d/004.bin"), zf.getinfo("d/009.bin")]
            groups = member_spans(zf, chosen)
            assert [[i.filename for i in g[2]] for g in groups] == [["d/003.bin", "d/004.bin"], ["d/009.bin"]]
            for start, end, infos in groups:
                remote.load(start, end)
                for info in infos:
                    copy_member(zf, info, tmp_path / info.filename, "a.zip")
        assert remote.requests == 3                              # tail + directory, then two spans
        got = sum(int(r.split("-")[1]) - int(r.split("=")[1].split("-")[0]) + 1
                  for _, r in srv.log if not r.startswith("bytes=-"))
    for name in ("d/003.bin", "d/004.bin", "d/009.bin"):
        assert (tmp_path / name).read_bytes() == members[name]
    assert got < 3.2 * 200_000 and got < len(data) / 3          # the chosen members, not the archive


def test_remote_zip_member_with_a_bad_crc_is_refused_and_leaves_nothing(tmp_path):
    data, members = _stored_zip(2, size=1000)
    raw = bytearray(data)
    raw[raw.find(members["d/001.bin"]) + 10] ^= 0xFF           # one flipped byte in the member's data
    with FileServer({"/a.zip": bytes(raw)}) as srv:
        remote = RemoteZipFile(srv.url("/a.zip"), **RANGE)
        with zipfile.ZipFile(remote) as zf, pytest.raises(ValueError, match=r"corrupt member 'd/001.bin'"):
            copy_member(zf, zf.getinfo("d/001.bin"), tmp_path / "x.bin", "a.zip")
    assert list(tmp_path.iterdir()) == []


def test_remote_zip_bomb_member_is_capped(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("d/bomb.bin", b"\0" * (64 << 20))
    with FileServer({"/b.zip": buf.getvalue()}) as srv:
        remote = RemoteZipFile(srv.url("/b.zip"), **RANGE)
        with zipfile.ZipFile(remote) as zf, pytest.raises(ArchiveLimitError, match="max_ratio"):
            copy_member(zf, zf.getinfo("d/bomb.bin"), tmp_path / "x.bin", "b.zip")
    assert list(tmp_path.iterdir()) == []


def test_remote_zip_directory_claiming_a_huge_size_is_refused(tmp_path):
    data, _ = _stored_zip(40, size=4000)
    raw = bytearray(data)
    eocd = raw.rfind(b"PK\x05\x06")
    cd_size = int.from_bytes(raw[eocd + 12:eocd + 16], "little")
    with FileServer({"/h.zip": bytes(raw)}) as srv:
        remote = RemoteZipFile(srv.url("/h.zip"), max_read=cd_size - 1, **RANGE)    # a directory over the cap
        with pytest.raises(ValueError, match=f"refused a read of {cd_size} bytes"):
            zipfile.ZipFile(remote)
        raw[eocd + 12:eocd + 16] = (MAX_SPAN_BYTES + 1).to_bytes(4, "little")   # one claiming 64 MiB ...
        raw[eocd + 16:eocd + 20] = (0).to_bytes(4, "little")                     # ... at offset 0
        srv.files["/h.zip"] = bytes(raw)
        srv.log.clear()
        remote = RemoteZipFile(srv.url("/h.zip"), **RANGE)
        with pytest.raises((ValueError, zipfile.BadZipFile)) as err:
            zipfile.ZipFile(remote)
        assert len(srv.log) == 1 and "\n" not in str(err.value)                  # nothing more was asked
