"""The exported model's ``generate()`` (blocks, strategies, block KV caches), loaded from an
export folder with ``AutoModel.from_pretrained(trust_remote_code=True)`` in a fresh offline
process, against megadiff's own sampler on the same weights, token for token."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from megadiff.config import load_config
from megadiff.data.synthetic import synthetic_layout
from megadiff.diffusion.sampling import SamplerConfig, sample
from megadiff.export.to_hf import CODE_FILES, HF_CODE, build_hf_model, hf_config
from megadiff.generation.adapters import reference_logits_fn
from megadiff.model.reference import ReferenceConfig, ReferenceModel
from tests.sampling_workers import text_buffer
from tests.test_convert import _env
from tests.workers import TINY

MODEL = [*TINY, "model.seq_length=32", "model.num_query_groups=2", "model.qk_layernorm=true"]
SETTINGS = {  # SamplerConfig fields, the same names as generate()'s keywords
    "none": dict(strategy="confidence", steps=8, block_length=4),
    "prefix": dict(strategy="confidence", steps=8, block_length=4, cache="prefix"),
    "dual": dict(strategy="confidence", steps=8, block_length=4, cache="dual"),
    "dual_threshold": dict(strategy="threshold", threshold=0.3, block_length=4, cache="dual"),
    "prefix_margin": dict(strategy="margin", steps=6, block_length=8, cache="prefix"),
    "dual_one_per_step": dict(strategy="confidence", steps=16, block_length=5, cache="dual"),
}


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """An export folder of a 2-layer model (GQA, QK-norm, random peaked weights), written as
    ``megadiff convert to-hf`` writes one, and the text buffers to fill."""
    base = tmp_path_factory.mktemp("hf")
    cfg = load_config(None, MODEL)
    vocab = synthetic_layout(cfg.model.vocab_size)
    torch.manual_seed(0)
    net = ReferenceModel(ReferenceConfig.from_model_config(cfg.model))
    for p in net.parameters():
        p.data.normal_(0.0, 0.3) if p.dim() > 1 else p.data.fill_(1.0)
    model = build_hf_model(hf_config(cfg, vocab.to_dict()), net.state_dict())
    folder = base / "export"
    model.save_pretrained(folder, safe_serialization=True)
    for name in CODE_FILES:
        shutil.copyfile(HF_CODE / name, folder / name)
    x, mod, _ = text_buffer(vocab, [3, 10, 6], 16, seed=1)
    return folder, vocab, x, mod


def auto_model_generate(folder, x, attention_mask, token_range, tmp) -> dict:
    """``generate()`` of every setting in a fresh offline process that loads ``folder`` with
    ``AutoModel.from_pretrained(trust_remote_code=True)``."""
    code = (
        "import json, sys, torch\n"
        "from transformers import AutoModel\n"
        "m = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
        "x, am = torch.load(sys.argv[2])\n"
        "settings, lo, hi = json.loads(sys.argv[3])\n"
        "out = {k: m.generate(x, am, token_range=(lo, hi), **s) for k, s in settings.items()}\n"
        "torch.save(out, sys.argv[4])\n"
    )
    torch.save((x, attention_mask), tmp / "in.pt")
    args = [str(folder), str(tmp / "in.pt"), json.dumps([SETTINGS, *token_range])]
    r = subprocess.run(
        [sys.executable, "-c", code, *args, str(tmp / "out.pt")],
        cwd=tmp,
        env={**_env(tmp), "PYTHONPATH": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(tmp / "out.pt")


def test_hf_generate_equals_megadiffs_sampler_on_the_export(export, tmp_path):
    folder, vocab, x, mod = export
    text = tuple(vocab.ranges()[0])  # the sampler's text row: text and special tokens
    hf = auto_model_generate(folder, x, (x != vocab.pad_id).long(), text, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    net = ReferenceModel(ReferenceConfig.from_model_config(load_config(None, MODEL).model))
    net.load_state_dict(load_file(folder / "model.safetensors"))  # the export's weights
    fn = reference_logits_fn(net, config["pad_token_id"], config["vocab_size"])
    ranges = torch.from_numpy(vocab.ranges_array())
    for name, settings in SETTINGS.items():
        ours = sample(fn, x, mod, ranges, vocab.mask_id, SamplerConfig(**settings)).tokens
        assert torch.equal(hf[name], ours), name
        filled = hf[name][x == vocab.mask_id]
        assert bool(((filled >= text[0]) & (filled < text[1])).all()), name
    assert not torch.equal(hf["dual"], hf["none"])  # the cache's approximation is in use


def test_hf_generate_bad_settings_are_named(export):
    folder, vocab, x, _ = export
    model = build_hf_model(
        hf_config(load_config(None, MODEL), vocab.to_dict()),
        load_file(folder / "model.safetensors"),
    )
    cases = [
        (dict(cache="dual"), "cache 'dual' needs blocks"),
        (dict(cache="full", block_length=4), "cache must be one of none, prefix, dual"),
        (dict(strategy="entropy"), "strategy must be one of confidence, margin, threshold"),
        (dict(block_length=0), "block_length must be >= 1"),
        (dict(threshold=0.0, strategy="threshold"), r"threshold must be in \(0, 1\]"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            model.generate(x, modality="text", **kwargs)
    # defaults: one block, one position per step, the modality's range
    y = model.generate(x, (x != vocab.pad_id).long(), modality="text")
    lo, hi = vocab.ranges()[0]
    filled = y[x == vocab.mask_id]
    assert bool(((filled >= lo) & (filled < hi)).all())
