"""COCO 2017 val + VQAv2 val + RefCOCO preparation, from tiny archives with the official layout."""
from __future__ import annotations

import dataclasses
import io
import json
import pathlib
import pickle
import pickletools
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from fixtures_http import FileServer
from vlmcompress.data.download import ChecksumError, DownloadError
from paper_world import coco_file_name as _name
from paper_world import jpeg as _jpeg
from paper_world import pickle_py2 as _pickle_py2
from paper_world import train2017_archive
from paper_world import zip_bytes as _zip
from PIL import Image
from pycocotools.coco import COCO

from vlmcompress.data.config import DownloadParams, LocalParams, SourceParams
from vlmcompress.data import prepare_coco
from vlmcompress.data.prepare_coco import (
    PAPER_SOURCES, load_safe_pickle, prepare_from_archives, prepare_paper_data, select_image_ids,
)
from vlmcompress.data.records import annotation_path, load_split

VAL_IDS = [139, 285, 632, 724, 776, 785]          # COCO 2017 val ids (real ones, tiny fake images)
VQA_IDS = [139, 285, 724]                         # also val2014 images
REF_IDS = [632, 776]                              # also train2014 images


def _instances() -> dict:
    images = [{"id": i, "file_name": _name(i), "width": 30 + k, "height": 20 + k, "license": 1,
               "coco_url": f"http://images.cocodataset.org/val2017/{_name(i)}"} for k, i in enumerate(VAL_IDS)]
    anns = []
    for k, i in enumerate(VAL_IDS):
        for j in range(2):
            x, y = 2 + j, 3 + k
            anns.append({"id": 1000 * i + j, "image_id": i, "category_id": 1 + j, "iscrowd": 0,
                         "bbox": [x, y, 10.0, 8.0], "area": 80.0,
                         "segmentation": [[x, y, x + 10, y, x + 10, y + 8, x, y + 8]]})
    return {"info": {"year": 2017, "version": "1.0"}, "licenses": [{"id": 1, "name": "CC", "url": ""}],
            "images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "person", "supercategory": "person"},
                           {"id": 2, "name": "bicycle", "supercategory": "vehicle"}]}


def _captions(instances: dict) -> dict:
    return {"info": instances["info"], "licenses": instances["licenses"], "images": instances["images"],
            "annotations": [{"id": 10 * i + c, "image_id": i, "caption": f"A photo number {c} of {i}. "}
                            for i in VAL_IDS for c in range(2)]}


def _vqa() -> tuple[dict, dict]:
    ids = VQA_IDS + [42]                             # 42: a val2014 image that is not in val2017
    qs = [{"image_id": i, "question": f"What is in {i} ({n})?", "question_id": i * 1000 + n}
          for i in ids for n in range(3)]
    anns = [{"question_type": "what is", "multiple_choice_answer": f"thing{q['question_id']}",
             "answers": [{"answer": f"thing{q['question_id']}", "answer_confidence": "yes", "answer_id": a + 1}
                         for a in range(10)],
             "image_id": q["image_id"], "answer_type": "other", "question_id": q["question_id"]} for q in qs]
    meta = {"info": {"description": "VQA v2"}, "license": {"name": "CC"}, "data_type": "mscoco",
            "data_subtype": "val2014"}
    return ({**meta, "task_type": "Open-Ended", "questions": qs}, {**meta, "annotations": anns})


def _refs() -> list[dict]:
    def ref(ref_id, image_id, ann_id, split="val"):
        sents = [{"tokens": ["left", "one"], "raw": "Left one", "sent_id": ref_id * 10 + s,
                  "sent": f"left one {ref_id} {s}"} for s in range(2)]
        return {"sent_ids": [s["sent_id"] for s in sents], "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
                "ann_id": ann_id, "ref_id": ref_id, "image_id": image_id, "split": split,
                "sentences": sents, "category_id": 1}
    return [ref(1, 632, 632000), ref(2, 776, 776001, "testA"),
            ref(3, 9, 9000),                  # train2017 image: not in val2017
            ref(4, 632, 555),                 # ann id unknown in instances_val2017
            ref(5, 776, 632001)]              # ann of another image: inconsistent, dropped


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> dict[str, bytes]:
    """Bytes of the five official archives, in miniature."""
    inst = _instances()
    q, a = _vqa()
    return {
        "val2017.zip": _zip({f"val2017/{_name(i)}": _jpeg(30 + k, 20 + k, i) for k, i in enumerate(VAL_IDS)}),
        "annotations_trainval2017.zip": _zip({
            "annotations/instances_val2017.json": json.dumps(inst).encode(),
            "annotations/captions_val2017.json": json.dumps(_captions(inst)).encode(),
            "annotations/person_keypoints_val2017.json": b"{}",
            "annotations/instances_train2017.json": b"{}"}),
        "v2_Questions_Val_mscoco.zip": _zip({"v2_OpenEnded_mscoco_val2014_questions.json": json.dumps(q).encode()}),
        "v2_Annotations_Val_mscoco.zip": _zip({"v2_mscoco_val2014_annotations.json": json.dumps(a).encode()}),
        "refcoco.zip": _zip({"refcoco/refs(unc).p": _pickle_py2(_refs()),
                             "refcoco/refs(google).p": _pickle_py2([]),
                             "refcoco/instances.json": b'{"images": [], "annotations": []}'}),
    }


KEY_OF = {"val2017.zip": "coco_val_images", "annotations_trainval2017.zip": "coco_annotations",
          "v2_Questions_Val_mscoco.zip": "vqa_questions", "v2_Annotations_Val_mscoco.zip": "vqa_annotations",
          "refcoco.zip": "refcoco", "train2017.zip": "coco_train_images"}


def _write(official: dict[str, bytes], folder: Path, **replace: bytes) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, data in {**official, **replace}.items():
        (folder / name).write_bytes(data)
        out[KEY_OF[name]] = folder / name
    return out


def test_paper_sources_point_at_official_file_names():
    names = {k: v["url"].rsplit("/", 1)[1] for k, v in PAPER_SOURCES.items()}
    assert names == {v: k for k, v in KEY_OF.items()}


def test_download_and_prepare_end_to_end(official, tmp_path):
    with FileServer({f"/data/{n}": d for n, d in official.items()}) as srv:
        params = DownloadParams(
            sources={KEY_OF[n]: SourceParams(url=srv.url(f"/data/{n}"), size=len(d)) for n, d in official.items()},
            subset=None, timeout_s=5.0, retries=1, deadline_s=None)
        counts = prepare_paper_data(params, tmp_path / "raw", tmp_path / "ds", progress=False)
        n_requests = len(srv.log)
        prepare_paper_data(params, tmp_path / "raw", tmp_path / "ds2", progress=False)
        assert len(srv.log) == n_requests == 5        # verified raw files are re-used
    assert counts == {"test_images": 6, "test_objects": 12, "test_captions": 12, "test_questions": 9,
                      "test_refs": 2, "test_ref_sentences": 4, "refs_dropped_ann_mismatch": 1}

    recs = load_split(tmp_path / "ds", "test")
    assert [r.image_id for r in recs] == VAL_IDS
    by_id = {r.image_id: r for r in recs}
    with zipfile.ZipFile(tmp_path / "raw" / "val2017.zip") as zf:
        assert by_id[139].path.read_bytes() == zf.read(f"val2017/{_name(139)}")
    assert (by_id[285].width, by_id[285].height) == (31, 21)
    assert Image.open(by_id[285].path).size == (31, 21)
    assert by_id[139].questions[0].answer == "thing139000" and len(by_id[139].questions[0].answers) == 10
    assert by_id[139].captions[0] == "A photo number 0 of 139."
    assert not by_id[632].questions and not by_id[785].questions and not by_id[785].refs
    (ref,) = {r.ref_id: r for r in by_id[632].refs}.values()  # ref 4 (unknown ann) is gone
    assert (ref.ref_id, ref.ann_id, ref.bbox) == (1, 632000, (2.0, 5.0, 10.0, 8.0))
    assert [r.sentence for r in by_id[776].refs] == ["left one 2 0", "left one 2 1"]
    raw_refs = json.loads(annotation_path(tmp_path / "ds", "refs", "test").read_text())
    assert {r["refcoco_split"] for r in raw_refs} == {"val", "testA"}

    coco = COCO(str(annotation_path(tmp_path / "ds", "instances", "test")))
    assert sorted(coco.getImgIds()) == VAL_IDS and len(coco.getAnnIds(imgIds=[776])) == 2
    assert coco.annToMask(coco.loadAnns([139000])[0]).sum() > 0
    caps = COCO(str(annotation_path(tmp_path / "ds", "captions", "test")))
    assert len(caps.getAnnIds(imgIds=[139])) == 2
    assert caps.loadRes([{"image_id": 139, "caption": "x"}]).getImgIds() == [139]


def test_subset_keeps_first_ids_with_questions_or_refs_and_val_split(official, tmp_path):
    arcs = _write(official, tmp_path / "raw")
    counts = prepare_from_archives(arcs, tmp_path / "ds", subset=3, val_images=1)
    assert [r.image_id for r in load_split(tmp_path / "ds", "val")] == [139]
    assert [r.image_id for r in load_split(tmp_path / "ds", "test")] == [285, 632]
    assert counts["val_questions"] == 3 and counts["test_questions"] == 3 and counts["test_refs"] == 1
    assert sorted(p.name for p in (tmp_path / "ds/images/test").iterdir()) == [_name(285), _name(632)]
    assert not list((tmp_path / "ds").glob(".*"))                         # no staging left


def test_select_image_ids():
    assert select_image_ids([5, 1, 3], {3}, None) == [1, 3, 5]
    assert select_image_ids([5, 1, 3, 7], {7, 3, 5}, 2) == [3, 5]
    with pytest.raises(ValueError, match="subset"):
        select_image_ids([1], {1}, 0)


def test_without_refcoco_source(official, tmp_path):
    arcs = _write(official, tmp_path / "raw")
    del arcs["refcoco"]
    counts = prepare_from_archives(arcs, tmp_path / "ds")
    assert "test_refs" not in counts and not annotation_path(tmp_path / "ds", "refs", "test").exists()
    assert all(not r.refs for r in load_split(tmp_path / "ds", "test"))


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_malicious_pickle_is_refused(official, tmp_path):
    marker = tmp_path / "pwned"
    evil = _zip({"refcoco/refs(unc).p": pickle.dumps([_Evil(marker)])})
    arcs = _write(official, tmp_path / "raw", **{"refcoco.zip": evil})
    with pytest.raises(ValueError, match=r"refs\(unc\)\.p: refused pickle: forbidden global pathlib"):
        prepare_from_archives(arcs, tmp_path / "ds")
    assert not marker.exists() and not (tmp_path / "ds").exists()


@pytest.mark.parametrize("payload", [
    b"cbuiltins\neval\n(S'1+1'\ntR.",                 # builtins, but not a data type
    b"cos\nsystem\n(S'true'\ntR.",                     # the classic
])
def test_restricted_unpickler_rejects_globals(payload):
    with pytest.raises(ValueError, match="x.p: refused pickle: forbidden global"):
        load_safe_pickle(payload, "x.p")


def test_restricted_unpickler_accepts_python2_data():
    data = {"a": [1, 2.5, "t", None, True], "s": {1, 2}, "f": frozenset({3}), "t": (1, "x")}
    assert load_safe_pickle(pickle.dumps(data, protocol=2), "x.p") == data
    assert load_safe_pickle(b"\x80\x02]q\x00U\x03abcq\x01a.", "x.p") == ["abc"]   # a Python 2 str
    with pytest.raises(ValueError, match="x.p: corrupt pickle"):
        load_safe_pickle(b"\x80\x02]q\x00", "x.p")


@pytest.mark.parametrize("name, member, data, match", [
    ("v2_Questions_Val_mscoco.zip", "v2_OpenEnded_mscoco_val2014_questions.json", b"{not json",
     r"v2_OpenEnded_mscoco_val2014_questions.json: invalid JSON"),
    ("v2_Questions_Val_mscoco.zip", "v2_OpenEnded_mscoco_val2014_questions.json",
     b'{"questions": [{"image_id": 1, "question_id": 2}]}', r"questions\[0\]: missing key 'question'"),
    ("v2_Annotations_Val_mscoco.zip", "wrong_name.json", b"{}", r"no member named 'v2_mscoco_val2014_annotations"),
    ("refcoco.zip", "refcoco/refs(unc).p", pickle.dumps({"not": "a list"}), r"expected a list of refs"),
    ("refcoco.zip", "refcoco/refs(unc).p", pickle.dumps([{"ref_id": 1, "ann_id": 2, "image_id": 3}]),
     r"refs\(unc\)\.p\[0\]: missing key 'sentences'"),
    ("refcoco.zip", "refcoco/refs(unc).p",
     pickle.dumps([{"ref_id": 1, "ann_id": 2, "image_id": 3, "sentences": [{"sent": [[]] * 3}]}]),
     r"refs\(unc\)\.p\[0\]\.sentences\[0\]\.sent: expected str, got list"),
])
def test_bad_inputs_give_one_line_errors(official, tmp_path, name, member, data, match):
    arcs = _write(official, tmp_path / "raw", **{name: _zip({member: data})})
    with pytest.raises(ValueError, match=match) as err:
        prepare_from_archives(arcs, tmp_path / "ds")
    assert "\n" not in str(err.value) and not (tmp_path / "ds").exists()


def test_missing_images_in_archive(official, tmp_path):
    few = _zip({f"val2017/{_name(139)}": _jpeg(30, 20, 0)})
    arcs = _write(official, tmp_path / "raw", **{"val2017.zip": few})
    with pytest.raises(ValueError, match=r"val2017.zip: 5 images missing, e.g. val2017/000000000285.jpg"):
        prepare_from_archives(arcs, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_source_keys_are_checked(tmp_path):
    src = {k: SourceParams(url=v["url"]) for k, v in PAPER_SOURCES.items()}
    bad = DownloadParams(sources={**src, "coco_train": SourceParams(url="http://x/y.zip")},
                         subset=None, timeout_s=1.0, retries=0, deadline_s=None)
    with pytest.raises(ValueError, match="sources.coco_train: unknown source"):
        prepare_paper_data(bad, tmp_path / "raw", tmp_path / "ds")
    del src["vqa_questions"]
    with pytest.raises(ValueError, match="sources.vqa_questions: missing"):
        prepare_paper_data(DownloadParams(sources=src, subset=None, timeout_s=1.0, retries=0, deadline_s=None),
                           tmp_path / "raw", tmp_path / "ds")
    assert not (tmp_path / "raw").exists()


# --- pickle and archive caps -------------------------------------------------------------

def _shared_dag(levels: int, fanout: int) -> bytes:
    """Lists that hold ``fanout`` references to the previous level: tiny, but their repr is fanout**levels."""
    out = b"]q\x00"                                        # EMPTY_LIST, BINPUT 0
    for k in range(1, levels + 1):
        # POP the previous level (kept in the memo), MARK, BINGET it fanout times, LIST, BINPUT
        out += b"0(" + (b"h" + bytes([k - 1])) * fanout + b"lq" + bytes([k])
    return out


_HUGE = (1 << 31).to_bytes(8, "little")
BOMBS = {   # name: (pickle, expected error); each would allocate GBs if unpickled naively
    "bytes_reduce": (b"\x80\x02c__builtin__\nbytes\nJ\x00\x94\x35\x77\x85R.",     # bytes(2_000_000_000)
                     r"refused pickle: refused bytes\(\) of a int"),
    "bytearray_reduce": (b"\x80\x02c__builtin__\nbytearray\nJ\x00\x94\x35\x77\x85R.", "refused bytearray"),
    "bytes_newobj": (b"\x80\x02cbuiltins\nbytes\nJ\x00\x94\x35\x77\x85\x81.", "refused pickle: NEWOBJ"),
    "memo_index": (b"\x80\x02]r\x00\x00\x00\x10.", "refused pickle: memo index 268435456"),
    "binbytes8_length": (b"\x80\x04\x8e" + _HUGE + b"ab.", "corrupt pickle"),
    "binunicode8_length": (b"\x80\x04\x8d" + _HUGE + b"ab.", "corrupt pickle"),
    "frame_length": (b"\x80\x04\x95" + _HUGE + b"N.", "refused pickle: frame of 2147483648 bytes"),
    "str_of_shared_lists": (b"\x80\x02c__builtin__\nstr\n" + _shared_dag(4, 200) + b"\x85R.",
                            r"refused str\(\) of a list"),
}

_BOMB_RUNNER = textwrap.dedent("""
    import json, resource, sys, time
    from vlmcompress.data.prepare_coco import load_safe_pickle
    bombs = {k: bytes.fromhex(v) for k, v in json.loads(sys.stdin.read()).items()}
    # Guard: should a cap fail, allocations beyond 1 GiB fail fast instead of swamping the machine.
    vm_kb = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmSize:")))
    resource.setrlimit(resource.RLIMIT_AS, ((vm_kb << 10) + (1 << 30), resource.RLIM_INFINITY))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out, t0 = {}, time.monotonic()
    for name, data in bombs.items():
        try:
            load_safe_pickle(data, "x.p")
            out[name] = "loaded"
        except Exception as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
    out["_rss_growth_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    out["_seconds"] = time.monotonic() - t0
    print(json.dumps(out))
""")


def test_pickle_bombs_fail_fast_with_little_memory():
    proc = subprocess.run([sys.executable, "-c", _BOMB_RUNNER], capture_output=True, text=True, timeout=60,
                          input=json.dumps({k: v[0].hex() for k, v in BOMBS.items()}))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for name, (_, match) in BOMBS.items():
        assert out[name].startswith("ValueError: x.p: ") and "\n" not in out[name], (name, out[name])
        assert re.search(match, out[name]), (name, out[name])
    assert out["_rss_growth_kb"] < 32 << 10 and out["_seconds"] < 5, out


def test_pickle_over_the_size_cap_is_refused_before_loading():
    with pytest.raises(ValueError, match=r"x.p: refused pickle: \d+ bytes, more than the 100-byte cap"):
        load_safe_pickle(pickle.dumps(list(range(100))), "x.p", max_bytes=100)


@pytest.mark.parametrize("protocol", range(6))
def test_refs_load_with_every_protocol(protocol):
    assert load_safe_pickle(pickle.dumps(_refs(), protocol=protocol), "x.p") == _refs()
    optimized = pickletools.optimize(pickle.dumps(_refs() * 3, protocol=protocol))
    assert load_safe_pickle(optimized, "x.p") == _refs() * 3


def test_refs_member_over_the_pickle_cap_is_not_read(official, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_coco, "MAX_PICKLE_BYTES", 100)
    arcs = _write(official, tmp_path / "raw")
    with pytest.raises(ValueError, match=r"refcoco.zip: member 'refcoco/refs\(unc\).p' expands past 100 bytes"):
        prepare_from_archives(arcs, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_image_archive_bomb_leaves_nothing(official, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for k, i in enumerate(VAL_IDS):
            zf.writestr(f"val2017/{_name(i)}", _jpeg(30 + k, 20 + k, i))
        with zf.open(f"val2017/{_name(VAL_IDS[0])}x", "w") as fh:   # never selected: harmless
            fh.write(bytes(1 << 20))
        with zf.open("val2017/000000999999.jpg", "w") as fh:
            for _ in range(40):
                fh.write(bytes(1 << 20))
    arcs = _write(official, tmp_path / "raw", **{"val2017.zip": buf.getvalue()})
    assert prepare_from_archives(arcs, tmp_path / "ok")["test_images"] == 6     # the bomb is not selected
    inst = _instances()
    inst["images"].append({"id": 999999, "file_name": "000000999999.jpg", "width": 9, "height": 9})
    ann = _zip({"annotations/instances_val2017.json": json.dumps(inst).encode(),
                "annotations/captions_val2017.json": json.dumps(_captions(_instances())).encode()})
    arcs = _write(official, tmp_path / "raw",
                  **{"val2017.zip": buf.getvalue(), "annotations_trainval2017.zip": ann})
    with pytest.raises(ValueError, match=r"val2017.zip: member 'val2017/000000999999.jpg' expands more than 200x"):
        prepare_from_archives(arcs, tmp_path / "ds")
    assert not (tmp_path / "ds").exists() and not list(tmp_path.glob(".ds*"))


def test_an_optional_source_that_fails_warns_and_the_rest_is_prepared(official, tmp_path):
    """RefCOCO's host answering 404: a warning, a data set without refs; a required one fails."""
    files = {f"/data/{n}": d for n, d in official.items() if KEY_OF[n] != "refcoco"}
    with FileServer(files) as srv:
        sources = {KEY_OF[n]: SourceParams(url=srv.url(f"/data/{n}"), size=len(d)) for n, d in official.items()}
        params = DownloadParams(sources=sources, subset=None, timeout_s=5.0, retries=0, deadline_s=None)
        with pytest.warns(UserWarning, match="optional source refcoco skipped: .*404"):
            counts = prepare_paper_data(params, tmp_path / "raw", tmp_path / "ds", progress=False)
        assert counts["test_images"] == 6 and "test_refs" not in counts
        assert all(not r.refs for r in load_split(tmp_path / "ds", "test"))
    del files["/data/" + next(n for n in official if KEY_OF[n] == "vqa_questions")]
    with FileServer(files) as srv:
        sources = {KEY_OF[n]: SourceParams(url=srv.url(f"/data/{n}"), size=len(d)) for n, d in official.items()}
        params = DownloadParams(sources=sources, subset=None, timeout_s=5.0, retries=0, deadline_s=None)
        with pytest.raises(DownloadError):
            prepare_paper_data(params, tmp_path / "raw2", tmp_path / "ds2", progress=False)
    assert not (tmp_path / "ds2").exists()


def _local_world(tmp_path: Path) -> LocalParams:
    """The miniature COCO world unpacked into a user's folder, in the official formats."""
    import json

    from paper_world import archive_world, jpeg, pickle_py2

    world = archive_world()
    root = tmp_path / "mine"
    (root / "images").mkdir(parents=True)
    for k, im in enumerate(world.images):
        (root / "images" / im["file_name"]).write_bytes(jpeg(im["width"], im["height"], k))
    for name, doc in (("instances.json", world.instances), ("captions.json", world.captions),
                      ("questions.json", world.questions), ("answers.json", world.annotations)):
        (root / name).write_text(json.dumps(doc))
    (root / "refs.p").write_bytes(pickle_py2(world.refs))
    return LocalParams(images=str(root / "images"), instances=str(root / "instances.json"),
                       captions=str(root / "captions.json"), vqa_questions=str(root / "questions.json"),
                       vqa_annotations=str(root / "answers.json"), refs=str(root / "refs.p"))


def test_your_own_data_from_a_local_folder_equals_the_official_archives(tmp_path):
    from paper_world import official_archives

    from vlmcompress.data.prepare_coco import prepare_from_folder

    local = _local_world(tmp_path)
    counts = prepare_from_folder(local, tmp_path / "ds")
    arcs = _write(official_archives(), tmp_path / "raw")
    assert counts == prepare_from_archives(arcs, tmp_path / "ds_official")
    recs = load_split(tmp_path / "ds", "test")
    assert len({(r.width, r.height) for r in recs}) > 2 and any(r.refs for r in recs)


def test_your_own_data_errors_name_the_file_and_field(tmp_path):
    import dataclasses
    import json

    from vlmcompress.data.prepare_coco import prepare_from_folder

    local = _local_world(tmp_path)
    doc = json.loads(Path(local.vqa_annotations).read_text())
    del doc["annotations"][0]["multiple_choice_answer"]
    Path(local.vqa_annotations).write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"answers.json.*multiple_choice_answer") as err:
        prepare_from_folder(local, tmp_path / "ds")
    assert "\n" not in str(err.value) and not (tmp_path / "ds").exists()
    Path(local.captions).write_text("{not json")
    with pytest.raises(ValueError, match=r"captions.json: not valid JSON"):
        prepare_from_folder(local, tmp_path / "ds")
    local = _local_world(tmp_path / "again")
    first = sorted(Path(local.images).iterdir())[0]
    first.unlink()
    with pytest.raises(FileNotFoundError, match=first.name):
        prepare_from_folder(local, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()
    with pytest.raises(FileNotFoundError, match="nope.json"):
        prepare_from_folder(dataclasses.replace(local, instances=str(tmp_path / "nope.json")), tmp_path / "ds")


# --- the first N images of train2017.zip ----------------------------------------------------

TRAIN_ZIP = train2017_archive(8)                 # ids 9, 25, 30, 34, 36, 42, 49, 61, stored out of order


def _train_params(srv, official, n: int, **over) -> DownloadParams:
    sources = {KEY_OF[k]: SourceParams(url=srv.url(f"/data/{k}")) for k in official}
    sources["coco_train_images"] = SourceParams(url=srv.url("/zips/train2017.zip"), **over)
    return DownloadParams(sources=sources, subset=None, timeout_s=5.0, retries=1, deadline_s=None, train_images=n)


def _served(official, train: bytes = TRAIN_ZIP) -> dict[str, bytes]:
    return {**{f"/data/{n}": d for n, d in official.items()}, "/zips/train2017.zip": train}


def test_train_images_are_the_first_by_name_fetched_by_range_requests(official, tmp_path):
    with FileServer(_served(official)) as srv:
        counts = prepare_paper_data(_train_params(srv, official, 3), tmp_path / "raw", tmp_path / "ds",
                                    progress=False)
        asked = [r for path, r in srv.log if path == "/zips/train2017.zip"]
        assert asked and all(r and r.startswith("bytes=") for r in asked)        # never the whole archive
        srv.log.clear()
        (tmp_path / "raw/train2017" / _name(25)).unlink()                        # an interrupted run
        prepare_paper_data(_train_params(srv, official, 3), tmp_path / "raw", tmp_path / "ds2", progress=False)
        again = [r for path, r in srv.log if path == "/zips/train2017.zip"]
    assert counts["train_images"] == 3 and counts["test_images"] == 6
    assert len(again) == 2 and again[0].startswith("bytes=-")                    # tail, then the one image
    train = load_split(tmp_path / "ds", "train")
    assert [r.image_id for r in train] == [9, 25, 30]
    with zipfile.ZipFile(io.BytesIO(TRAIN_ZIP)) as zf:
        for r in train:
            assert r.path.read_bytes() == zf.read(f"train2017/{r.path.name}")
            assert (r.width, r.height) == Image.open(r.path).size
            assert not r.objects and not r.questions
    assert load_split(tmp_path / "ds2", "train") == [
        dataclasses.replace(r, path=tmp_path / "ds2/images/train" / r.path.name) for r in train]
    coco = COCO(str(annotation_path(tmp_path / "ds", "instances", "train")))
    assert sorted(coco.getImgIds()) == [9, 25, 30] and not coco.getAnnIds()
    assert {r.image_id for r in load_split(tmp_path / "ds", "test")} == set(VAL_IDS)


def test_train_images_without_range_support_download_the_whole_archive(official, tmp_path):
    with FileServer(_served(official)) as srv:
        srv.ignore_range = True
        srv.drop_after["/zips/train2017.zip"] = [0, 20_000]        # a 200 closed at once, then a drop
        counts = prepare_paper_data(_train_params(srv, official, 2), tmp_path / "raw", tmp_path / "ds",
                                    progress=False)
    assert counts["train_images"] == 2
    assert (tmp_path / "raw/train2017.zip").read_bytes() == TRAIN_ZIP
    assert [r.image_id for r in load_split(tmp_path / "ds", "train")] == [9, 25]


def test_train_archive_of_another_size_is_refused(official, tmp_path):
    with FileServer(_served(official)) as srv, pytest.raises(ChecksumError, match="train2017.zip: size mismatch"):
        prepare_paper_data(_train_params(srv, official, 2, size=len(TRAIN_ZIP) + 1), tmp_path / "raw",
                           tmp_path / "ds", progress=False)
    assert not (tmp_path / "ds").exists()


def test_train_image_that_is_also_evaluated_is_refused(official, tmp_path):
    clash = _zip({f"train2017/{_name(9)}": _jpeg(40, 30, 1), f"train2017/{_name(139)}": _jpeg(40, 30, 2)})
    with FileServer(_served(official, clash)) as srv, \
            pytest.raises(ValueError, match=r"000000000139.jpg: training image 139 is also an evaluated image"):
        prepare_paper_data(_train_params(srv, official, 2), tmp_path / "raw", tmp_path / "ds", progress=False)
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("members, n, match", [
    ({f"train2017/{_name(9)}": b"x"}, 2, r"1 images train2017/<id>.jpg, fewer than data.download.train_images \(2\)"),
    ({f"train2017/{_name(9)}": b"not a jpeg"}, 1, r"000000000009.jpg: not a readable image"),
    ({"train2017/../../evil.jpg": b"x", f"train2017/{_name(9)}": b"x"}, 2, "fewer than"),  # never selected
])
def test_bad_train_archives_give_one_line_errors(official, tmp_path, members, n, match):
    with FileServer(_served(official, _zip(members))) as srv, pytest.raises(ValueError, match=match) as err:
        prepare_paper_data(_train_params(srv, official, n), tmp_path / "raw", tmp_path / "ds", progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "ds").exists()
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path / "raw/evil.jpg").exists()


def test_train_images_params_are_checked():
    from vlmcompress.config import ConfigError, from_dict
    from vlmcompress.data.config import DataParams, check_data_params

    base = {"source": "coco", "scenes": {"seed": 0, "image_size": 64, "n_train": 2, "n_val": 0, "n_test": 2,
                                         "min_objects": 1, "max_objects": 2, "small_size": [5, 6],
                                         "large_size": [10, 12], "p_small": 0.5, "questions_per_image": 2,
                                         "captions_per_image": 1, "texture": "flat"},
            "download": {"sources": {k: {"url": v["url"]} for k, v in PAPER_SOURCES.items()
                                     if k != "coco_train_images"},
                         "subset": None, "timeout_s": 1.0, "retries": 0, "deadline_s": None, "train_images": 5},
            "local": {k: "" for k in ("images", "instances", "captions", "vqa_questions", "vqa_annotations", "refs")}}
    with pytest.raises(ConfigError, match=r"data.download.sources: misses coco_train_images"):
        check_data_params(from_dict(DataParams, base, "data"))
    with pytest.raises(ConfigError, match=r"data.download.train_images: must be >= 0"):
        check_data_params(from_dict(DataParams, {**base, "download": {**base["download"], "train_images": -1}}))
    # Another source has no train2017 to take them from (the paper profile's value is then unused).
    check_data_params(from_dict(DataParams, {**base, "source": "scenes"}, "data"))
