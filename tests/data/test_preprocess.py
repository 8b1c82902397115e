import json

import numpy as np
import pytest
from conftest import megadiff_cli

from megadiff.data import preprocess as pp
from megadiff.data.mds import LocalStream, streaming_mds
from megadiff.data.vocab import VocabLayout
from megadiff.demo.synth import shape_dataset


def cli(*argv):
    import argparse

    p = argparse.ArgumentParser()
    pp.add_arguments(p)
    return pp.run(p.parse_args([str(a) for a in argv]))


def image_args(tmp_path, text_tok, image_tok, out) -> list:
    """``preprocess image`` arguments for ``imgs.npy`` + ``caps.txt`` in ``tmp_path``."""
    return [
        "--arrays", tmp_path / "imgs.npy", "--captions", tmp_path / "caps.txt",
        "--tokenizer", text_tok.spec, "--modal-tokenizer", image_tok,
        "--out", out, "--workers", 1, "--no-progress",
    ]  # fmt: skip


def test_text_jsonl_roundtrip(tmp_path, text_tok):
    docs = ["the red circle is on the left.", "a blue square", "top of the green triangle"]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    out = tmp_path / "text"
    rc = cli("text", "--input", src, "--tokenizer", text_tok.spec, "--out", out, "--no-progress")
    assert rc == 0
    s = LocalStream(out)
    assert len(s) == 3
    assert [text_tok.decode(s[i]["tokens"]) for i in range(3)] == docs
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "text" and m["num_samples"] == 3
    assert m["text_tokens"] == sum(len(text_tok.encode(d)) for d in docs)
    assert VocabLayout.from_dict(m["vocab"]).text_size == 300
    # the shard reader and StreamingDataset (LocalStream) agree
    r = streaming_mds().MDSReader.from_json(
        str(out), None, json.loads((out / "index.json").read_text())["shards"][0]
    )
    assert np.array_equal(r.decode_sample(r.get_sample_data(1))["tokens"], s[1]["tokens"])
    assert not list(tmp_path.glob(".text.tmp-*"))  # temp dir renamed away


def test_plain_text_and_bad_records(tmp_path, text_tok, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a red circle"}\n{"txt": "wrong key"}\nnot json\n{"text": "  "}\n')
    out = tmp_path / "t"
    assert (
        cli("text", "--input", src, "--tokenizer", text_tok.spec, "--out", out, "--no-progress")
        == 2
    )
    err = capsys.readouterr().err
    assert f"{src}:2: missing key(s) text" in err and f"{src}:3: invalid JSON" in err
    assert f"{src}:4: empty text" in err
    assert not out.exists() and not list(tmp_path.glob(".t.tmp-*"))
    assert (
        cli(
            "text",
            "--input",
            src,
            "--tokenizer",
            text_tok.spec,
            "--out",
            out,
            "--skip-bad",
            "--no-progress",
        )
        == 0
    )
    m = json.loads((out / "manifest.json").read_text())
    assert m["num_samples"] == 1 and m["bad_records"] == 3
    txt = tmp_path / "a.txt"
    txt.write_text("para one\nstill one\n\npara two\n")
    args = ["text", "--input", txt, "--tokenizer", text_tok.spec, "--out", tmp_path / "p"]
    assert cli(*args, "--no-progress") == 0
    assert len(LocalStream(tmp_path / "p")) == 2
    assert cli(*args, "--no-progress") == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err


def test_image_files_jsonl(tmp_path, text_tok, image_tok):
    from PIL import Image

    imgs, caps = shape_dataset(6, seed=5)
    lines = []
    for i, (im, c) in enumerate(zip(imgs, caps)):
        Image.fromarray(im).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "text": c}))
    lines.append(json.dumps({"image": "missing.png", "text": "x"}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "img"
    rc = cli(
        "image",
        "--input",
        tmp_path / "pairs.jsonl",
        "--tokenizer",
        text_tok.spec,
        "--modal-tokenizer",
        image_tok,
        "--out",
        out,
        "--skip-bad",
        "--workers",
        1,
        "--no-progress",
    )
    assert rc == 0
    s = LocalStream(out)
    assert len(s) == 6
    from megadiff.data.tokenizers.image import PatchVQ

    assert np.array_equal(s[2]["codes"], PatchVQ.load(image_tok).encode(imgs[2])[0])
    assert text_tok.decode(s[2]["text"]) == caps[2]
    m = json.loads((out / "manifest.json").read_text())
    assert m["code_tokens"] == 6 * 64 and m["vocab"]["image_codebook_size"] == 32
    assert (
        "missing.png" in m["bad_examples"][0]
        and f"{tmp_path / 'pairs.jsonl'}:7" in m["bad_examples"][0]
    )


def test_precomputed_audio_codes(tmp_path, text_tok, capsys):
    rng = np.random.default_rng(0)
    codes = {
        "a": rng.integers(0, 64, (30, 4)),
        "b": rng.integers(0, 64, (11, 4)),
        "c": rng.integers(0, 64, (5, 3)),
        "d": rng.random((5, 4)),
        "e": np.full((5, 4), 64),
    }
    np.savez(tmp_path / "codes.npz", **codes)
    (tmp_path / "meta.json").write_text('{"codebook_size": 64, "num_codebooks": 4}')
    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps({"id": k, "text": f"clip {k}"}) + "\n" for k in "abcdef"))
    args = (
        "audio",
        "--codes",
        tmp_path / "codes.npz",
        "--codes-meta",
        tmp_path / "meta.json",
        "--captions",
        caps,
        "--tokenizer",
        text_tok.spec,
        "--no-progress",
    )
    assert cli(*args, "--out", tmp_path / "bad") == 2
    err = capsys.readouterr().err
    assert f"{caps}:3" in err and "[frames, 4], got (5, 3)" in err
    assert "dtype float64" in err and "code 64 is outside the codebook [0, 64)" in err
    assert "no codes/array with id 'f'" in err
    assert cli(*args, "--out", tmp_path / "ok", "--skip-bad") == 0
    s = LocalStream(tmp_path / "ok")
    assert len(s) == 2 and np.array_equal(s[1]["codes"], codes["b"])
    assert s[1]["codes"].dtype == np.uint16


def test_image_arrays_bad_shape(tmp_path, text_tok, image_tok, capsys):
    imgs, caps = shape_dataset(3)
    np.save(tmp_path / "imgs.npy", imgs[:, :16])  # wrong height
    (tmp_path / "caps.txt").write_text("\n".join(caps) + "\n")
    rc = cli("image", *image_args(tmp_path, text_tok, image_tok, tmp_path / "o"))
    assert rc == 2
    assert f"{tmp_path / 'caps.txt'}:1" in capsys.readouterr().err


def test_missing_tokenizer_file(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hello\n")
    rc = cli(
        "text",
        "--input",
        tmp_path / "a.txt",
        "--tokenizer",
        tmp_path / "nope.tiktoken",
        "--out",
        tmp_path / "o",
        "--no-progress",
    )
    assert rc == 2 and "nope.tiktoken' does not exist" in capsys.readouterr().err


def test_pretokenized_text_records(tmp_path, text_tok):
    recs = [
        pp.Record("a:1", text=np.array([1, 2, 3])),
        pp.Record("a:2", text=np.array([299, 300])),
        pp.Record("a:3", text=np.array([[1, 2]])),
        pp.Record("a:4", text="plain text"),
    ]
    with pytest.raises(pp.PreprocessError) as e:
        pp.write_shards("text", recs, tmp_path / "o", text_tok)
    assert "a:2: token id outside the text vocabulary [0, 300)" in str(e.value)
    assert "a:3: token ids must be a 1-D integer array" in str(e.value)
    m = pp.write_shards("text", recs, tmp_path / "o", text_tok, skip_bad=True)
    assert m["num_samples"] == 2 and m["bad_records"] == 2
    s = LocalStream(tmp_path / "o")
    assert s[0]["tokens"].tolist() == [1, 2, 3]
    assert text_tok.decode(s[1]["tokens"]) == "plain text"


def test_train_tokenizer_flag(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("\n\n".join(f"the red circle number {i} is on the left." for i in range(200)))
    rc = cli(
        "text",
        "--input",
        src,
        "--train-tokenizer",
        tmp_path / "bpe.tiktoken",
        "--vocab-size",
        280,
        "--out",
        tmp_path / "o",
        "--no-progress",
    )
    assert rc == 0
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["vocab"]["text_size"] == 280 and m["num_samples"] == 200
    assert m["text_tokenizer"] == str(tmp_path / "bpe.tiktoken")


def test_audio_wavs_with_worker_pool(tmp_path, text_tok):
    from megadiff.data.tokenizers.audio import SpectralRVQ, write_wav
    from megadiff.demo.synth import formant_say

    phrases = [f"a red circle {w}" for w in ("left", "right", "top", "bottom")] * 2
    wavs = [formant_say(p, 16000) for p in phrases]
    codec = SpectralRVQ(codebook_size=16, num_codebooks=2).fit(wavs, iters=3)
    codec.save(tmp_path / "a.codec")
    lines = []
    for i, (p, w) in enumerate(zip(phrases, wavs)):
        write_wav(tmp_path / f"{i}.wav", w, 16000)
        lines.append(json.dumps({"audio": f"{i}.wav", "text": p}))
    (tmp_path / "bad.wav").write_bytes(b"RIFF nonsense")
    lines.append(json.dumps({"audio": "bad.wav", "text": "x"}))
    (tmp_path / "clips.jsonl").write_text("\n".join(lines) + "\n")
    rc = cli(
        "audio",
        "--input",
        tmp_path / "clips.jsonl",
        "--tokenizer",
        text_tok.spec,
        "--modal-tokenizer",
        tmp_path / "a.codec",
        "--out",
        tmp_path / "o",
        "--workers",
        2,
        "--skip-bad",
        "--no-progress",
    )
    assert rc == 0
    s = LocalStream(tmp_path / "o")
    assert len(s) == 8
    from megadiff.data.tokenizers.audio import read_wav

    x, _ = read_wav(tmp_path / "5.wav")
    assert np.array_equal(s[5]["codes"], codec.encode(x))
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["bad_records"] == 1 and f"{tmp_path / 'clips.jsonl'}:9" in m["bad_examples"][0]
    assert m["vocab"]["audio_num_codebooks"] == 2


def test_non_utf8_input_names_file_and_line(tmp_path, text_tok, capsys):
    jsonl, txt, caps = tmp_path / "in.jsonl", tmp_path / "in.txt", tmp_path / "caps.txt"
    jsonl.write_bytes(b'{"text": "a red circle"}\n{"text": "caf\xe9"}\n')
    txt.write_bytes(b"para one\n\npara\n\xff two\n")
    for src in (jsonl, txt):
        out = tmp_path / f"out{src.suffix}"
        assert cli("text", "--input", src, "--tokenizer", text_tok.spec, "--out", out) == 2
        assert not out.exists()
    err = capsys.readouterr().err
    assert f"{jsonl}:2: not valid UTF-8 (byte 0xe9 at column 14); re-encode" in err
    assert f"{txt}:4: not valid UTF-8 (byte 0xff at column 1)" in err
    np.save(tmp_path / "codes.npy", np.zeros((2, 4, 4), np.int64))
    caps.write_bytes(b"one\ntw\xf6\n")
    (tmp_path / "meta.json").write_text('{"codebook_size": 8, "grid": [4, 4]}')
    args = ["--codes", tmp_path / "codes.npy", "--codes-meta", tmp_path / "meta.json"]
    rc = cli(
        "image", *args, "--captions", caps, "--tokenizer", text_tok.spec, "--out", tmp_path / "i"
    )
    assert rc == 2 and f"{caps}:2: not valid UTF-8" in capsys.readouterr().err


def test_uncaptioned_arrays_are_an_error(tmp_path, text_tok, image_tok):
    imgs, caps = shape_dataset(3)
    np.save(tmp_path / "imgs.npy", imgs)
    (tmp_path / "caps.txt").write_text("\n".join(caps[:2]) + "\n")
    out = tmp_path / "o"
    r = megadiff_cli("preprocess", "image", *image_args(tmp_path, text_tok, image_tok, out))
    assert r.returncode == 2, r.stderr
    assert f"'{tmp_path / 'imgs.npy'}' has 3 entries but" in r.stderr
    assert "captions 2 of them (no caption for id(s) 2)" in r.stderr
    assert not out.exists()
    r = megadiff_cli("preprocess", "text", "--input", "x.txt", "--out", out, "--workers", 0)
    assert r.returncode == 2 and "--workers: must be a positive integer, got '0'" in r.stderr
