"""Bad data through the real commands: the training preflight (exit 2 before the model is built,
naming stream and file), ``megadiff data verify`` and the ``data.on_bad_sample`` policy."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from conftest import corpus, make_pair_stream, make_text_stream
from conftest import megadiff_cli as megadiff

from megadiff.data.loader import MixtureLoader, StreamSpec
from megadiff.data.mds import ShardError, mds_writer
from megadiff.data.vocab import VocabLayout
from tests.test_checkpoint import cli_world

MODEL = [
    "model.num_layers=1",
    "model.hidden_size=32",
    "model.num_attention_heads=4",
    "model.ffn_hidden_size=64",
    "model.seq_length=32",
    "train.micro_batch=2",
    "train.global_batch=2",
    "optim.warmup_tokens=16",
    "logging.progress=false",
    "data.source=mds",
]


def train(run_dir, streams: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    spec = [{"name": n, "path": p} for n, p in streams.items()]
    return megadiff(
        "train", *MODEL, f"data.streams={json.dumps(spec)}", f"run.dir={run_dir}", *extra
    )


@pytest.fixture(scope="module")
def good(tmp_path_factory, text_tok):
    d = tmp_path_factory.mktemp("good")
    return {
        "text": make_text_stream(d / "text", corpus(60, seed=1), text_tok),
        "img": make_pair_stream(d / "img", "image", 12, text_tok)[0],
    }


def _copy(good, tmp_path, name):
    out = tmp_path / name
    shutil.copytree(good[name], out)
    return out


def _edit_json(path, change):
    tree = json.loads(path.read_text())
    change(tree)
    path.write_text(json.dumps(tree))


def _first_shard(d):
    return min(d.glob("shard.*.mds"))


def _truncate(d):
    shard = _first_shard(d)
    shard.write_bytes(shard.read_bytes()[:-7])
    return shard.name, "truncated"


def _delete(d):
    _first_shard(d).unlink()
    return "shard.00000.mds", "missing"


def _bad_index(d):
    (d / "index.json").write_text('{"version": 2, "shards": [')
    return "index.json", "corrupt"


def _empty(d):
    manifest = (d / "manifest.json").read_text()
    shutil.rmtree(d)
    with mds_writer(d, {"tokens": "ndarray:uint16"}):
        pass
    (d / "manifest.json").write_text(manifest)
    return str(d), "is empty"


def _float_column(d):
    _edit_json(d / "index.json", lambda t: t["shards"][0].update(column_encodings=["float32"]))
    return "shard.00000.mds", "megadiff columns are integer arrays"


def _video(d):
    _edit_json(d / "manifest.json", lambda t: t.update(kind="video"))
    return "manifest.json", "kind 'video'"


def _ids_out_of_range(d):
    _edit_json(d / "manifest.json", lambda t: t.update(vocab=VocabLayout(260).to_dict()))
    return "manifest.json", r"text id 299 is outside the text vocabulary [0, 260)"


BREAK_TEXT = [_truncate, _delete, _bad_index, _empty, _float_column, _video, _ids_out_of_range]


@pytest.mark.parametrize("breakage", BREAK_TEXT, ids=lambda f: f.__name__[1:])
def test_preflight_names_bad_text_stream_before_the_model(good, tmp_path, breakage):
    d = _copy(good, tmp_path, "text")
    file, what = breakage(d)
    r = train(tmp_path / "run", {"text": str(d)})
    assert r.returncode == 2, r.stderr[-2000:]
    err = r.stderr
    assert "megadiff train: error: " in err and "Traceback" not in err, err[-2000:]
    assert "stream 'text'" in err and file in err and what in err, err
    assert "parameters" not in r.stdout  # stopped before the model was built


def test_preflight_rejects_images_longer_than_seq_length(good, tmp_path):
    r = train(tmp_path / "run", good, "model.seq_length=20")  # 16 codes + 5 > 20
    assert r.returncode == 2, r.stderr[-2000:]
    assert "stream 'img'" in r.stderr and "manifest.json" in r.stderr
    assert "up to 16 image tokens, a row needs 21 positions but model.seq_length is 20" in r.stderr


def test_data_verify_checks_content_hashes(good, tmp_path):
    d, t = _copy(good, tmp_path, "img"), _copy(good, tmp_path, "text")
    r = megadiff("data", "verify", d, t, "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 of 2 stream(s) intact" in r.stdout
    shard = _first_shard(d)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # same size: only the content hash can tell
    shard.write_bytes(bytes(data))
    r = megadiff("data", "verify", tmp_path)  # a directory of streams
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"BAD {d}: stream 'img': shard '{shard}' content hash differs" in r.stdout
    assert "1 of 2 stream(s) intact" in r.stdout
    assert "verify" in r.stderr and "shard" in r.stderr  # progress
    _first_shard(t).unlink()
    r = megadiff("data", "verify", d, t, "--no-progress")
    assert r.returncode == 2 and f"'{t / 'shard.00000.mds'}' is missing" in r.stdout
    assert "0 of 2 stream(s) intact" in r.stdout


def _corrupt_sample(d, sample: int = 1) -> str:
    """Make one sample of the first shard undecodable, keeping the file size."""
    shard = _first_shard(d)
    data = bytearray(shard.read_bytes())
    offsets = np.frombuffer(bytes(data[4 : 12 + 4 * sample]), np.uint32)
    start = int(offsets[sample])
    data[start + 4 : start + 8] = b"\xff\xff\x00\x00"  # a bad array header
    shard.write_bytes(bytes(data))
    return str(shard)


def test_bad_sample_stop_names_it(good, tmp_path):
    d = _copy(good, tmp_path, "text")
    shard = _corrupt_sample(d)
    r = train(tmp_path / "run", {"text": str(d)}, "train.steps=3", "data.shuffle=false")
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"stream 'text' shard '{shard}' sample 1: cannot be decoded" in r.stderr
    assert "data.on_bad_sample=skip" in r.stderr and "Traceback" not in r.stderr


def test_bad_sample_on_one_rank_stops_every_rank_after_a_checkpoint(good, tmp_path):
    """DP=2, rank 1 meets an undecodable sample at step 2: both ranks stop at once (none left
    waiting in a collective), save step 1, exit 2; the rank names the sample and rank 0's log
    says which rank it was. With the shard repaired the run resumes exactly."""
    d = _copy(good, tmp_path, "text")
    pristine = _first_shard(d).read_bytes()
    shard = _corrupt_sample(d, 33)  # in rank 1's share, read at step 2
    spec = json.dumps([{"name": "text", "path": str(d)}])

    def train_dp2(run_dir, *extra):
        args = [*MODEL, f"data.streams={spec}", f"run.dir={run_dir}", "train.global_batch=4",
                "train.steps=4", "data.shuffle=false", "checkpoint.every=0", *extra]  # fmt: skip
        return cli_world(args, world=2, command=("train",), timeout=150)

    run = tmp_path / "run"
    results = train_dp2(run)
    assert [r.returncode for r in results] == [2, 2], [r.stderr[-1500:] for r in results]
    assert f"shard '{shard}' sample 33: cannot be decoded" in results[1].stderr
    assert "cannot be decoded" not in results[0].stderr
    assert "stopping before step 2: rank 1 could not read its batch" in results[0].stdout
    assert all("Traceback" not in r.stderr for r in results)
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == ["step_00000001"]

    _first_shard(d).write_bytes(pristine)  # repaired: resume, and train a whole run to compare
    resumed = train_dp2(run, "checkpoint.save_on_exit=false")
    assert [r.returncode for r in resumed] == [0, 0], resumed[0].stderr[-2000:]
    whole = tmp_path / "whole"
    assert [r.returncode for r in train_dp2(whole, "checkpoint.save_on_exit=false")] == [0, 0]
    assert [x["loss"] for x in _records(run)] == [x["loss"] for x in _records(whole)]


def _records(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if '"loss"' in x]


def test_bad_sample_skip_is_counted_deterministic_and_resumes(good, tmp_path):
    d = _copy(good, tmp_path, "text")
    _corrupt_sample(d, 1)
    _corrupt_sample(d, 9)
    # constant lr: the schedule does not depend on train.steps, which the two parts change
    over = ("data.shuffle=false", "data.on_bad_sample=skip", "optim.schedule=constant")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    spec = json.dumps([{"name": "text", "path": str(d)}])

    def train_here(run_dir, steps: int) -> subprocess.CompletedProcess:
        """``megadiff train`` in a preloaded one-rank world (three runs: no import each)."""
        args = [*MODEL, f"data.streams={spec}", f"run.dir={run_dir}", f"train.steps={steps}"]
        return cli_world([*args, *over], command=("train",))[0]

    r = train_here(whole, 6)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (
        "skipping bad sample (1 so far)" in r.stderr and "sample 1: cannot be decoded" in r.stderr
    )
    for steps in (3, 6):  # the second run resumes from the first one's checkpoint
        r = train_here(parts, steps)
        assert r.returncode == 0, r.stderr[-2000:]
    want, got = _records(whole), _records(parts)
    assert [r["data_skipped"] for r in want] == [1, 1, 1, 2, 2, 2]
    assert [(r["loss"], r["data_skipped"]) for r in want] == [
        (r["loss"], r["data_skipped"]) for r in got
    ]


def test_skipping_loader_resumes_exactly(good, tmp_path):
    d = _copy(good, tmp_path, "text")
    _corrupt_sample(d, 3)
    spec = [StreamSpec("text", str(d))]

    def loader():
        return MixtureLoader(spec, 16, 2, shuffle=False, on_bad_sample="skip", warn=print)

    whole = loader()
    want = [next(whole)["tokens"] for _ in range(12)]
    first = loader()
    for _ in range(5):
        next(first)
    state = first.state_dict()
    again = loader()
    again.load_state_dict(state)
    got = [next(again)["tokens"] for _ in range(7)]
    assert all(np.array_equal(a, b) for a, b in zip(want[5:], got, strict=True))
    assert whole.skipped == again.skipped == 1


def test_shard_changed_mid_run_stops_even_when_skipping(good, tmp_path):
    d = _copy(good, tmp_path, "text")
    ld = MixtureLoader(
        [StreamSpec("text", str(d))], 16, 1, shuffle=False, on_bad_sample="skip", warn=print
    )
    next(ld)  # the shard passed its first-read check
    shard = _first_shard(d)
    shard.write_bytes(shard.read_bytes()[:400])
    with pytest.raises(ShardError, match=f"shard '{shard}' is truncated"):
        for _ in range(100):
            next(ld)
    assert ld.skipped == 0
