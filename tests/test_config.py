"""Config loading, overrides and validation: bad configs fail naming the key, before any spawn."""

from __future__ import annotations

import contextlib
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megadiff.config import ConfigError, StreamConfig, load_config, parse_overrides
from megadiff.plan import resolve


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        None, ["train.steps=7", "model.qk_layernorm=true", "optim.lr=1e-3", "run.dir=/x"]
    )
    assert cfg.train.steps == 7 and cfg.model.qk_layernorm is True
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.run.dir == "/x"
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


def test_yaml_file_and_override_precedence(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  steps: 5\n  seed: 3\noptim:\n  lr: 3e-4\n")
    cfg = load_config(p, ["train.steps=9"])
    assert (cfg.train.steps, cfg.train.seed, cfg.optim.lr) == (9, 3, 3e-4)


def test_dp_is_derived_from_world_size():
    plan = resolve(load_config(None, ["parallel.tensor_parallel=2", "train.global_batch=16"]), 8)
    assert plan.cfg.parallel.data_parallel == plan.dp == 4
    assert plan.n_micro == 16 // (4 * 4)


BAD = [
    # (overrides, world size, key that the message must name)
    (["model.hidden_sise=64"], 1, "model.hidden_size"),  # typo: suggestion
    (["model.num_attention_heads=3"], 1, "model.hidden_size"),  # 64 % 3
    (["parallel.tensor_parallel=8"], 8, "parallel.tensor_parallel"),  # 4 heads % 8
    (["model.num_layers=3", "parallel.pipeline_parallel=2"], 2, "model.num_layers"),
    (
        ["model.num_layers=4", "parallel.pipeline_parallel=2", "parallel.virtual_pipeline=4"],
        2,
        "model.num_layers",
    ),
    (["parallel.tensor_parallel=2"], 3, "parallel"),  # world 3 not divisible by TP 2
    (["parallel.data_parallel=4"], 2, "parallel.data_parallel"),
    (["train.global_batch=6", "train.micro_batch=4"], 1, "train.global_batch"),
    (["train.steps=0"], 1, "train.steps"),
    (["optim.beta2=1.5"], 1, "optim.beta2"),
    (["optim.lr=-1"], 1, "optim.lr"),
    (["diffusion.schedule=cosin"], 1, "diffusion.schedule"),
    (["train.micro_batch=two"], 1, "train.micro_batch"),
    (["model.qk_layernorm=maybe"], 1, "model.qk_layernorm"),
    (["parallel.virtual_pipeline=2"], 1, "parallel.virtual_pipeline"),
    (["diffusion.t_min=0"], 1, "diffusion.t_min"),
    (
        [
            "model.vocab_size=101",
            "model.vocab_pad_multiple=1",
            "parallel.tensor_parallel=2",
            "model.num_attention_heads=4",
        ],
        2,
        "parallel.tensor_parallel",
    ),
    (["parallel.sequence_parallel=true"], 1, "parallel.sequence_parallel"),
    (["data.source=mds"], 1, "data.streams"),
    (["bogus.key=1"], 1, "bogus"),
    (["train.engine=deepspeed", "parallel.tensor_parallel=2"], 2, "train.engine"),
    (["train.engine=deepspeed", "checkpoint.async_save=true"], 1, "checkpoint.async_save"),
    (["train.engine=deepspeed", "parallel.overlap_grad_reduce=true"], 1, "parallel.overlap_grad"),
    (["sampling.text.gen_length=0"], 1, "sampling.text.gen_length"),
    (["sampling.t2i.gen_length=4"], 1, "sampling.t2i.gen_length"),  # t2i writes an image
    (["sampling.poem.steps=4"], 1, "sampling.poem"),
    (["sampling.text.stepz=4"], 1, "sampling.text.stepz"),
    (["sampling.text.steps=four"], 1, "sampling.text.steps"),
    (["sampling.text.threshold=1.5"], 1, "sampling.text"),
    (["sampling.t2i.cache=dual", "sampling.t2i.block_length=null"], 1, "sampling.t2i"),
    (["sampling.text=5"], 1, "sampling.text"),
]


@pytest.mark.parametrize("overrides,world,key", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_invalid_config_names_the_key(overrides, world, key):
    with pytest.raises(ConfigError) as e:
        resolve(load_config(None, overrides), world)
    assert f"'{key}" in str(e.value), str(e.value)


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match="did you mean 'model.hidden_size'"):
        load_config(None, ["model.hidden_sise=64"])
    with pytest.raises(ConfigError, match="did you mean 'linear'"):
        load_config(None, ["diffusion.schedule=linera"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.steps"])


def test_cli_rejects_bad_config_before_any_spawn(tmp_path):
    """Exit code 2 and the key in the message, fast, without touching the run directory."""
    run_dir = tmp_path / "run"
    t0 = time.perf_counter()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "megadiff",
            "train",
            str(Path(__file__).parents[1] / "examples" / "tiny_cpu.yaml"),
            "model.num_attention_heads=5",
            f"run.dir={run_dir}",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "model.hidden_size" in r.stderr and "Traceback" not in r.stderr
    assert not run_dir.exists()
    assert time.perf_counter() - t0 < 60  # no megatron import / process group happened


def test_demo_yaml_matches_demo_command(tmp_path):
    """examples/demo.yaml and `megadiff demo` train the same model the same way."""
    from megadiff.demo.command import DEMO

    from_cli = load_config(None, DEMO)
    from_file = load_config(Path(__file__).parents[1] / "examples" / "demo.yaml")
    for section in ("model", "diffusion", "optim", "train", "eval"):
        assert getattr(from_cli, section) == getattr(from_file, section), section
    from megadiff.demo.command import MIXTURE, text_sampling

    assert from_file.sampling == load_config(None, text_sampling(list(MIXTURE))).sampling
    assert from_file.sampling == {"text": {"gen_length": 5}}

    keys = ("pack", "eos_fill", "eos_fill_length", "prompt_end", "loss_weight")
    default = StreamConfig()
    mix = {
        s.name: (
            s.proportion,
            s.tasks,
            {k: getattr(s, k) for k in keys if getattr(s, k) != getattr(default, k)},
        )
        for s in from_file.data.streams
    }
    assert mix == MIXTURE


def test_mds_vocab_size_comes_from_data(tmp_path):
    bad = tmp_path / "missing"
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(
            load_config(
                None,
                ["data.source=mds", f"data.vocab={bad}"]
                + [f"data.streams=[{{name: t, path: {tmp_path}}}]"],
            ),
            1,
        )
    corrupt = tmp_path / "vocab.json"
    corrupt.write_text("{not json")
    with pytest.raises(ConfigError, match="no valid vocabulary"):
        resolve(
            load_config(
                None,
                [
                    "data.source=mds",
                    f"data.vocab={corrupt}",
                    f"data.streams=[{{name: t, path: {tmp_path}}}]",
                ],
            ),
            1,
        )


@pytest.mark.parametrize(
    ("name", "world", "extra"),
    [
        ("tiny_cpu.yaml", 1, []),
        ("1b_gpu.yaml", 1, []),
        # the 3B run's data paths are placeholders: validate the rest with synthetic tokens
        ("3b_trimodal.yaml", 256, ["data.source=synthetic", "model.vocab_size=102400"]),
    ],
)
def test_example_configs_validate(name, world, extra):
    """Every shipped example is a valid config at the world size it is written for."""
    cfg = resolve(load_config(Path(__file__).parents[1] / "examples" / name, extra), world).cfg
    assert cfg.train.global_batch % (cfg.train.micro_batch * cfg.parallel.data_parallel) == 0
    if name == "3b_trimodal.yaml":
        h, f, n = cfg.model.hidden_size, cfg.model.ffn_hidden_size, cfg.model.num_layers
        kv = h // cfg.model.num_attention_heads * cfg.model.num_query_groups
        blocks = n * (2 * h * h + 2 * h * kv + 3 * h * f)
        assert 2.7e9 < blocks < 3.2e9  # "~3B" as the file says
        assert cfg.train.steps * cfg.train.global_batch * cfg.model.seq_length >= 6.4e12


def config_fields(cls=None, prefix=""):
    """(dotted key, default) of every dataclass field of the config tree: sections that may be
    null (``optim.logical``) and lists of sections (``data.streams``, items as
    ``data.streams[i].name``) are keys themselves, and their fields too."""
    import dataclasses
    import typing

    from megadiff import config as c

    cls = cls or c.Config
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        sub = [a for a in typing.get_args(tp) or (tp,) if dataclasses.is_dataclass(a)]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        key = f"{prefix}{f.name}"
        if not sub:
            yield key, default
        elif typing.get_origin(tp) is list:
            yield key, default
            yield from config_fields(sub[0], f"{key}[i].")
        else:
            if default is None:  # an optional section
                yield key, default
            yield from config_fields(sub[0], f"{key}.")


def documented_defaults(text: str) -> dict[str, str]:
    """``key -> default cell`` of the ``| `key` | default | meaning |`` rows of a markdown file
    (a row may name several keys, ``| `a`, `b` | 1, 2 |``, with one default each)."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3:
            continue
        keys = re.findall(r"`([a-z_]+(?:\.[a-z0-9_\[\]]+)*)`", cells[0])  # `sampling` too
        if not keys or re.sub(r"`[^`]*`|[,\s]", "", cells[0]):
            continue  # not a key row (the first cell holds keys only)
        defaults = [cells[1]] if len(keys) == 1 else [d.strip() for d in cells[1].split(",")]
        assert len(defaults) == len(keys), f"row {line!r}: one default per key"
        out.update(zip(keys, defaults, strict=True))
    return out


def parse_default(cell: str):
    """A documented default as a value: YAML (``null``, ``true``, ``{}``, ``""``), numbers
    written like ``1e-5`` included; a trailing ``(...)`` note is ignored."""
    text = re.sub(r"\s*\(.*\)$", "", cell).strip().strip("`")
    value = yaml.safe_load(text) if text else None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    return value


def test_every_config_key_is_documented_with_its_default():
    """docs/config.md has a row for every field of the config tree, and the default it gives
    is the field's actual default."""
    doc = documented_defaults((Path(__file__).parents[1] / "docs" / "config.md").read_text())
    fields = list(config_fields())
    assert len(fields) > 70
    missing = [k for k, _ in fields if k not in doc]
    assert not missing, f"docs/config.md has no row for: {missing}"
    wrong = {
        k: (doc[k], default)
        for k, default in fields
        if parse_default(doc[k]) != default and not is_close(parse_default(doc[k]), default)
    }
    assert not wrong, f"docs/config.md gives wrong defaults (doc, actual): {wrong}"
    stale = sorted(set(doc) - {k for k, _ in fields})
    assert not stale, f"docs/config.md documents keys that do not exist: {stale}"


def is_close(a, b) -> bool:
    numbers = (int, float)
    return isinstance(a, numbers) and isinstance(b, numbers) and math.isclose(a, b, rel_tol=1e-9)


def test_documented_defaults_parser_catches_wrong_and_missing_rows():
    rows = "| `a.b`, `a.c` | 0.9, 0.95 | x |\n| `a.d` | 1e-5 | y (`a.b`) |\n| `--flag` | 1 | z |\n"
    doc = documented_defaults(rows)
    assert doc == {"a.b": "0.9", "a.c": "0.95", "a.d": "1e-5"}
    assert parse_default(doc["a.d"]) == 1e-5 and parse_default("null (required)") is None
    assert parse_default('""') == "" and parse_default("{}") == {} and parse_default("RMSNorm")


def _numeric_leaves(cls=None, prefix=""):
    """(dotted key, dataclass field) of every int/float leaf of the config tree (not inside
    lists: ``data.streams`` is checked on its own)."""
    import dataclasses
    import typing

    from megadiff import config as c

    cls = cls or c.Config
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        args = set(typing.get_args(hints[f.name]) or (hints[f.name],)) - {type(None)}
        sub = [a for a in args if dataclasses.is_dataclass(a)]
        if typing.get_origin(hints[f.name]) is list:
            continue
        if sub:
            yield from _numeric_leaves(sub[0], f"{prefix}{f.name}.")
        elif args & {int, float} and not args & {str, bool}:
            yield f"{prefix}{f.name}", f


NUMERIC = list(_numeric_leaves())


@pytest.mark.parametrize("key", [k for k, _ in NUMERIC])
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_every_numeric_key_refuses_non_finite(key, value):
    """NaN and infinities are refused for every number, naming the key (never trained on)."""
    with pytest.raises(ConfigError) as e:
        resolve(load_config(None, [f"{key}={value}"]), 1)
    assert f"'{key}'" in str(e.value), str(e.value)


def test_numbers_inside_lists_are_checked_too():
    with pytest.raises(ConfigError, match="'data.streams.0..proportion': must be a finite"):
        resolve(load_config(None, ["data.streams=[{name: a, path: x, proportion: .inf}]"]), 1)


def test_every_numeric_key_has_a_range():
    """Each number outside the data section declares its allowed range (checked generically)."""
    unranged = [k for k, f in NUMERIC if "range" not in f.metadata]
    assert unranged == ["data.seed", "deepspeed.zero_stage"]  # data: its own rules; 0-3


OUT_OF_RANGE = [
    ("model.norm_epsilon=0", "> 0"),
    ("model.norm_epsilon=-0.5", "> 0"),
    ("model.rotary_base=0", ">= 1"),
    ("model.init_method_std=0", "> 0"),
    ("model.init_method_std=-0.02", "> 0"),
    ("model.hidden_dropout=1.5", "in [0, 1)"),
    ("model.attention_dropout=-0.1", "in [0, 1)"),
    ("model.num_query_groups=0", ">= 1"),
    ("model.vocab_size=3", ">= 16"),
    ("optim.decay_tokens=0", ">= 1"),
    ("optim.logical.gamma=-1", ">= 0"),
    ("train.seed=-1", ">= 0"),
    ("train.max_nonfinite_streak=-1", ">= 0"),
    ("deepspeed.bucket_size=0", ">= 1"),
    ("checkpoint.keep=0", ">= 1"),
    ("logging.every=0", ">= 1"),
]


@pytest.mark.parametrize("override,allowed", OUT_OF_RANGE)
def test_out_of_range_values_name_key_value_and_range(override, allowed):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as e:
        resolve(load_config(None, [override]), 1)
    msg = str(e.value)
    assert f"'{key}'" in msg and allowed in msg, msg
    assert float(msg.rsplit("got ", 1)[1]) == float(value), msg


def test_unknown_modality_schedule_is_refused():
    with pytest.raises(ConfigError, match="'video' is not a modality") as e:
        resolve(load_config(None, ["diffusion.modality_schedules={video: cosine}"]), 1)
    assert "diffusion.modality_schedules.video" in str(e.value)
    ok = resolve(load_config(None, ["diffusion.modality_schedules={image: cosine}"]), 1)
    assert ok.cfg.diffusion.modality_schedules == {"image": "cosine"}


def test_duplicate_yaml_keys_name_file_and_lines(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("train:\n  steps: 5\nmodel:\n  hidden_size: 32\ntrain:\n  steps: 7\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "line 5" in str(e.value) and "line 1" in str(e.value)
    p.write_text("train:\n  steps: 5\n  seed: 1\n  steps: 6\n")
    with pytest.raises(ConfigError, match="line 4: key 'steps' is given twice"):
        load_config(p)
    p.write_text("base: &b {steps: 3}\ntrain:\n  <<: *b\n")  # merge keys still work
    with pytest.raises(ConfigError, match="unknown config key 'base'"):
        load_config(p)


def test_unreadable_config_files_are_named(tmp_path):
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\xff\xfe\x00\x01binary")
    with pytest.raises(ConfigError, match="is not UTF-8") as e:
        load_config(binary)
    assert str(binary) in str(e.value)
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"train: \x00\n")
    with pytest.raises(ConfigError, match="not valid YAML") as e:
        load_config(nul)
    assert str(nul) in str(e.value)
    with pytest.raises(ConfigError, match="is a directory") as e:
        load_config(tmp_path)
    assert "does not exist" not in str(e.value)


def test_cli_refuses_non_finite_init_before_training(tmp_path):
    """A NaN init would train with every step skipped and exit 0; now exit 2 up front."""
    run_dir = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "megadiff", "train", "model.init_method_std=.nan",
         f"run.dir={run_dir}"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "model.init_method_std" in r.stderr and "nan" in r.stderr
    assert "Traceback" not in r.stderr and not run_dir.exists()


def _train_cli(*overrides: str, tmp_path: Path) -> subprocess.CompletedProcess:
    run_dir = tmp_path / "run"
    return subprocess.run(
        [sys.executable, "-m", "megadiff", "train", *overrides, f"run.dir={run_dir}"],
        capture_output=True,
        text=True,
        timeout=120,
    )


NO_CUDA = pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks what a machine without CUDA refuses"
)


@NO_CUDA
@pytest.mark.parametrize(
    "override,key",
    [
        ("train.precision=bf16", "train.precision"),
        ("model.transformer_impl=transformer_engine", "model.transformer_impl"),
        ("train.precision=fp8 model.transformer_impl=transformer_engine", "model.transformer_impl"),
        ("parallel.backend=nccl", "parallel.backend"),
    ],
)
def test_gpu_only_settings_are_refused_without_cuda(override, key, tmp_path):
    r = _train_cli(*override.split(), tmp_path=tmp_path)
    assert r.returncode == 2, r.stderr
    assert f"'{key}'" in r.stderr and "CPU" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "shape",
    [
        ["model.hidden_size=1048576"],
        ["model.seq_length=1000000", "train.micro_batch=64", "train.global_batch=64"],
    ],
)
def test_shape_that_cannot_fit_is_refused_with_an_estimate(shape, tmp_path):
    """No terabyte allocation or minutes of swapping: exit 2 at once, estimate vs available."""
    t0 = time.perf_counter()
    r = _train_cli(*shape, tmp_path=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "needs at least" in r.stderr and "GiB" in r.stderr and "this machine has" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()
    assert time.perf_counter() - t0 < 60


@pytest.mark.parametrize(
    ("name", "world", "extra", "gpu_gib"),
    [
        ("1b_gpu.yaml", 1, [], 80),
        ("3b_trimodal.yaml", 256, ["data.source=synthetic", "model.vocab_size=102400"], 80),
    ],
)
def test_example_gpu_configs_fit_their_gpus(name, world, extra, gpu_gib):
    """The memory estimate does not refuse the shipped GPU examples on an 80 GiB GPU."""
    from megadiff.machine import GIB, estimate_memory

    cfg = resolve(load_config(Path(__file__).parents[1] / "examples" / name, extra), world).cfg
    need = estimate_memory(cfg, on_gpu=True)
    assert 1 * GIB < need.total < gpu_gib * GIB, need.describe()


@pytest.mark.parametrize(
    ("name", "task"), [("policy_lookup.yaml", "lookup"), ("policy_pick.yaml", "pick")]
)
def test_policy_examples_load(name, task):
    """The shipped policy examples are valid configs for `megadiff policy train` and name a
    built-in task; full diffusion (no block length)."""
    from megadiff.policy.tasks import BUILTIN

    cfg = load_config(Path(__file__).parents[1] / "examples" / name)
    assert cfg.policy.task == task and task in BUILTIN and cfg.policy.block_length is None
    assert cfg.policy.gen_length >= 3 * 8 and cfg.policy.alpha > 0
