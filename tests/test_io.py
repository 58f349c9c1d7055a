import pytest

from vlmcompress.io import atomic_open, atomic_path, read_json, write_json


def test_atomic_open_leaves_old_file_on_error(tmp_path):
    target = tmp_path / "m.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_open(target) as fh:
            fh.write("{half")
            raise RuntimeError("interrupted")
    assert read_json(target) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temp left behind


def test_atomic_path_replaces_directories_whole(tmp_path):
    target = tmp_path / "ds"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("1")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "b").write_text("2")
            raise KeyboardInterrupt
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_read_json_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_json(tmp_path / "x.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="invalid JSON at line 1"):
        read_json(bad)


def test_project_relative_paths_survive_a_move(tmp_path, monkeypatch):
    from vlmcompress.paths import project_relative

    root = tmp_path / "proj"
    (root / "outputs/data").mkdir(parents=True)
    (root / "params.yaml").write_text("seed: 0\n")
    monkeypatch.setenv("VLMCOMPRESS_ROOT", str(root))
    assert project_relative(root / "outputs/data/a.png") == "outputs/data/a.png"
    outside = tmp_path / "elsewhere.png"
    assert project_relative(outside) == str(outside.resolve())


def test_a_file_never_replaces_a_folder_or_a_fifo(tmp_path):
    import os

    from vlmcompress.io import check_output

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match="mine: exists and is not a regular file"):
        with atomic_open(folder, "w") as fh:
            fh.write("x")
    with pytest.raises(ValueError, match="mine: is a folder"):
        check_output(folder)
    assert (folder / "keep.txt").read_text() == "precious"
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="pipe: exists and is not a regular file"):
        with atomic_open(fifo, "w") as fh:
            raise AssertionError("the body must not run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "pipe"]


def test_a_folder_never_replaces_a_file(tmp_path):
    target = tmp_path / "out"
    target.write_text("file")
    with pytest.raises(ValueError, match="out: exists and is not a folder"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
    assert target.read_text() == "file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_write_errors_name_the_target_not_the_temporary(tmp_path):
    target = tmp_path / "x.bin"
    with pytest.raises(OSError) as err:
        with atomic_path(target) as tmp:
            open(tmp / "missing" / "deeper", "w")
    assert str(target) in str(err.value) and ".tmp" not in str(err.value)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_during_a_write_leaves_no_temporary(tmp_path, sig):
    import signal
    import subprocess
    import sys
    import time

    # SIGINT's default handler set explicitly: a child of a background job inherits it ignored.
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from vlmcompress.io import atomic_open\n"
        "with atomic_open(sys.argv[1], 'w') as fh:\n"
        "    fh.write('half'); fh.flush()\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(30)\n")
    target = tmp_path / "out.txt"
    target.write_text("old")
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=20)
    assert proc.returncode != 0
    time.sleep(0.05)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    assert target.read_text() == "old"
