"""Hugging Face folder (``model_type: megadiff``) -> megadiff checkpoint.

The checkpoint is written by the real checkpoint code (:func:`save_checkpoint` of a
:class:`Trainer` whose weights were replaced by the HF ones), so it has the manifest, the
fully reshardable format and step 0 with a fresh optimizer: ``megadiff train ...
checkpoint.load=OUT`` trains from it at any TP/PP/DP layout. The layout it is written at
(``parallel.*`` overrides; default one process) does not matter for loading; a layout of more
than one rank runs as that many local gloo processes.

The training config written with it is the source run's (``megadiff.yaml`` in the folder,
defaults otherwise) with the model from ``config.json`` and the overrides applied (the layout
and training settings: an override of a ``model.*`` key that ``config.json`` sets is refused); the
conversion itself trains nothing and needs no data (it builds the trainer on the synthetic
source and copies ``vocab.json`` and ``tokenizers/`` from the folder).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from megadiff.export.to_hf import check_output, normal_permissions, publish, temp_dir_for

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
# the layout the checkpoint is written at unless overridden (the source run's is not kept)
ONE_PROCESS = {
    "tensor_parallel": 1,
    "pipeline_parallel": 1,
    "virtual_pipeline": None,
    "data_parallel": None,
    "sequence_parallel": False,
}


@dataclass
class HFModel:
    path: Path
    config: Any  # MegadiffConfig
    state: dict[str, torch.Tensor]
    train_config: dict  # the source run's config tree (megadiff.yaml), {} if absent


def _weight_files(hf: Path) -> list[Path]:
    if (hf / INDEX).is_file():
        try:
            shards = sorted(set(json.loads((hf / INDEX).read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ConvertError(f"{hf / INDEX} is not a valid safetensors index: {e}") from e
        missing = [s for s in shards if not (hf / s).is_file()]
        if missing:
            raise ConvertError(
                f"{hf}: weight shard {hf / missing[0]} (listed in {INDEX}) is missing"
            )
        return [hf / s for s in shards]
    if (hf / WEIGHTS).is_file():
        return [hf / WEIGHTS]
    raise ConvertError(f"{hf}: no {WEIGHTS} or {INDEX} (only safetensors weights are read)")


def read_hf(path: str | os.PathLike) -> HFModel:
    """Read and check an exported folder: model type, weight names and shapes."""
    from safetensors.torch import load_file

    from megadiff.hf.configuration_megadiff import MegadiffConfig
    from megadiff.hf.modeling_megadiff import MegadiffForMaskedDiffusion

    hf = Path(path).absolute()
    if not hf.is_dir():
        raise ConvertError(f"{hf} is not a directory (expected a Hugging Face model folder)")
    cfile = hf / "config.json"
    if not cfile.is_file():
        raise ConvertError(f"{hf} is not a Hugging Face model folder ({cfile} is missing)")
    try:
        tree = json.loads(cfile.read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{cfile} is not valid JSON: {e}") from e
    if tree.get("model_type") != MegadiffConfig.model_type:
        raise ConvertError(
            f"{hf} holds a model of type {tree.get('model_type')!r}, not 'megadiff' "
            f"(model_type in {cfile}); only megadiff exports can be imported"
        )
    config = MegadiffConfig.from_dict(tree)
    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(hf):
        try:
            state.update(load_file(str(f)))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types
            raise ConvertError(f"cannot read weights {f}: {e}") from e
    with torch.device("meta"):
        want = {
            k: tuple(v.shape) for k, v in MegadiffForMaskedDiffusion(config).state_dict().items()
        }
    problems = [f"missing {k}" for k in want if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in want]
    problems += [
        f"{k}: shape {tuple(state[k].shape)}, config.json implies {want[k]}"
        for k in want
        if k in state and tuple(state[k].shape) != want[k]
    ]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ConvertError(f"{hf}: weights do not match {cfile}: " + "; ".join(problems[:3]) + more)
    _check_vocab(hf, config)
    train = _training_config(hf / "megadiff.yaml")
    return HFModel(hf, config, {k: v.float() for k, v in state.items()}, train)


def _check_vocab(hf: Path, config: Any) -> None:
    """config.json's special ids lie below its ``vocab_size``, and ``vocab.json`` (when present)
    is a vocabulary layout of that many ids."""
    from megadiff.data.vocab import VocabError, VocabLayout

    vocab_size = config.vocab_size
    for name in ("mask_token_id", "pad_token_id"):
        token = getattr(config, name, None)
        if token is not None and not 0 <= token < vocab_size:
            raise ConvertError(
                f"{hf / 'config.json'}: {name} {token} is not below vocab_size {vocab_size}; "
                "was vocab_size changed after the export?"
            )
    path = hf / "vocab.json"
    if not path.is_file():
        return
    try:
        layout = VocabLayout.from_dict(json.loads(path.read_text()), str(path))
    except (ValueError, VocabError) as e:  # JSONDecodeError is a ValueError
        raise ConvertError(f"{path} is not a valid vocabulary layout: {e}") from e
    if layout.vocab_size != vocab_size:
        raise ConvertError(
            f"{path} has {layout.vocab_size} ids but vocab_size in {hf / 'config.json'} is "
            f"{vocab_size}; the two must come from the same export"
        )


def _training_config(path: Path) -> dict:
    """The source run's config tree (``megadiff.yaml``; {} when absent), checked to be one."""
    from megadiff.config import ConfigError, config_from_dict, read_yaml_mapping

    if not path.exists():
        return {}
    tree = read_yaml_mapping(path, "training config")  # ConfigError names the file
    try:
        config_from_dict(tree)
    except ConfigError as e:
        raise ConvertError(f"{path} is not a megadiff training config: {e}") from e
    return tree


def _check_model_overrides(user, src: HFModel) -> None:
    """Overrides may change the layout and training settings, not the model of config.json."""
    for key, value in model_tree(src.config).items():
        got = getattr(user.model, key)
        if got != value:
            raise ConvertError(
                f"override model.{key}={got}: the model in {src.path} has {value} (config.json) "
                "and its weights are converted as they are; drop the override (from-hf changes "
                "parallel.* and training settings only)"
            )


def model_tree(c) -> dict[str, Any]:
    """``model.*`` keys of a :class:`MegadiffConfig` (inverse of ``to_hf.hf_config``)."""
    pad_multiple = c.vocab_pad_multiple
    if -(-c.vocab_size // pad_multiple) * pad_multiple != c.padded_vocab_size:
        pad_multiple = c.padded_vocab_size  # any multiple that reproduces the padded size
    return {
        "num_layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "num_attention_heads": c.num_attention_heads,
        "num_query_groups": None
        if c.num_key_value_heads == c.num_attention_heads
        else c.num_key_value_heads,
        "ffn_hidden_size": c.intermediate_size,
        "vocab_size": c.vocab_size,
        "vocab_pad_multiple": pad_multiple,
        "seq_length": c.max_position_embeddings,
        "qk_layernorm": c.qk_layernorm,
        "rotary_base": int(c.rope_theta),
        "normalization": c.normalization,
        "norm_epsilon": c.norm_eps,
        "init_method_std": c.initializer_range,
    }


def build_configs(src: HFModel, overrides: list[str]) -> tuple[Any, Any, int]:
    """(config written with the checkpoint, config the conversion trainer runs, its world)."""
    from megadiff.config import config_from_dict, merge_dicts, parse_overrides
    from megadiff.model.completep import multipliers
    from megadiff.plan import resolve

    tree = merge_dicts(src.train_config, {"model": model_tree(src.config)})
    tree = merge_dicts(tree, {"checkpoint": {"dir": None, "load": None}, "parallel": ONE_PROCESS})
    tree = merge_dicts(tree, parse_overrides(overrides))
    user = config_from_dict(tree)
    _check_model_overrides(user, src)
    if abs(multipliers(user.model).residual - src.config.residual_scale) > 1e-12:
        raise ConvertError(
            f"{src.path}: residual_scale {src.config.residual_scale} in config.json does not "
            f"match model.parameterization={user.model.parameterization} of megadiff.yaml"
        )
    p = user.parallel
    world = p.tensor_parallel * p.pipeline_parallel * (p.data_parallel or 1)
    conv = config_from_dict(user.to_dict())
    conv.data.source, conv.data.streams, conv.data.vocab = "synthetic", [], None
    conv.checkpoint.resume, conv.checkpoint.async_save = False, False
    conv.train.engine, conv.train.precision = "megatron", "fp32"
    conv.logging.progress = False
    return user, resolve(conv, world).cfg, world


def _write(conv_tree: dict, hf: str, root: str) -> int:
    """One rank: trainer at the conversion layout, HF weights in, checkpoint out."""
    from safetensors.torch import load_file

    from megadiff.config import config_from_dict
    from megadiff.model.gather import load_full_tensors
    from megadiff.parallel.env import read_launch_env
    from megadiff.parallel.state import destroy_distributed
    from megadiff.plan import resolve
    from megadiff.training.trainer import Trainer

    cfg = config_from_dict(conv_tree)
    cfg.run.dir, cfg.checkpoint.dir = f"{root}/run", f"{root}/ckpt"
    state = {}
    for f in _weight_files(Path(hf)):
        state.update({k: v.float() for k, v in load_file(str(f)).items()})
    trainer = Trainer(resolve(cfg, read_launch_env().world_size))
    try:
        load_full_tensors(trainer.model, state)
        trainer.optimizer.reload_model_params()  # fp32 main params <- the loaded weights
        with contextlib.redirect_stdout(io.StringIO()):  # its "saved" line names a temp folder
            trainer.save_checkpoint()
    finally:
        destroy_distributed()
    return trainer.step


def _finish(ckpt: Path, user, src: HFModel) -> None:
    """The user's config, vocabulary and tokenizers into ``ckpt``; manifest rewritten (replaced
    atomically by ``write_manifest``)."""
    from megadiff.checkpoint_files import write_manifest
    from megadiff.config import dump_config

    (ckpt / "config.yaml").write_text(dump_config(user))
    # the conversion trainer's own (synthetic) vocabulary and tokenizer are not the model's
    (ckpt / "vocab.json").unlink(missing_ok=True)
    shutil.rmtree(ckpt / "tokenizers", ignore_errors=True)
    if (src.path / "vocab.json").is_file():
        shutil.copyfile(src.path / "vocab.json", ckpt / "vocab.json")
    if (src.path / "tokenizers").is_dir():
        shutil.copytree(src.path / "tokenizers", ckpt / "tokenizers", dirs_exist_ok=True)
    write_manifest(ckpt, 0)


@dataclass
class Imported:
    out: Path
    layout: dict
    parity: Parity | None


def from_hf(
    hf: str | os.PathLike,
    out: str | os.PathLike,
    overrides: list[str] | None = None,
    overwrite: bool = False,
    verify: bool = False,
    tol: float = DEFAULT_TOL,
) -> Imported:
    """Import the HF folder ``hf`` as the megadiff checkpoint directory ``out``.

    Raises :class:`ConvertError` (bad folder or output), ``ConfigError`` (bad overrides),
    :class:`ParityError` when ``verify`` fails. Nothing is left at ``out`` on failure.
    """
    from megadiff.model.reader import read_checkpoint_model
    from megadiff.parallel.launch import run_world

    out = Path(out).absolute()
    check_output(out, overwrite)
    src = read_hf(hf)
    user, conv, world = build_configs(src, list(overrides or []))
    tmp = temp_dir_for(out)
    try:
        args = (conv.to_dict(), str(src.path), str(tmp))
        if world == 1:
            _write(*args)
        else:
            run_world(_write, world, args, env={"PYTHONWARNINGS": "ignore"})
        ckpt = tmp / "ckpt" / "step_00000000"
        _finish(ckpt, user, src)
        layout = json.loads((ckpt / "meta.json").read_text())["layout"]
        parity = None
        if verify:
            from megadiff.hf.modeling_megadiff import MegadiffForMaskedDiffusion

            back = read_checkpoint_model(ckpt)
            c = src.config
            tokens, pad = random_inputs(c.vocab_size, c.max_position_embeddings, c.mask_token_id)
            ref = MegadiffForMaskedDiffusion(c)
            ref.load_state_dict(src.state, strict=True)
            got = megatron_logits(back.cfg, back.params, tokens, pad)
            parity = compare(hf_logits(ref, tokens, pad), got, pad, c.vocab_size, tol)
            if not parity.ok:
                raise ParityError(f"import of {src.path} to {out}: {parity.describe()}")
        staged = tmp / "out"
        ckpt.rename(staged)
        normal_permissions(staged)
        publish(staged, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Imported(out=out, layout=layout, parity=parity)
