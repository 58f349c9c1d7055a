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
