"""megadiff <-> Hugging Face conversion: logits parity with megatron-core at the saved layout,
offline AutoModel loading, export -> import -> export round trip, training from an import,
and clear errors for bad inputs."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megadiff.parallel.launch import run_world
from tests.workers import convert, megatron_logits_at, session

ROOT = Path(__file__).resolve().parents[1]
TP2 = ["parallel.tensor_parallel=2"]
TP2PP2 = [*TP2, "parallel.pipeline_parallel=2"]
VOCAB, PADDED = 120, 128  # TINY's vocabulary and its padded size
TOL = 1e-5


def _env(tmp: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))
    }
    env.update(
        PYTHONPATH=str(ROOT),
        PYTHONWARNINGS="ignore",
        HF_HOME=str(tmp / "hf_home"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    return env


def cli(args: list[str], tmp: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megadiff", "convert", *args],
        cwd=ROOT,
        env=_env(tmp),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_in_process(args: list[str]) -> subprocess.CompletedProcess:
    """``megadiff convert ARGS`` in this process (for errors found before any work starts)."""
    from megadiff.cli import main

    err, argv = io.StringIO(), sys.argv
    with contextlib.redirect_stderr(err):
        try:
            code = main(["convert", *args])
        except SystemExit as e:
            code = e.code
        finally:
            sys.argv = argv
    return subprocess.CompletedProcess(args, code, "", err.getvalue())


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Two trained checkpoints (2 steps): at TP1 (1 rank) and at TP2 x PP2 (4 ranks)."""
    root = tmp_path_factory.mktemp("convert")
    run_world(session, 1, ([], str(root / "run_tp1"), 2, True, 1))
    run_world(session, 4, (TP2PP2, str(root / "run_tp2pp2"), 2, True, 1))
    return root


def ckpt(work: Path, name: str) -> Path:
    return work / f"run_{name}" / "checkpoints" / "step_00000002"


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (3, 16), generator=gen)
    tokens[torch.rand(3, 16, generator=gen) < 0.3] = 42  # the synthetic layout's MASK at 120 ids
    pad = torch.zeros(3, 16, dtype=torch.bool)
    pad[2, -6:] = True
    return tokens, pad


def auto_model_logits(folder: Path, tokens, pad, tmp: Path) -> torch.Tensor:
    """``AutoModel.from_pretrained(trust_remote_code=True)`` in a fresh offline process."""
    code = (
        "import sys, torch\n"
        "from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM\n"
        "t, p = torch.load(sys.argv[2])\n"
        "assert AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True).model_type "
        "== 'megadiff'\n"
        "AutoModelForMaskedLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "m = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
        "with torch.no_grad():\n"
        "    torch.save(m(input_ids=t, attention_mask=(~p).long()).logits, sys.argv[3])\n"
    )
    torch.save((tokens, pad), tmp / "inputs.pt")
    r = subprocess.run(
        [sys.executable, "-c", code, str(folder), str(tmp / "inputs.pt"), str(tmp / "out.pt")],
        cwd=tmp,
        env={**_env(tmp), "PYTHONPATH": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(tmp / "out.pt")


def assert_parity(ours: torch.Tensor, theirs: torch.Tensor, pad: torch.Tensor) -> None:
    assert ours.shape == theirs.shape == (*pad.shape, PADDED)
    assert torch.isneginf(ours[..., VOCAB:]).all() and torch.isneginf(theirs[..., VOCAB:]).all()
    keep = ~pad  # logits at padding positions are not compared
    diff = (ours[..., :VOCAB] - theirs[..., :VOCAB]).abs()[keep].max().item()
    assert diff <= TOL, f"max |logit diff| {diff:.2e}"


def safetensors_of(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("layout", ["tp1", "tp2pp2"])
def test_export_matches_megatron_logits(work, layout, tmp_path):
    out = work / f"hf_{layout}"
    extra = ["--shard-size", "60KB"] if layout == "tp2pp2" else []
    r = cli(
        ["to-hf", "--ckpt", str(ckpt(work, layout)), "--out", str(out), "--verify", *extra],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "logits parity OK" in r.stdout
    names = {p.name for p in out.iterdir()}
    code = {"configuration_megadiff.py", "network_megadiff.py", "modeling_megadiff.py"}
    assert {"config.json", *code} <= names
    assert "megadiff.yaml" in names
    if layout == "tp2pp2":  # sharded: an index and several files
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    else:
        assert "model.safetensors" in names
    config = json.loads((out / "config.json").read_text())
    vocab = json.loads((out / "vocab.json").read_text())  # the synthetic run's layout
    assert vocab["vocab_size"] == VOCAB and vocab["extra"] == {"source": "synthetic"}
    assert config["model_type"] == "megadiff" and config["mask_token_id"] == vocab["mask_id"]
    assert not list(work.glob("*-partial-*"))

    tokens, pad = inputs()
    theirs = auto_model_logits(out, tokens, pad, tmp_path)
    # megatron-core at a sharded layout: the checkpoint loaded by a trainer at TP2 (and TP1)
    load = f"checkpoint.load={ckpt(work, layout)}"
    for world, over in ((2, TP2), (1, [])):
        got = run_world(
            megatron_logits_at, world, ([*over, load], str(tmp_path / "m"), tokens, pad)
        )
        assert_parity(got[0]["logits"], theirs, pad)


def test_export_copies_vocab_and_tokenizers_and_generates(work, tmp_path):
    """A checkpoint with vocab.json + tokenizers/: both are exported, the ids come from the
    vocabulary, and the model's generate helper fills masks inside a modality range."""
    from megadiff.checkpoint_files import write_manifest
    from megadiff.data.vocab import VocabLayout

    src = tmp_path / "ck"
    shutil.copytree(ckpt(work, "tp1"), src)
    layout = VocabLayout(text_size=40, image_codebook_size=30, audio_codebook_size=20)
    assert layout.vocab_size <= VOCAB
    (src / "vocab.json").write_text(layout.to_json())
    (src / "tokenizers").mkdir()
    (src / "tokenizers" / "text.tiktoken").write_text("YQ== 0\n")
    (src / "tokenizers" / "text.json").write_text('{"name": "t"}')
    (src / "manifest.json").unlink()
    write_manifest(src, 2)
    out = tmp_path / "hf"
    res = run_world(convert, 1, ("to-hf", str(src), str(out), {}))[0]
    assert res["error"] is None, res
    assert (out / "tokenizers" / "text.tiktoken").read_text() == "YQ== 0\n"
    assert (out / "tokenizers" / "text.json").is_file()
    assert json.loads((out / "vocab.json").read_text())["mask_id"] == layout.mask_id
    config = json.loads((out / "config.json").read_text())
    assert config["mask_token_id"] == layout.mask_id
    assert config["modality_ranges"]["image"] == list(layout.ranges()[1])

    code = (
        "import sys, torch\n"
        "from transformers import AutoModel\n"
        "m = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "x = torch.full((2, 16), m.config.mask_token_id)\n"
        "x[:, 0] = 3\n"
        "y = m.generate(x, steps=4, modality='image')\n"
        "print(y.tolist())\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(out)],
        cwd=tmp_path,
        env={**_env(tmp_path), "PYTHONPATH": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    y = torch.tensor(json.loads(r.stdout.strip().splitlines()[-1]))
    lo, hi = layout.ranges()[1]
    assert (y[:, 0] == 3).all()
    assert ((y[:, 1:] >= lo) & (y[:, 1:] < hi)).all()


def test_round_trip_and_training_from_import(work, tmp_path):
    """HF (from TP2xPP2) -> megadiff at TP2 -> HF again: identical tensors; the imported
    checkpoint trains at TP2 with the same first eval/step loss as the source checkpoint."""
    first = work / "hf_tp2pp2"
    if not first.is_dir():
        r = cli(["to-hf", "--ckpt", str(ckpt(work, "tp2pp2")), "--out", str(first)], tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
    imported = tmp_path / "imported"
    r = cli(["from-hf", "--hf", str(first), "--out", str(imported), "--verify", *TP2], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "logits parity OK" in r.stdout and "TP2xPP1xDP1" in r.stdout
    meta = json.loads((imported / "meta.json").read_text())
    assert meta["layout"]["tp"] == 2 and meta["step"] == 0
    assert (imported / "manifest.json").is_file()

    again = tmp_path / "again"
    res = run_world(convert, 1, ("to-hf", str(imported), str(again), {}))[0]
    assert res["error"] is None, res
    a, b = safetensors_of(first), safetensors_of(again)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k

    reset = ["checkpoint.reset_step=true"]  # both start at step 0: same batch and noise
    src = run_world(
        session,
        2,
        (
            [*TP2, *reset, f"checkpoint.load={ckpt(work, 'tp2pp2')}"],
            str(tmp_path / "src"),
            0,
            False,
            1,
        ),
    )[0]
    new = run_world(
        session,
        2,
        ([*TP2, *reset, f"checkpoint.load={imported}"], str(tmp_path / "new"), 0, False, 1),
    )[0]
    want = src["eval"]["loss"]
    assert abs(new["eval"]["loss"] - want) <= 1e-6 * abs(want)
    assert abs(new["losses"][0] - src["losses"][0]) <= 1e-6 * abs(want)
    assert new["losses"][0] == pytest.approx(new["eval"]["loss"], rel=1e-5)  # fwd only vs step


def _hf_folder(work: Path, tmp: Path) -> Path:
    folder = work / "hf_tp1"
    if not folder.is_dir():
        assert (
            run_world(convert, 1, ("to-hf", str(ckpt(work, "tp1")), str(folder), {}))[0]["error"]
            is None
        )
    copy = tmp / "hf_copy"
    shutil.copytree(folder, copy)
    return copy


def test_bad_inputs_are_clear_errors(work, tmp_path):
    from megadiff.export.errors import ConvertError
    from megadiff.export.from_hf import read_hf

    out = tmp_path / "out"
    # not a megadiff checkpoint / incomplete checkpoints (missing shard, missing manifest)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hi")
    no_shard = tmp_path / "no_shard"
    shutil.copytree(ckpt(work, "tp1"), no_shard)
    shard = sorted(no_shard.glob("*.distcp"))[0]
    shard.unlink()
    no_manifest = tmp_path / "no_manifest"
    shutil.copytree(ckpt(work, "tp1"), no_manifest)
    (no_manifest / "manifest.json").unlink()
    for bad, named in ((plain, plain), (no_shard, shard), (no_manifest, no_manifest)):
        res = run_world(convert, 1, ("to-hf", str(bad), str(out), {}))[0]
        assert res["error"] == "CheckpointError" and str(named) in res["message"], res
        assert not out.exists()

    # HF folders: another architecture, mismatched shapes, missing weights
    folder = _hf_folder(work, tmp_path)
    other = tmp_path / "bert"
    shutil.copytree(folder, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(ConvertError, match="'bert'") as e:
        read_hf(other)
    assert str(other) in str(e.value)
    shapes = tmp_path / "shapes"
    shutil.copytree(folder, shapes)
    (shapes / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(ConvertError, match="linear_fc1.weight: shape") as e:
        read_hf(shapes)
    assert str(shapes) in str(e.value)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ConvertError, match="model.safetensors") as e:
        read_hf(folder)
    assert str(folder) in str(e.value)

    # output exists: refused without --overwrite (exit 2, nothing changed)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = cli_in_process(["from-hf", "--hf", str(other), "--out", str(out)])
    assert r.returncode == 2 and str(out) in r.stderr and "--overwrite" in r.stderr, r.stderr
    r = cli_in_process(["to-hf", "--ckpt", str(ckpt(work, "tp1")), "--out", str(out)])
    assert r.returncode == 2 and str(out) in r.stderr and "--overwrite" in r.stderr, r.stderr
    assert (out / "keep.txt").read_text() == "mine"
    r = cli_in_process(["from-hf", "--hf", str(other), "--out", str(tmp_path / "o2")])
    assert r.returncode == 2 and str(other) in r.stderr and "bert" in r.stderr, r.stderr


def test_bad_from_hf_configs_and_flags_exit_2(work, tmp_path):
    """A model override, an edited vocab_size, a garbage megadiff.yaml and bad numeric flags
    are named errors (exit 2) before anything is converted; --out is never created."""
    folder = _hf_folder(work, tmp_path)
    out = tmp_path / "out"

    def from_hf(
        *extra: str, folder: Path = folder, here: bool = True
    ) -> subprocess.CompletedProcess:
        args = ["from-hf", "--hf", str(folder), "--out", str(out), *extra]
        r = cli_in_process(args) if here else cli(args, tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert not out.exists()
        return r

    r = from_hf("model.vocab_size=200", here=False)  # the real command once
    assert "model.vocab_size=200" in r.stderr and f"{VOCAB} (config.json)" in r.stderr
    edited = tmp_path / "edited"
    shutil.copytree(folder, edited)
    cfg = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**cfg, "vocab_size": 100}))
    r = from_hf(folder=edited)  # the export's vocab.json (a synthetic layout) disagrees
    assert "vocab.json has 120 ids" in r.stderr and "config.json is 100" in r.stderr
    (edited / "vocab.json").unlink()
    (edited / "config.json").write_text(json.dumps({**cfg, "vocab_size": 40}))
    r = from_hf(folder=edited)  # same padded shapes, special ids (mask 42) out of range
    assert "config.json" in r.stderr and "vocab_size 40" in r.stderr
    garbage = {
        b"\x89PNG\r\n\x1a\n\x00\xff": "is not UTF-8",
        b"train: {steps: 1}\ntrain: {steps: 2}\n": "line 2: key 'train' is given twice",
        b"- a\n- list\n": "must contain a mapping",
        b"model: {hidden_sise: 3}\n": "is not a megadiff training config",
    }
    for content, message in garbage.items():
        (folder / "megadiff.yaml").write_bytes(content)
        r = from_hf()
        assert str(folder / "megadiff.yaml") in r.stderr and message in r.stderr, r.stderr
    for flag, value in (("--tolerance", "nan"), ("--tolerance", "-1")):
        r = from_hf(flag, value)
        assert f"argument {flag}: must be" in r.stderr and value in r.stderr
    for size in ("0", "-5GB", "lots"):
        to_hf = ["to-hf", "--ckpt", str(ckpt(work, "tp1")), "--out", str(out)]
        r = cli_in_process([*to_hf, f"--shard-size={size}"])
        assert r.returncode == 2 and "argument --shard-size: must be a positive size" in r.stderr
    assert not out.exists()


def test_failed_verify_leaves_nothing(work, tmp_path):
    """A logits mismatch above the tolerance fails both directions; --out is not created."""
    out = tmp_path / "out"
    res = run_world(convert, 1, ("to-hf", str(ckpt(work, "tp1")), str(out), {"verify": True}, 1e-3))
    assert res[0]["error"] == "ParityError" and "FAILED" in res[0]["message"], res
    folder = _hf_folder(work, tmp_path)
    res = run_world(convert, 1, ("from-hf", str(folder), str(out), {"verify": True}, 1e-3))
    assert res[0]["error"] == "ParityError" and "FAILED" in res[0]["message"], res
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    # the same conversions pass without the perturbation
    res = run_world(convert, 1, ("from-hf", str(folder), str(out), {"verify": True}))
    assert res[0]["error"] is None and res[0]["diff"] <= TOL, res


def test_completep_residual_scale_parity(tmp_path):
    """CompleteP's residual-branch scale (4 layers over a base of 2: 0.5) is exported and the
    --verify parity against megatron-core holds."""
    over = ["model.parameterization=completep", "model.base_num_layers=2"]
    run_world(session, 1, (over, str(tmp_path / "run"), 1, True, 1))
    out = tmp_path / "hf"
    res = run_world(convert, 1, ("to-hf", str(tmp_path / "run"), str(out), {"verify": True}))[0]
    assert res["error"] is None and res["diff"] <= TOL, res
    assert json.loads((out / "config.json").read_text())["residual_scale"] == 0.5


def test_missing_transformers_is_a_clear_error(tmp_path):
    """Without the hf extra, `megadiff convert` says what to install instead of a traceback."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'transformers':\n"
        "            raise ModuleNotFoundError(name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{ROOT}"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "megadiff",
            "convert",
            "to-hf",
            "--ckpt",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert r.returncode == 2, r.stderr
    assert "tools/install.sh --hf" in r.stderr and "Traceback" not in r.stderr
