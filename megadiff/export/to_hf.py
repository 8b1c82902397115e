"""megadiff checkpoint (any TP/PP/VPP layout) -> Hugging Face folder.

The folder holds ``config.json`` (``model_type: megadiff``, ``auto_map`` for ``AutoConfig``,
``AutoModel`` and ``AutoModelForMaskedLM``), ``model.safetensors`` (or shards plus
``model.safetensors.index.json``), ``configuration_megadiff.py``, ``network_megadiff.py`` and
``modeling_megadiff.py`` (copied from :mod:`megadiff.hf`), ``vocab.json``, ``tokenizers/`` and
``megadiff.yaml`` (the source run's config, which ``from-hf`` uses to restore the rest of the
training config). With a text tokenizer and a vocabulary layout, also ``tokenization_megadiff.py``
and ``tokenizer_config.json``: ``AutoTokenizer.from_pretrained(folder, trust_remote_code=True)``
then encodes and decodes with the model's ids.
Parameter names are megadiff's global names, unchanged. Files are written with the permissions
of any new file (``0666`` less the umask, folders ``0777`` less it).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from megadiff.export.errors import ConvertError, ParityError
from megadiff.export.parity import (
    DEFAULT_TOL,
    Parity,
    compare,
    hf_logits,
    megatron_logits,
    random_inputs,
)

HF_CODE = Path(__file__).resolve().parents[1] / "hf"
CODE_FILES = ("configuration_megadiff.py", "network_megadiff.py", "modeling_megadiff.py")
TOKENIZER_CODE = "tokenization_megadiff.py"
AUTO_MAP = {
    "AutoConfig": "configuration_megadiff.MegadiffConfig",
    "AutoModel": "modeling_megadiff.MegadiffForMaskedDiffusion",
    "AutoModelForMaskedLM": "modeling_megadiff.MegadiffForMaskedDiffusion",
}


def vocab_info(cfg, vocab: dict | None) -> dict:
    """``mask_token_id``, ``pad_token_id`` and ``modality_ranges`` of the checkpoint's data."""
    if vocab is None and cfg.data.source == "synthetic":  # a checkpoint without vocab.json
        from megadiff.data.synthetic import synthetic_layout

        vocab = synthetic_layout(cfg.model.vocab_size).to_dict()
    if vocab is None:
        return {"mask_token_id": None, "pad_token_id": None, "modality_ranges": {}}
    return {
        "mask_token_id": vocab["mask_id"],
        "pad_token_id": vocab["pad_id"],
        "modality_ranges": {k: list(v) for k, v in vocab["ranges"].items()},
    }


def hf_config(cfg, vocab: dict | None, source: dict | None = None):
    """The :class:`MegadiffConfig` of a megadiff ``Config`` (model shape + vocabulary)."""
    from megadiff.hf.configuration_megadiff import MegadiffConfig
    from megadiff.model.reference import ReferenceConfig

    m = cfg.model
    a = ReferenceConfig.from_model_config(m)  # the network's shape, derived in one place
    c = MegadiffConfig(
        vocab_size=a.vocab_size,
        padded_vocab_size=a.padded_vocab_size,
        vocab_pad_multiple=m.vocab_pad_multiple,
        hidden_size=a.hidden_size,
        num_hidden_layers=a.num_layers,
        num_attention_heads=a.num_attention_heads,
        num_key_value_heads=a.num_query_groups,
        intermediate_size=a.ffn_hidden_size,
        max_position_embeddings=m.seq_length,
        rope_theta=a.rotary_base,
        norm_eps=a.norm_epsilon,
        normalization=a.normalization,
        qk_layernorm=a.qk_layernorm,
        residual_scale=a.residual_scale,
        initializer_range=m.init_method_std,
        **vocab_info(cfg, vocab),
    )
    c.auto_map = dict(AUTO_MAP)
    c.architectures = ["MegadiffForMaskedDiffusion"]
    c.dtype = "float32"
    if source:
        c.megadiff_source = source
    return c


def build_hf_model(config, params: dict[str, torch.Tensor]):
    """The HF model with ``params`` (megadiff global names) loaded, no random init."""
    from megadiff.hf.modeling_megadiff import MegadiffForMaskedDiffusion

    with torch.device("meta"):
        model = MegadiffForMaskedDiffusion(config)
    model.load_state_dict(params, strict=True, assign=True)
    return model.eval()


def write_hf_tokenizer(folder: Path, max_length: int) -> bool:
    """``tokenization_megadiff.py`` and ``tokenizer_config.json`` in an HF folder that has
    ``vocab.json`` and ``tokenizers/text.tiktoken``; returns whether it had them."""
    from megadiff.data.tokenizers.text import TokenizerError, load_text_tokenizer

    text = folder / "tokenizers" / "text.tiktoken"
    if not (text.is_file() and (folder / "vocab.json").is_file()):
        return False
    try:
        pat_str = load_text_tokenizer(str(text)).encoding._pat_str
    except TokenizerError as e:
        raise ConvertError(f"the checkpoint's text tokenizer cannot be loaded: {e}") from e
    shutil.copyfile(HF_CODE / TOKENIZER_CODE, folder / TOKENIZER_CODE)
    config = {
        "tokenizer_class": "MegadiffTokenizer",
        "auto_map": {"AutoTokenizer": [f"{Path(TOKENIZER_CODE).stem}.MegadiffTokenizer", None]},
        "pat_str": pat_str,
        "mask_token": "<mask>",
        "pad_token": "<pad>",
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return True


def normal_permissions(root: Path) -> None:
    """Give every file below ``root`` (and ``root``) the mode a new file gets here: ``0666`` /
    ``0777`` for folders, less the umask (some writers, safetensors among them, use ``0600``)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for path in root.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ConvertError(f"output {out} already exists (pass --overwrite to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConvertError(f"output {out}: cannot create its parent directory: {e}") from e


def temp_dir_for(out: Path) -> Path:
    """A fresh sibling of ``out`` (same file system: the final rename is atomic)."""
    tmp = out.parent / f"{out.name}-partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the complete ``tmp`` to ``out`` (an existing ``out`` is replaced when allowed)."""
    if out.exists():
        if not overwrite:
            raise ConvertError(f"output {out} already exists (pass --overwrite to replace it)")
        aside = out.parent / f"{out.name}-old-{os.getpid()}"
        out.rename(aside)
        tmp.rename(out)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        tmp.rename(out)


@dataclass
class Exported:
    out: Path
    step: int
    parity: Parity | None


def to_hf(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    overwrite: bool = False,
    verify: bool = False,
    shard_size: str | int = "5GB",
    tol: float = DEFAULT_TOL,
) -> Exported:
    """Export checkpoint ``ckpt`` to the HF folder ``out`` (written to a temp dir, then renamed).

    Raises :class:`~megadiff.checkpoint_files.CheckpointError` for a bad checkpoint,
    :class:`ConvertError` for a bad output, :class:`ParityError` when ``verify`` fails.
    """
    from megadiff.model.reader import read_checkpoint_model

    out = Path(out).absolute()
    check_output(out, overwrite)
    src = read_checkpoint_model(ckpt)
    source = {"checkpoint": str(src.path), **src.meta}
    config = hf_config(src.cfg, src.vocab, source)
    tmp = temp_dir_for(out)
    try:
        model = build_hf_model(config, src.params)
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=shard_size)
        for name in CODE_FILES:
            shutil.copyfile(HF_CODE / name, tmp / name)
        if src.vocab is not None:
            (tmp / "vocab.json").write_text(json.dumps(src.vocab, indent=1))
        if (src.path / "tokenizers").is_dir():
            shutil.copytree(src.path / "tokenizers", tmp / "tokenizers")
        shutil.copyfile(src.path / "config.yaml", tmp / "megadiff.yaml")
        write_hf_tokenizer(tmp, src.cfg.model.seq_length)
        normal_permissions(tmp)
        parity = None
        if verify:
            m = src.cfg.model
            tokens, pad = random_inputs(m.vocab_size, m.seq_length, config.mask_token_id)
            ref = megatron_logits(src.cfg, src.params, tokens, pad)
            parity = compare(ref, hf_logits(tmp, tokens, pad), pad, m.vocab_size, tol)
            if not parity.ok:
                raise ParityError(f"export of {src.path} to {out}: {parity.describe()}")
        publish(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Exported(out=out, step=int(src.meta.get("step", 0)), parity=parity)
