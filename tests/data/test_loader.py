import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import corpus, make_pair_stream, make_text_stream

from megadiff.data.loader import DataError, MixtureLoader, StreamSpec
from megadiff.data.mds import ShardError, mds_writer
from megadiff.data.vocab import MODALITY_PAD, VocabError, VocabLayout


@pytest.fixture(scope="module")
def streams(tmp_path_factory, text_tok):
    d = tmp_path_factory.mktemp("streams")
    docs = corpus(60, seed=7)
    text = make_text_stream(d / "text", docs, text_tok)
    img, img_truth = make_pair_stream(d / "img", "image", 40, text_tok, codebook=16)
    aud, aud_truth = make_pair_stream(d / "aud", "audio", 30, text_tok, codebook=8, k=2)
    return {
        "dir": d,
        "docs": docs,
        "text": text,
        "img": img,
        "img_truth": img_truth,
        "aud": aud,
        "aud_truth": aud_truth,
    }


def test_text_packing_in_order(streams, text_tok):
    ld = MixtureLoader(
        [StreamSpec("t", streams["text"])], seq_length=32, micro_batch=4, shuffle=False
    )
    eot = ld.vocab.specials["<eot>"]
    assert eot == 300 + 1  # text_size 300, <bot> then <eot>
    flat = np.concatenate([next(ld)["tokens"].numpy().reshape(-1) for _ in range(30)])
    expect = np.concatenate([np.append(text_tok.encode(d), eot) for d in streams["docs"] * 3])
    assert np.array_equal(flat, expect[: len(flat)])
    b = next(ld)
    assert (b["modality"] == 0).all() and b["tokens"].dtype.is_floating_point is False


def test_unpacked_text_stream_one_document_per_row(streams, text_tok):
    """``pack=False``: each row holds one document and its ``<eot>``, then PAD (modality PAD);
    a document longer than a row continues on the stream's next row; resume stays exact."""
    L = 24
    spec = StreamSpec("t", streams["text"], pack=False)
    ld = MixtureLoader([spec], seq_length=L, micro_batch=4, shuffle=False)
    eot, pad = ld.vocab.specials["<eot>"], ld.vocab.pad_id
    want = []  # the expected rows, built from the documents
    for d in streams["docs"] * 2:
        ids = np.append(text_tok.encode(d), eot)
        for s in range(0, len(ids), L):
            piece = ids[s : s + L]
            want.append(np.concatenate([piece, np.full(L - len(piece), pad)]))
    assert any(len(text_tok.encode(d)) + 1 > L for d in streams["docs"])  # both cases covered
    rows, mods = [], []
    for _ in range(20):
        b = next(ld)
        rows += list(b["tokens"].numpy())
        mods += list(b["modality"].numpy())
    for r, m, w in zip(rows, mods, want, strict=False):
        assert np.array_equal(r, w)
        assert np.array_equal(m == MODALITY_PAD, r == pad)
    st = ld.state_dict()
    nxt = [next(ld) for _ in range(3)]
    again = MixtureLoader([spec], seq_length=L, micro_batch=4, shuffle=False)
    again.load_state_dict(st)
    for w in nxt:
        assert np.array_equal(next(again)["tokens"], w["tokens"])


def test_eos_fill_rows_end_in_eot_inside_the_loss(streams, text_tok):
    """``eos_fill``: an unpacked row holds one document, then ``<eot>`` to its end, all TEXT
    (valid positions: the objective trains them), no PAD."""
    L = 48
    spec = StreamSpec("t", streams["text"], pack=False, eos_fill=True)
    ld = MixtureLoader([spec], seq_length=L, micro_batch=4, shuffle=False)
    eot = ld.vocab.specials["<eot>"]
    short = [d for d in streams["docs"] if len(text_tok.encode(d)) < L]
    assert short
    b = next(ld)
    assert (b["tokens"] != ld.vocab.pad_id).all() and (b["modality"] == 0).all()
    for row, d in zip(b["tokens"].numpy(), streams["docs"]):
        ids = text_tok.encode(d)[:L]
        assert np.array_equal(row[: len(ids)], ids)
        assert (row[len(ids) :] == eot).all()


def test_eos_fill_length_ends_the_fill_and_pads_the_rest(tmp_path, text_tok):
    """``eos_fill_length: K``: K ``<eot>`` after the document (its own end marker included),
    then PAD outside the loss and attention; a document that fills the row gets none."""
    from megadiff.data.vocab import MODALITY_PAD

    docs = ["3+5=8", "7+8=15", "1+1=2 " * 12]
    path = make_text_stream(tmp_path / "sums", docs, text_tok)
    spec = StreamSpec("s", path, pack=False, eos_fill=True, eos_fill_length=3)
    ld = MixtureLoader([spec], seq_length=16, micro_batch=3, shuffle=False)
    eot, pad = ld.vocab.specials["<eot>"], ld.vocab.pad_id
    b = next(ld)
    for row, mod, d in zip(b["tokens"].numpy(), b["modality"].numpy(), docs):
        n = len(text_tok.encode(d))
        if n >= 16:
            assert np.array_equal(row, text_tok.encode(d)[:16])
            continue
        assert (row[n : n + 3] == eot).all() and (mod[: n + 3] == 0).all()
        assert (row[n + 3 :] == pad).all() and (mod[n + 3 :] == MODALITY_PAD).all()


def test_prompt_end_gives_each_row_its_prompt_length(tmp_path, text_tok):
    """``prompt_end``: a one-problem row's batch ``prompt`` is the token count of the document
    up to and including the separator's first occurrence (0 without one or in other streams)."""
    docs = [f"{a}+{b}={a + b}" for a in range(7) for b in range(3)] + ["no separator"]
    path = make_text_stream(tmp_path / "sums", docs, text_tok)
    spec = StreamSpec("s", path, pack=False, eos_fill=True, prompt_end="=")
    ld = MixtureLoader([spec], seq_length=16, micro_batch=len(docs), shuffle=False)
    b = next(ld)
    for row, doc, n in zip(b["tokens"].numpy(), docs, b["prompt"].tolist()):
        head = doc.split("=")[0] + "=" if "=" in doc else ""
        assert n == len(text_tok.encode(head))
        assert np.array_equal(row[: len(text_tok.encode(doc))], text_tok.encode(doc))
    assert b["prompt"][-1] == 0 and (b["prompt"][:-1] > 0).all()
    plain = MixtureLoader([StreamSpec("s", path, pack=False)], 16, 4, shuffle=False)
    assert (next(plain)["prompt"] == 0).all()


def test_prompt_end_finds_the_tokenizer_of_data_built_elsewhere(tmp_path, monkeypatch):
    """A manifest's tokenizer path is relative to the directory the data was built in (the
    demo's ``runs/demo_data/tokenizers/text.tiktoken``): a run started elsewhere finds it
    beside the stream."""
    from megadiff.data.tokenizers.files import resolve_tokenizer_path
    from megadiff.data.tokenizers.text import train_bpe

    monkeypatch.chdir(tmp_path)
    tok = train_bpe(corpus(), 300, "runs/data/tokenizers/text.tiktoken")
    path = make_text_stream("runs/data/sums", ["3+5=8", "2+2=4"], tok)
    manifest = json.loads((tmp_path / path / "manifest.json").read_text())
    assert manifest["text_tokenizer"] == "runs/data/tokenizers/text.tiktoken"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    spec = StreamSpec("s", str(tmp_path / path), pack=False, eos_fill=True, prompt_end="=")
    b = next(MixtureLoader([spec], seq_length=8, micro_batch=2, shuffle=False))
    assert b["prompt"].tolist() == [len(tok.encode("3+5=")), len(tok.encode("2+2="))]
    # a same-named file under the working directory (other data built here) does not stand in
    decoy = Path("runs/data/tokenizers/text.tiktoken")
    decoy.parent.mkdir(parents=True)
    decoy.write_text("not the data's tokenizer")
    found = resolve_tokenizer_path(manifest["text_tokenizer"], tmp_path / path / "manifest.json")
    assert found == tmp_path / "runs/data/tokenizers/text.tiktoken"


def test_eos_fill_needs_unpacked_stream():
    from megadiff.config import ConfigError, check_sections, load_config

    for key in ("eos_fill: true", "prompt_end: '='"):
        stream = f"data.streams=[{{name: t, path: /x, {key}}}]"
        name = key.split(":")[0]
        with pytest.raises(ConfigError, match=rf"data.streams\[0\].{name}.*pack: false"):
            check_sections(load_config(None, ["data.source=mds", stream]))


def test_pair_rows_layout(streams, text_tok):
    v = VocabLayout(
        text_size=300, image_codebook_size=16, audio_codebook_size=8, audio_num_codebooks=2
    )
    ld = MixtureLoader([StreamSpec("i", streams["img"], tasks=["t2i"])], 40, 2, vocab=v)
    row = next(ld)
    tok, mod = row["tokens"][0].numpy(), row["modality"][0].numpy()
    sp = v.specials
    assert tok[0] == sp["<t2i>"]
    n = int(np.argmax(tok == sp["<boi>"]))
    caption = text_tok.decode(tok[1:n])
    codes = streams["img_truth"][caption]
    assert np.array_equal(tok[n + 1 : n + 17], codes.reshape(-1) + v.image_start)
    assert tok[n + 17] == sp["<eoi>"] and (tok[n + 18 :] == v.pad_id).all()
    assert (mod[:n] == 0).all() and (mod[n : n + 18] == 1).all()
    assert (mod[n + 18 :] == MODALITY_PAD).all()
    # audio, asr direction: <asr> <boa> interleaved codes <eoa> text <eot>
    ld = MixtureLoader([StreamSpec("a", streams["aud"], tasks=["asr"])], 40, 1, vocab=v)
    tok = next(ld)["tokens"][0].numpy()
    assert tok[0] == sp["<asr>"] and tok[1] == sp["<boa>"]
    e = int(np.argmax(tok == sp["<eoa>"]))
    t_end = int(np.argmax(tok == sp["<eot>"]))
    codes = streams["aud_truth"][text_tok.decode(tok[e + 1 : t_end])]
    expect = (codes + np.array([0, 8])).reshape(-1) + v.audio_start
    assert np.array_equal(tok[2:e], expect)


def test_mixture_proportions_exact(streams):
    specs = [StreamSpec("t", streams["text"], 3.0), StreamSpec("i", streams["img"], 1.0)]
    ld = MixtureLoader(specs, 48, 8, seed=1)
    src = np.concatenate([next(ld)["source"].numpy() for _ in range(5)])
    assert (src == 0).sum() == 30 and (src == 1).sum() == 10


def test_dp_partition_disjoint_cover(streams, text_tok):
    seen = []
    for r in range(2):
        ld = MixtureLoader([StreamSpec("i", streams["img"], tasks=["t2i"])], 40, 5, r, 2, seed=3)
        caps = []
        for _ in range(4):  # 2 ranks x 4 batches x 5 rows = 40 samples = one epoch
            for row in next(ld)["tokens"].numpy():
                n = int(np.argmax(row == ld.vocab.specials["<boi>"]))
                caps.append(text_tok.decode(row[1:n]))
        seen.append(caps)
    assert len(set(seen[0])) == 20 and len(set(seen[1])) == 20
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == set(streams["img_truth"])
    assert seen[0] != sorted(seen[0], key=lambda c: int(c.split()[1]))  # shuffled


def test_resume_exact(streams):
    specs = [
        StreamSpec("t", streams["text"], 2),
        StreamSpec("i", streams["img"], 1),
        StreamSpec("a", streams["aud"], 1),
    ]
    a = MixtureLoader(specs, 48, 3, 1, 2, seed=5)
    for _ in range(7):
        next(a)
    st = json.loads(json.dumps(a.state_dict()))  # must survive JSON (checkpoint metadata)
    want = [next(a) for _ in range(6)]
    b = MixtureLoader(specs, 48, 3, 1, 2, seed=5)
    b.load_state_dict(st)
    for w in want:
        got = next(b)
        assert all(np.array_equal(w[k], got[k]) for k in w)
    c = MixtureLoader(specs, 48, 3, 0, 2, seed=5)
    with pytest.raises(DataError, match="dp_rank"):
        c.load_state_dict(st)


def test_bad_proportions_and_paths(streams, tmp_path):
    with pytest.raises(DataError, match="proportion -1"):
        MixtureLoader([StreamSpec("t", streams["text"], -1)], 32, 1)
    with pytest.raises(DataError, match="sum to zero"):
        MixtureLoader([StreamSpec("t", streams["text"], 0)], 32, 1)
    with pytest.raises(DataError, match="no streams"):
        MixtureLoader([], 32, 1)
    with pytest.raises(ShardError, match="stream 'x': no index.json"):
        MixtureLoader([StreamSpec("x", str(tmp_path))], 32, 1)
    with pytest.raises(DataError, match="task 't2s' does not fit a image"):
        MixtureLoader([StreamSpec("i", streams["img"], tasks=["t2s"])], 32, 1)


def test_empty_stream(tmp_path, streams):
    with mds_writer(tmp_path / "e", {"tokens": "ndarray:uint16"}):
        pass
    shutil.copy(f"{streams['text']}/manifest.json", tmp_path / "e" / "manifest.json")
    with pytest.raises(DataError, match="stream 'e' at .* is empty"):
        MixtureLoader([StreamSpec("e", str(tmp_path / "e"))], 32, 1)


def test_truncated_and_missing_shard(tmp_path, streams):
    d = tmp_path / "t"
    shutil.copytree(streams["text"], d)
    shard = min(d.glob("shard.*.mds"))
    good = shard.read_bytes()
    shard.write_bytes(good[:-5])
    with pytest.raises(ShardError, match=f"shard '{shard}' is truncated"):
        MixtureLoader([StreamSpec("t", str(d))], 32, 2, shuffle=False)
    shard.write_bytes(good)
    ld = MixtureLoader([StreamSpec("t", str(d))], 32, 2, shuffle=False)
    shard.write_bytes(good[:-5])  # truncated after the loader was built: caught on first read
    with pytest.raises(ShardError, match=f"shard '{shard}' is truncated"):
        next(ld)
    shard.unlink()
    with pytest.raises(ShardError, match=f"shard '{shard}' is missing"):
        MixtureLoader([StreamSpec("t", str(d))], 32, 2, shuffle=False)


def test_id_out_of_range_and_dtype(tmp_path, streams):
    d = tmp_path / "t"
    shutil.copytree(streams["text"], d)
    m = json.loads((d / "manifest.json").read_text())
    m["vocab"] = VocabLayout(text_size=260).to_dict()  # BPE ids >= 260 now out of range
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(VocabError, match=r"stream 't' .*: text id \d+ is outside"):
        MixtureLoader([StreamSpec("t", str(d))], 64, 4, shuffle=False)  # from the statistics
    del m["stats"]  # a manifest without statistics: caught while reading
    (d / "manifest.json").write_text(json.dumps(m))
    ld = MixtureLoader([StreamSpec("t", str(d))], 64, 4, shuffle=False)
    with pytest.raises(
        VocabError,
        match=r"stream 't' shard .* sample \d+: token id \d+ is "
        r"outside the text BPE range \[0, 260\)",
    ):
        for _ in range(10):
            next(ld)
    f = tmp_path / "f"
    with mds_writer(f, {"tokens": "ndarray:float32"}) as w:
        w.write({"tokens": np.ones(5, np.float32)})
    shutil.copy(f"{streams['text']}/manifest.json", f / "manifest.json")
    with pytest.raises(DataError, match=r"encodes \{'tokens': 'ndarray:float32'\}"):
        MixtureLoader([StreamSpec("f", str(f))], 32, 1)


def test_compressed_shards(tmp_path, text_tok):
    from megadiff.data.preprocess import Record, write_shards

    docs = [f"the red circle {i}" for i in range(50)]
    write_shards(
        "text",
        [Record(str(i), text=d) for i, d in enumerate(docs)],
        tmp_path / "z",
        text_tok,
        compression="zstd",
        shard_size=1 << 9,
    )
    assert list((tmp_path / "z").glob("*.mds.zstd"))
    ld = MixtureLoader([StreamSpec("z", str(tmp_path / "z"))], 16, 2, shuffle=False)
    flat = np.concatenate([next(ld)["tokens"].numpy().ravel() for _ in range(10)])
    eot = ld.vocab.specials["<eot>"]
    expect = np.concatenate([np.append(text_tok.encode(d), eot) for d in docs])
    assert np.array_equal(flat, expect[: len(flat)])


def test_from_config(streams):
    from megadiff.config import load_config
    from megadiff.data.loader import from_config
    from megadiff.plan import resolve

    cfg = resolve(
        load_config(
            None,
            [
                "data.source=mds",
                (
                    f"data.streams=[{{name: t, path: '{streams['text']}', proportion: 1, "
                    "pack: false}, "
                    f"{{name: i, path: '{streams['img']}', proportion: 1, tasks: [caption]}}]"
                ),
            ],
        )
    ).cfg
    ld = from_config(cfg.data, 48, 4, dp_rank=1, dp_size=2, seed=cfg.train.seed)
    assert ld.seed == cfg.train.seed and ld.dp_rank == 1
    b = next(ld)
    assert b["source"].tolist() == [0, 1, 0, 1]
    assert b["tokens"][1, 0] == ld.vocab.specials["<caption>"]
    assert [s.pack for s in ld.specs] == [False, True]
    eot, pad = ld.vocab.specials["<eot>"], ld.vocab.pad_id
    for row in [next(ld)["tokens"][0] for _ in range(6)]:  # one document (piece) per row
        after = row[int((row == eot).int().argmax()) + 1 :] if (row == eot).any() else row[:0]
        assert (after == pad).all()


def test_vocab_mismatch(streams):
    v = VocabLayout(text_size=300, image_codebook_size=32)  # streams were written with 16
    with pytest.raises(VocabError, match="stream 'i' has image_codebook_size=16 but the vocab"):
        MixtureLoader([StreamSpec("i", streams["img"])], 40, 1, vocab=v)
    v = VocabLayout(text_size=301)
    with pytest.raises(VocabError, match="stream 't' has text_size=300"):
        MixtureLoader([StreamSpec("t", streams["text"])], 40, 1, vocab=v)


def test_streams_disagree_on_text_vocab(streams, tmp_path):
    from conftest import corpus

    from megadiff.data.tokenizers.text import train_bpe

    other = train_bpe(corpus(50), 280, tmp_path / "o.tiktoken")
    p = make_text_stream(tmp_path / "t2", ["a red circle", "the blue square"], other)
    with pytest.raises(VocabError, match="streams 't' and 'u' disagree on text_size: 300 vs 280"):
        MixtureLoader([StreamSpec("t", streams["text"]), StreamSpec("u", p)], 40, 1)


def _shm(prefix):
    return [f for f in os.listdir("/dev/shm") if f.startswith(f"{prefix:06}_")]


def test_order_is_streamings_own(streams):
    """The loader's per-rank order is what StreamingDataset itself iterates (same partition and
    shuffle), and closing releases streaming's shared memory."""
    from megadiff.data.mds import LocalStream, streaming_mds

    api = streaming_mds()
    with LocalStream(streams["img"], "i", shuffle=True, shuffle_seed=7) as ls:
        ids = ls.epoch_ids(0).tolist()
        prefix = ls.shm_prefix
        assert _shm(prefix)
        ref = api.StreamingDataset(
            local=streams["img"], shuffle=True, shuffle_seed=7, num_canonical_nodes=1, batch_size=1
        )
        caps = [bytes(s["text"]) for s in ref]
        assert caps == [bytes(ls[i]["text"]) for i in ids]
        assert ids != sorted(ids) and sorted(ids) == list(range(40))
    assert not _shm(prefix)
    del ref


def test_close_and_compressed_cache(tmp_path, text_tok):
    from megadiff.data.preprocess import Record, write_shards

    write_shards(
        "text",
        [Record(str(i), text=f"the red circle {i}") for i in range(20)],
        tmp_path / "z",
        text_tok,
        compression="zstd",
        shard_size=1 << 9,
    )
    before = sorted(os.listdir(tmp_path / "z"))
    with MixtureLoader([StreamSpec("z", str(tmp_path / "z"))], 16, 2) as ld:
        next(ld)
        (ls,) = ld.streams
        cache, prefix = ls.cache_dir, ls.shm_prefix
        assert os.listdir(cache) and _shm(prefix)
    assert not os.path.exists(cache) and not _shm(prefix)
    assert sorted(os.listdir(tmp_path / "z")) == before  # shard directory left as it was


def test_state_version_refused(streams):
    with MixtureLoader([StreamSpec("t", streams["text"])], 32, 1) as ld:
        st = ld.state_dict()
        st["version"] = 1
        with pytest.raises(DataError, match="version 1"):
            ld.load_state_dict(st)
