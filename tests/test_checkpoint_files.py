"""Manifest, verification, discovery and pruning on plain directories (no process group)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from megadiff import checkpoint_files as ck
from megadiff.training.metrics import truncate_metrics


def _fake(root: Path, step: int, files: dict[str, bytes] | None = None) -> Path:
    d = root / ck.checkpoint_name(step)
    (d / "sub").mkdir(parents=True)
    for name, data in (files or {"a.distcp": b"x" * 100, "sub/b.pt": b"yz"}).items():
        (d / name).write_bytes(data)
    ck.write_manifest(d, step)
    return d


def test_manifest_lists_sizes_and_sha256(tmp_path):
    d = _fake(tmp_path, 3)
    m = json.loads((d / "manifest.json").read_text())
    assert m["step"] == 3
    assert m["files"] == {
        "a.distcp": {"size": 100, "sha256": hashlib.sha256(b"x" * 100).hexdigest()},
        "sub/b.pt": {"size": 2, "sha256": hashlib.sha256(b"yz").hexdigest()},
    }
    assert ck.verify(d) is None


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip", "manifest"])
def test_verify_names_the_bad_file(tmp_path, damage):
    d = _fake(tmp_path, 1)
    f = d / "a.distcp"
    if damage == "truncate":
        f.write_bytes(b"x" * 99)
    elif damage == "delete":
        f.unlink()
    elif damage == "flip":
        f.write_bytes(b"x" * 99 + b"!")  # same size: only the checksum sees it
    else:
        (d / "manifest.json").unlink()
    problem = ck.verify(d)
    assert problem is not None
    assert str(d / "manifest.json" if damage == "manifest" else f) in problem
    if damage == "flip":
        assert ck.verify(d, checksums=False) is None  # sizes only


def test_find_latest_valid_skips_bad_and_temporary(tmp_path, capsys):
    _fake(tmp_path, 2)
    bad = _fake(tmp_path, 4)
    (bad / "sub" / "b.pt").write_bytes(b"")
    (tmp_path / ".tmp_step_00000006").mkdir()  # an interrupted save is never a candidate
    assert ck.find_latest_valid(tmp_path) == tmp_path / "step_00000002"
    out = capsys.readouterr().out
    assert "step_00000004 is unusable" in out and str(bad / "sub" / "b.pt") in out


def test_resolve_load_path(tmp_path):
    good = _fake(tmp_path / "run", 5)
    assert ck.resolve_load_path(good) == good
    assert ck.resolve_load_path(tmp_path / "run") == good  # a folder of checkpoints
    with pytest.raises(ck.CheckpointError, match="no such file"):
        ck.resolve_load_path(tmp_path / "nope")
    with pytest.raises(ck.CheckpointError, match="manifest.json"):
        ck.resolve_load_path(tmp_path)


def test_prune_keeps_newest_and_removes_temporaries(tmp_path):
    for s in (1, 2, 3, 4):
        _fake(tmp_path, s)
    (tmp_path / ".tmp_step_00000005").mkdir()
    (tmp_path / "corrupt-step_00000002-123").mkdir()  # set aside as unusable: never pruned
    ck.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "corrupt-step_00000002-123",
        "step_00000003",
        "step_00000004",
    ]


def test_prune_never_removes_the_checkpoint_just_published(tmp_path):
    """A later checkpoint (e.g. one a scan skipped) neither counts nor pushes out the new one."""
    for s in (1, 2, 5):
        _fake(tmp_path, s)
    ck.prune(tmp_path, keep=1, published=tmp_path / "step_00000002")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000005"]


def test_resume_scan_sets_bad_checkpoints_aside(tmp_path, capsys):
    _fake(tmp_path, 2)
    bad = _fake(tmp_path, 4)
    (bad / "a.distcp").write_bytes(b"x")
    assert ck.find_latest_valid(tmp_path, set_aside_bad=True) == tmp_path / "step_00000002"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[1] == "step_00000002" and names[0].startswith("corrupt-step_00000004-")
    out = capsys.readouterr().out
    assert f"moved the unusable checkpoint {bad} to {tmp_path / names[0]}" in out
    assert ck.list_checkpoints(tmp_path) == [(2, tmp_path / "step_00000002")]


def test_truncate_metrics_moves_later_steps_aside_and_drops_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": float(s)}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(lines) + '\n{"step": 5, "lo')
    assert truncate_metrics(path, 2) == 2
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    aside = tmp_path / "metrics.superseded.jsonl"
    assert [json.loads(x)["step"] for x in aside.read_text().splitlines()] == [3, 4]
    assert truncate_metrics(path, 0) == 2  # a fresh start: the whole history is kept aside
    assert path.read_text() == ""
    assert [json.loads(x)["step"] for x in aside.read_text().splitlines()] == [3, 4, 1, 2]
    assert truncate_metrics(tmp_path / "missing.jsonl", 3) == 0  # no file: nothing to do
