"""``megatron_lasp.atomic``: a directory is replaced whole or not at all (standard library only)."""

from __future__ import annotations

import os

import pytest

from megatron_lasp import atomic


def _tree(root):
    out = {}
    for base, _, files in os.walk(root):
        for name in files:
            path = os.path.join(base, name)
            with open(path) as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_atomic_directory_replaces_whole_or_leaves_untouched(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="half-way"):
        with atomic.atomic_directory(str(target)) as tmp:
            (tmp_path / "probe").write_text(tmp)
            with open(os.path.join(tmp, "new.txt"), "w") as f:
                f.write("new")
            raise RuntimeError("half-way")
    assert _tree(target) == {"old.txt": "old"}
    assert not os.path.exists((tmp_path / "probe").read_text())  # the temporary directory is gone
    with atomic.atomic_directory(str(target)) as tmp:
        os.makedirs(os.path.join(tmp, "sub"))
        with open(os.path.join(tmp, "sub", "new.txt"), "w") as f:
            f.write("new")
    assert _tree(target) == {os.path.join("sub", "new.txt"): "new"}
    assert sorted(os.listdir(tmp_path)) == ["out", "probe"]  # no temporary or old directory left
    mask = os.umask(0o022)
    os.umask(mask)
    assert os.stat(target).st_mode & 0o777 == 0o777 & ~mask  # not mkdtemp's private mode


def test_replace_directory_replaces_a_link_not_its_target(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(real)
    with atomic.atomic_directory(str(link)) as tmp:
        with open(os.path.join(tmp, "new.txt"), "w") as f:
            f.write("new")
    assert not link.is_symlink() and _tree(link) == {"new.txt": "new"}
    assert _tree(real) == {"keep.txt": "keep"}


def test_fresh_directory_and_text_file(tmp_path):
    left = tmp_path / "iter_0000004.tmp"
    left.mkdir()
    (left / "junk").write_text("partial")
    assert atomic.fresh_directory(str(left)) == str(left) and os.listdir(left) == []
    tracker = tmp_path / "latest.txt"
    tracker.write_text("3\n")
    atomic.write_text_atomic(str(tracker), "4\n")
    assert tracker.read_text() == "4\n" and not os.path.exists(str(tracker) + ".tmp")


def test_atomic_file_replaces_whole_or_leaves_untouched(tmp_path):
    target = tmp_path / "snapshot.pickle"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic.atomic_file(str(target)) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["snapshot.pickle"]
    with atomic.atomic_file(str(target), ".tmp.png") as tmp:
        assert tmp == str(target) + ".tmp.png"
        with open(tmp, "w") as f:
            f.write("new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["snapshot.pickle"]
