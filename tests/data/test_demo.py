import json
import re
from pathlib import Path

import numpy as np
import pytest

from megadiff.data.loader import MixtureLoader, StreamSpec
from megadiff.data.mds import LocalStream
from megadiff.demo.data import DemoParams, build_demo_data, load_demo_tokenizers
from megadiff.demo.shapes import BACKGROUND, COLORS

SMALL = DemoParams(
    text_vocab=512,
    n_arith_docs=50,
    n_lookup_docs=30,
    n_sums=400,
    n_images=300,
    image_patch=4,
    image_codebook=64,
    n_audio=40,
    audio_codebook=32,
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo_data(tmp_path_factory.mktemp("demo") / "d", SMALL, log=lambda *_: None)


def test_demo_streams_and_reuse(demo):
    v = demo.vocab
    assert v.text_size == 512 and v.image_codebook_size == 64 and v.audio_num_codebooks == 2
    for kind, n in (("image", 300), ("audio", 40)):  # training + held-out split
        train, val = LocalStream(demo.streams[kind]), LocalStream(f"{demo.streams[kind]}/val")
        assert len(train) + len(val) == n and len(val) >= 1
    again = build_demo_data(demo.root, SMALL, log=lambda *_: None)  # cached
    assert again == demo


def test_demo_streams_pass_preflight_and_verify(demo, capsys):
    from megadiff.cli import main
    from megadiff.config import load_config
    from megadiff.data.checks import preflight_data
    from megadiff.demo.command import DEMO
    from megadiff.plan import resolve

    streams = [demo.stream_entry(n) for n in demo.streams]
    over = [*DEMO, f"data.streams={json.dumps(streams)}", f"data.vocab={demo.vocab_path}"]
    over.append("model.seq_length=96")  # SMALL's 8x8 image grid
    preflight_data(resolve(load_config(None, over)).cfg)
    assert main(["data", "verify", demo.root, "--no-progress"]) == 0
    assert "8 of 8 stream(s) intact" in capsys.readouterr().out  # and their val/ splits


def test_demo_text_has_true_arithmetic_and_english(demo):
    tok, _, _ = load_demo_tokenizers(demo)
    streams = [LocalStream(p) for p in (demo.streams["text"], f"{demo.streams['text']}/val")]
    docs = [tok.decode(s[i]["tokens"]) for s in streams for i in range(len(s))]  # train + val
    eqs = [m for d in docs for m in re.findall(r"^(\d+)([+-])(\d+)=(\d+)$", d, re.MULTILINE)]
    assert len(eqs) == 8 * 50
    for a, op, b, c in eqs:
        assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(c)
    assert sum(" the " in d for d in docs) > 500  # real English prose


def test_demo_sums_stream_holds_true_single_digit_sums(demo):
    """The text task's stream: lines ``a+b=cc`` with one-digit operands and the right sum as two
    digits, one token per character; every one of the 100 facts is taught, and the held-out
    rows (the stream's ``val_path``) are other draws of the same facts."""
    tok, _, _ = load_demo_tokenizers(demo)
    assert set(demo.val_paths) == {"sums"}
    train, val = LocalStream(demo.streams["sums"]), LocalStream(demo.val_paths["sums"])
    assert len(train) == SMALL.n_sums and len(val) == SMALL.n_sums_val
    facts = []
    for s in (train, val):  # one sum per document
        lines = [tok.decode(s[i]["tokens"]) for i in range(len(s))]
        for line in lines:
            a, b, c = re.fullmatch(r"(\d)\+(\d)=(\d\d)", line).groups()
            assert int(a) + int(b) == int(c)
            assert len(tok.encode(line)) == len(line)
        facts.append(set(lines))
    assert len(facts[0]) == 100 and facts[1] <= facts[0]
    assert not (Path(demo.streams["sums"]) / "val").exists()  # no fact held out by content


def test_demo_text_has_lookup_groups_and_digit_tokens(demo):
    from megadiff.demo.data import one_token_words
    from megadiff.demo.scoring import lookup_answer

    tok, _, _ = load_demo_tokenizers(demo)
    s = LocalStream(demo.streams["text"])
    docs = [tok.decode(s[i]["tokens"]) for i in range(len(s))]
    pat = r"^([a-z]+)=(\d{6})\n([a-z]+)=(\d{6})\n([a-z]+)\?(\d{6})$"
    groups = [m for d in docs for m in re.findall(pat, d, re.MULTILINE)]
    assert len(groups) == 4 * 30
    words = set(one_token_words(tok))
    for k1, c1, k2, c2, q, a in groups:
        assert k1 != k2 and {k1, k2} <= words
        assert a == lookup_answer(f"{k1}={c1}\n{k2}={c2}\n{q}?")
        # one token per key and per digit
        ids = list(tok.encode(f"{k1}={c1}"))
        assert ids == [*tok.encode(k1), *tok.encode("="), *tok.encode(c1)] and len(ids) == 8


def test_demo_image_rows_match_captions(demo):
    tok, img_tok, _ = load_demo_tokenizers(demo)
    v = demo.vocab
    ld = MixtureLoader([StreamSpec("image", demo.streams["image"], tasks=["t2i"])], 96, 16, vocab=v)
    rows = next(ld)["tokens"].numpy()
    for row in rows:
        b = int(np.argmax(row == v.specials["<boi>"]))
        caption = tok.decode(row[1:b])
        img = img_tok.decode(row[b + 1 : b + 65] - v.image_start)[0].astype(int)
        y, x = {
            "left": (16, 9),
            "right": (16, 23),
            "top": (9, 16),
            "bottom": (23, 16),
            "center": (16, 16),
        }[caption.split()[-1]]
        pix = img[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).mean(0)
        palette = {**COLORS, "background": BACKGROUND}
        nearest = min(palette, key=lambda c: np.abs(pix - np.array(palette[c])).sum())
        assert nearest == caption.split()[1], (caption, pix)


def test_demo_audio_rows_decode(demo):
    tok, _, codec = load_demo_tokenizers(demo)
    v = demo.vocab
    ld = MixtureLoader([StreamSpec("audio", demo.streams["audio"], tasks=["t2s"])], 128, 2, vocab=v)
    row = next(ld)["tokens"].numpy()[0]
    b, e = int(np.argmax(row == v.specials["<boa>"])), int(np.argmax(row == v.specials["<eoa>"]))
    assert tok.decode(row[1:b]).startswith("a ")
    flat = row[b + 1 : e] - v.audio_start
    codes = flat.reshape(-1, 2) - np.array([0, 32])
    assert codes.min() >= 0 and codes.max() < 32
    wav = codec.decode(codes)
    assert 0.5 < len(wav) / 16000 < 3.0 and np.abs(wav).max() > 0.01


def test_checkpoint_tokenizer_files_found_and_loadable(demo, tmp_path):
    """The streams' manifests name the tokenizers; copies under fixed names load and agree."""
    from megadiff.config import load_config
    from megadiff.data.tokenizers.audio import SpectralRVQ
    from megadiff.data.tokenizers.files import copy_tokenizers, find_tokenizer_files
    from megadiff.data.tokenizers.image import PatchVQ
    from megadiff.data.tokenizers.text import load_text_tokenizer

    streams = [{"name": n, "path": p} for n, p in demo.streams.items()]
    cfg = load_config(None, ["data.source=mds", f"data.streams={json.dumps(streams)}"])
    assert sorted(find_tokenizer_files(cfg)) == ["audio", "image", "text"]
    assert copy_tokenizers(cfg, tmp_path) == ["audio", "image", "text"]
    tok, img_tok, aud_tok = load_demo_tokenizers(demo)
    text = load_text_tokenizer(str(tmp_path / "tokenizers" / "text.tiktoken"))
    assert list(text.encode("The cat sat. 12+7=19")) == list(tok.encode("The cat sat. 12+7=19"))
    assert PatchVQ.load(str(tmp_path / "tokenizers" / "image.vq")).codebook_size == 64
    assert SpectralRVQ.load(str(tmp_path / "tokenizers" / "audio.codec")).codebook_size == 32
    synthetic = load_config(None, [])  # no files; its checkpoints get a byte-level tokenizer
    assert find_tokenizer_files(synthetic) == {}
    assert copy_tokenizers(synthetic, tmp_path / "s") == ["text"]
    byte_tok = load_text_tokenizer(str(tmp_path / "s" / "tokenizers" / "text.tiktoken"))
    assert list(byte_tok.encode("hé")) == list("hé".encode())


def test_lookup_stream_one_problem_per_row(demo):
    """``--lookup``'s stream: single lookup problems whose answers check, read one per row."""
    from megadiff.demo.data import build_lookup_stream
    from megadiff.demo.scoring import lookup_answer

    tok, _, _ = load_demo_tokenizers(demo)
    path = build_lookup_stream(demo, n_docs=40, seed=1)
    ld = MixtureLoader([StreamSpec("lookup", path, pack=False)], 32, 8, vocab=demo.vocab)
    v, eot = demo.vocab, demo.vocab.specials["<eot>"]
    for row in next(ld)["tokens"].numpy():
        n = int(np.argmax(row == eot))
        assert (row[n + 1 :] == v.pad_id).all() and n + 1 < len(row)
        text = tok.decode(row[:n])
        prompt, answer = text[:-6], text[-6:]
        assert re.fullmatch(r"[a-z]+=\d{6}\n[a-z]+=\d{6}\n[a-z]+\?", prompt), text
        assert answer == lookup_answer(prompt)


def test_pick_stream_rows_hold_one_of_the_two_codes(demo):
    """``--pick``'s stream: ``a|b=`` then one of the two codes, ``;``, a 4-digit tag, and
    ``<eot>`` to the end of the row (``eos_fill``), the coin fair."""
    from megadiff.demo.data import build_pick_stream

    tok, _, _ = load_demo_tokenizers(demo)
    path = build_pick_stream(demo, n_docs=200, seed=1)
    spec = StreamSpec("pick", path, pack=False, eos_fill=True, prompt_end="=")
    ld = MixtureLoader([spec], 24, 64, vocab=demo.vocab)
    eot, firsts = demo.vocab.specials["<eot>"], []
    for row in next(ld)["tokens"].numpy():
        n = int(np.argmax(row == eot))
        assert n == 16 and (row[n:] == eot).all(), row
        m = re.fullmatch(r"(\d{3})\|(\d{3})=(\d{3});\d{4}", tok.decode(row[:n]))
        assert m and m.group(3) in (m.group(1), m.group(2)), tok.decode(row[:n])
        assert all(x != y for x, y in zip(m.group(1), m.group(2)))
        firsts.append(m.group(3) == m.group(1))
    assert 16 <= sum(firsts) <= 48  # a fair coin over 64 rows


def test_demo_data_reused_from_another_directory(demo, tmp_path, monkeypatch):
    """``demo.json`` records where the data was built; reused under another path (moved, or
    ``--data-dir`` given relative from elsewhere) every path points into the new place."""
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(demo.root, moved)
    monkeypatch.chdir(tmp_path)
    again = build_demo_data("moved", SMALL, log=lambda *_: None)
    assert again.root == "moved" and again.streams["text"] == str(Path("moved") / "text")
    assert again.val_paths["sums"] == str(Path("moved") / "sums_val")
    assert len(load_demo_tokenizers(again)[0].encode("1+2=3")) == 5  # the tokenizer found there
    assert (moved / "demo.json").read_bytes() == (Path(demo.root) / "demo.json").read_bytes()


@pytest.mark.parametrize(
    "tasks,lookup,msg", [(0.6, 0.6, "<= 1"), (-0.1, 0.0, "--tasks"), (0.0, 1.5, "--lookup")]
)
def test_demo_stream_shares_checked(tasks, lookup, msg, tmp_path):
    from megadiff.config import ConfigError
    from megadiff.demo.command import demo_streams

    with pytest.raises(ConfigError, match=msg):
        demo_streams(str(tmp_path / "never_built"), tasks, lookup)
    assert not (tmp_path / "never_built").exists()


@pytest.mark.parametrize(
    "arith,sums_rows,msg", [(0.6, 0.6, "<= 1"), (-0.1, 0.0, "--arith"), (0.0, 1.5, "--sums-rows")]
)
def test_demo_one_problem_stream_shares_checked(arith, sums_rows, msg, tmp_path):
    from megadiff.config import ConfigError
    from megadiff.demo.command import demo_streams

    with pytest.raises(ConfigError, match=msg):
        demo_streams(str(tmp_path / "never_built"), arith=arith, sums_rows=sums_rows)
    assert not (tmp_path / "never_built").exists()


def test_next_commands_follow_the_streams_trained(demo):
    """The demo's closing ``megadiff generate`` commands: one per task its streams taught; a
    one-problem stream's prompt with the rest of its training row as the buffer."""
    import shlex

    from megadiff.demo.command import MIXTURE, ONE_PROBLEM_PROMPTS, next_commands

    full = next_commands(Path("runs/demo"), list(MIXTURE), 64)
    tasks = [shlex.split(c)[shlex.split(c).index("--task") + 1] for c in full]
    assert tasks == ["t2i", "t2s", "text"] and "--gen-length 5" in full[2]
    # the demo's run carries the sums' buffer in its sampling section: not repeated
    carried = next_commands(Path("runs/demo"), list(MIXTURE), 64, {"text": {"gen_length": 5}})
    assert "--gen-length" not in carried[2] and carried[:2] == full[:2]
    tok, _, _ = load_demo_tokenizers(demo)
    for name, prompt in ONE_PROBLEM_PROMPTS.items():
        (cmd,) = next_commands(Path("runs/x"), [name], 56)
        args = shlex.split(cmd)
        assert args[args.index("--prompt") + 1] == prompt
        assert int(args[args.index("--gen-length") + 1]) == 56 - len(tok.encode(prompt))
