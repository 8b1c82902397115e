"""``megadiff demo [key=value ...]``: build the tri-modal demo data, train the tiny model on it.

The demo data (caption-determined shape images, the captions spoken, single-digit sums, English
text with arithmetic and lookup lines; see :mod:`megadiff.demo.data`) is generated offline into
``--data-dir`` once and reused. The default run trains on t2i, t2s and sums rows (``MIXTURE``),
then scores itself (:mod:`megadiff.demo.evaluate`; ``--no-score`` skips it), writes a contact
sheet, WAVs and the sums' answers to ``<run.dir>/samples/`` and prints the ``megadiff generate``
commands to try.
Takes the same dotted overrides as ``megadiff train`` and runs the same way (one process,
torchrun or srun), and exits with its codes (0 done, 2 bad config, 3 non-finite stop, 75 stopped
for a requeue: the same command continues from the last checkpoint). Writes
``<run.dir>/metrics.jsonl`` with one loss per modality, and held-out losses (``val_loss*``) of
each stream's ``val/`` split every 200 steps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megadiff.config import ConfigError, check_sections, load_config
from megadiff.demo.synth import SUMS_EOS_FILL
from megadiff.parallel.env import read_launch_env
from megadiff.plan import resolve

# the tiny CPU model on the demo mixture (examples/demo.yaml is the same run as a file)
DEMO = [
    "model.num_layers=4",
    "model.hidden_size=128",
    "model.num_attention_heads=4",
    "model.ffn_hidden_size=384",
    "model.seq_length=64",
    "model.init_method_std=0.05",
    "model.embedding_init_std=1.0",
    "data.source=mds",
    "optim.lr=3e-3",
    "optim.warmup_tokens=30000",
    "optim.weight_decay=0.0",
    "diffusion.modality_mask_prob=0.1",
    "diffusion.clean_prompt_prob=0.9",
    "diffusion.loss_weighting=uniform",  # see examples/demo.yaml
    "train.steps=1400",
    "train.micro_batch=32",
    "train.global_batch=32",
    "logging.every=50",
    "eval.every=200",
    "run.dir=runs/demo",
]
# the stream keys of one-problem-per-row task streams (prompt `a+b=`, answer, <eot> to the end)
ONE_PROBLEM = {"pack": False, "eos_fill": True, "prompt_end": "="}
# stream -> (share of rows, tasks, stream keys): the conditional tasks the demo scores, and its
# text task: one sum per row as it is prompted (`3+5=08`, three <eot>, then PAD), its loss
# weighted 4x (2 answer tokens per row against an image row's 16 codes); all 100 sums are
# taught, its held-out rows (val_path) are other draws of them
MIXTURE = {
    "image": (0.35, ["t2i"], {}),
    "audio": (0.35, ["t2s"], {}),
    "sums": (0.3, [], {**ONE_PROBLEM, "eos_fill_length": SUMS_EOS_FILL, "loss_weight": 4.0}),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50")
    p.add_argument(
        "--data-dir", default="runs/demo_data", help="where the demo data is built and reused"
    )
    p.add_argument(
        "--tasks",
        type=float,
        default=0.0,
        help="mixture share of an extra stream of verifiable-task text (arithmetic + lookup "
        "lines; 0 = off; e.g. 0.5)",
    )
    p.add_argument(
        "--lookup",
        type=float,
        default=0.0,
        help="mixture share of an extra stream of single lookup problems, one per row "
        "(unpacked; 0 = off; 1 = only these, e.g. with model.seq_length=32)",
    )
    p.add_argument(
        "--arith",
        type=float,
        default=0.0,
        help="mixture share of an extra stream of single arithmetic problems (23+18=41), one "
        "per row, the row filled with <eot> after the answer (eos_fill; 0 = off; 1 = only these)",
    )
    p.add_argument(
        "--pick",
        type=float,
        default=0.0,
        help="mixture share of an extra stream of pick rows (381|527=527;8301: either code, "
        "then a free tag), one per row, EOS-filled like --arith (0 = off; 1 = only these; the "
        "unmasking-policy task, docs/policy_tasks.md)",
    )
    p.add_argument(
        "--sums-rows",
        type=float,
        default=0.0,
        help="mixture share of an extra stream of single-digit sums (7+8=15), one per row, "
        "EOS-filled like --arith (0 = off; 1 = only these)",
    )
    p.add_argument(
        "--no-score",
        action="store_true",
        help="skip the closing self-score and sample files (<run.dir>/samples)",
    )


def demo_streams(
    data_dir: str,
    tasks: float = 0.0,
    lookup: float = 0.0,
    arith: float = 0.0,
    sums_rows: float = 0.0,
    pick: float = 0.0,
) -> list[str]:
    """Build (or reuse) the demo data; the stream overrides that point the config at it.

    ``tasks`` > 0 adds a stream of verifiable-task text (arithmetic + lookup) with that mixture
    share, ``lookup`` > 0 one of single lookup problems read one per row (``pack: false``),
    ``arith`` > 0 one of single arithmetic problems, one per row filled with ``<eot>`` after the
    answer (``pack: false, eos_fill: true``), ``sums_rows`` > 0 one of single-digit sums and
    ``pick`` > 0 one of pick rows (:func:`~megadiff.demo.synth.pick_lines`), read the same
    way; the text / image / audio streams share the rest.
    """
    from megadiff.demo.data import (
        build_arith_stream,
        build_demo_data,
        build_lookup_stream,
        build_pick_stream,
        build_sums_rows_stream,
        build_tasks_stream,
    )

    shares = {
        "--tasks": tasks,
        "--lookup": lookup,
        "--arith": arith,
        "--sums-rows": sums_rows,
        "--pick": pick,
    }
    for flag, share in shares.items():
        if not 0.0 <= share <= 1.0:
            raise ConfigError(f"{flag} must be in [0, 1], got {share}")
    if sum(shares.values()) > 1.0:
        got = " + ".join(f"{v:g}" for v in shares.values())
        raise ConfigError(f"{' + '.join(shares)} must be <= 1, got {got}")

    extras = [  # (stream name = directory, share, builder, extra stream keys)
        ("tasks", tasks, build_tasks_stream, {}),
        ("lookup", lookup, build_lookup_stream, {"pack": False}),
        ("arith", arith, build_arith_stream, ONE_PROBLEM),
        ("sums_rows", sums_rows, build_sums_rows_stream, ONE_PROBLEM),
        ("pick", pick, build_pick_stream, ONE_PROBLEM),
    ]
    extras = [e for e in extras if e[1] > 0]
    launch = read_launch_env()
    if launch.rank == 0:
        data = build_demo_data(data_dir, log=lambda m: print(m, flush=True))
    else:
        _barrier(launch, data_dir, [e[0] for e in extras])
        data = build_demo_data(data_dir, log=lambda m: None)  # reuses rank 0's files
    rest = 1.0 - sum(shares.values())
    streams = [  # a stream without a share is left out (its rows need not fit seq_length)
        {**data.stream_entry(n), "proportion": share * rest, "tasks": kinds, **keys}
        for n, (share, kinds, keys) in MIXTURE.items()
        if share * rest > 0
    ]
    for name, share, build, keys in extras:  # rank 0 builds them, the others reuse its files
        streams.append({"name": name, "path": build(data), "proportion": share, **keys})
    names = [st["name"] for st in streams]
    return [
        f"data.streams={json.dumps(streams)}",
        f"data.vocab={data.vocab_path}",
        *text_sampling(names),
    ]


def text_sampling(streams: list[str]) -> list[str]:
    """The ``sampling`` override that makes ``megadiff generate --task text`` on the demo's
    checkpoints use the sum rows' buffer as trained, when sums are the run's only text rows."""
    from megadiff.demo.evaluate import TEXT_GEN_LENGTH

    if "sums" not in streams or set(streams) - set(MIXTURE):
        return []
    return [f"sampling.text.gen_length={TEXT_GEN_LENGTH}"]


def _barrier(launch, data_dir: str, extra: list[str]) -> None:
    """Rank 0 builds the data before any process group exists: the others wait for its files
    (``extra``: the optional streams, by directory name)."""
    import time

    files = [Path(data_dir) / "demo.json"] + [Path(data_dir) / e / "manifest.json" for e in extra]
    deadline = time.monotonic() + 600
    while not all(f.is_file() for f in files):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {launch.rank}: no demo data at '{data_dir}' after 10 min")
        time.sleep(0.5)


def _summary(run_dir: Path) -> str:
    """The masked-token losses (the training objective, per modality) at the start and end,
    and the held-out loss at the first and last evaluation."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    rows = [r for r in records if "loss" in r]  # training steps (eval records have val_loss)
    evals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    k = max(1, len(rows) // 10)
    first, last = rows[:k], rows[-k:]

    def mean(rs, key):
        vals = [r[key] for r in rs if key in r]
        return sum(vals) / len(vals) if vals else float("nan")

    keys = ["loss"] + sorted(key for key in rows[-1] if key.startswith("loss_"))
    parts = [
        f"{key.removeprefix('loss_')} {mean(first, key):.2f} -> {mean(last, key):.2f}"
        for key in keys
    ]
    held_out = f"; held-out loss {evals[0]:.2f} -> {evals[-1]:.2f}" if len(evals) > 1 else ""
    return (
        f"demo finished: {len(rows)} logged steps; masked-token loss, mean of the first 10% of "
        f"logged steps -> of the last 10%: " + ", ".join(parts) + held_out
    )


def self_score(run_dir: Path) -> None:
    """Sample and score the demo's three tasks on its checkpoint; write ``<run.dir>/samples``."""
    from megadiff.demo.evaluate import score_checkpoint, write_samples

    print("scoring the demo model (default sampler settings) ...", flush=True)
    scores = score_checkpoint(run_dir)
    files = write_samples(scores, run_dir / "samples")
    wavs = sum(f.suffix == ".wav" for f in files)
    print(f"demo scores ({scores.seconds:.0f}s): {scores.line()}")
    print(f"samples: {files[0]} (contact sheet), {wavs} WAVs and text.txt in {files[0].parent}")


def run(args: argparse.Namespace) -> int:
    launch = read_launch_env()
    try:
        # bad overrides fail before the data is built (its streams are not known yet)
        check_sections(load_config(None, [*DEMO, *args.overrides, "data.source=synthetic"]))
        streams = demo_streams(
            args.data_dir, args.tasks, args.lookup, args.arith, args.sums_rows, args.pick
        )
        plan = resolve(load_config(None, [*DEMO, *streams, *args.overrides]), launch.world_size)
        cfg = plan.cfg
    except ConfigError as e:
        print(f"megadiff demo: error: {e}", file=sys.stderr)
        return 2
    from megadiff.training.cli import checked_train, train_refusals
    from megadiff.training.faults import EXIT_OK, EXIT_REQUEUE

    try:
        code = checked_train(plan, launch)
    except train_refusals() as e:
        print(f"megadiff demo: error: {e}", file=sys.stderr)
        return 2
    if launch.rank == 0:
        run_dir = Path(cfg.run.dir)
        if code == EXIT_OK:
            print(_summary(run_dir))
            print(f"metrics: {run_dir / 'metrics.jsonl'}")
            if cfg.checkpoint.save_on_exit:
                if not args.no_score:
                    self_score(run_dir)
                print(f"checkpoint: {run_dir / 'checkpoints'}\ntry it:")
                names = [st.name for st in cfg.data.streams]
                seq = cfg.model.seq_length
                for command in next_commands(run_dir, names, seq, cfg.sampling):
                    print(f"  {command}")
        elif code == EXIT_REQUEUE:
            from megadiff.checkpoint_files import checkpoint_root

            again = (
                "run the same command again to continue it"
                if cfg.checkpoint.resume
                else "checkpoint.resume=false: the same command would start it over"
            )
            print(
                f"demo stopped before step {cfg.train.steps} (checkpoint saved in "
                f"{checkpoint_root(cfg)}); {again}"
            )
    return code


# one-problem streams -> a prompt to try (their rows fill the rest of the row with <eot>)
ONE_PROBLEM_PROMPTS = {"arith": "23+18=", "sums_rows": "3+5=", "pick": "381|527="}


def next_commands(
    run_dir: Path, streams: list[str], seq_length: int, sampling: dict | None = None
) -> list[str]:
    """The ``megadiff generate`` commands to try on the demo's checkpoint: one per task its
    ``streams`` taught (default sampler settings; a one-problem stream's buffer is the rest of
    its training row; the sums' buffer given unless the run's ``sampling`` section has it)."""
    from megadiff.demo.evaluate import TEXT_GEN_LENGTH

    out, ckpt = run_dir / "samples", f"megadiff generate --ckpt {run_dir}"
    commands = []
    if "image" in streams:
        commands.append(f"{ckpt} --task t2i --prompt 'a red circle on the left' --out {out}/t2i")
    if "audio" in streams:
        commands.append(f"{ckpt} --task t2s --prompt 'a blue square in the center' --out {out}/t2s")
    if "sums" in streams:
        carried = (sampling or {}).get("text", {}).get("gen_length") == TEXT_GEN_LENGTH
        gen = "" if carried else f" --gen-length {TEXT_GEN_LENGTH}"
        commands.append(f"{ckpt} --task text --prompt '3+5='{gen} --out {out}/text")
    for name, prompt in ONE_PROBLEM_PROMPTS.items():
        if name in streams:
            gen = seq_length - len(prompt)  # one token per character in these prompts
            commands.append(
                f"{ckpt} --task text --prompt '{prompt}' --gen-length {gen} --out {out}/{name}"
            )
    return commands
