"""``megadiff policy ...``: train and evaluate learned unmasking policies.

``megadiff policy train CONFIG.yaml [key=value ...]``: GRPO over a frozen dLLM (the config's
``policy`` section).

``megadiff policy eval --ckpt RUN --task T [--policy PATH] --n N [--json] [--gen-length L]
[--block-length B]``: accuracy and mean NFE on the task's held-out prompts of the heuristics
(confidence at fixed steps, threshold at several tau, entropy at several gamma, margin) and, with
``--policy``, of the policy at the same settings, each with a 95% Wilson interval. Bad input
(checkpoint, task, policy, flags) is a named error and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from megadiff.flags import AT_LEAST_1, NON_NEGATIVE, POSITIVE, number


def add_policy_commands(subparsers) -> None:
    """Register the ``megadiff policy`` sub-commands."""
    train = subparsers.add_parser(
        "train",
        help="GRPO-train an unmasking policy: megadiff policy train CONFIG.yaml [key=value ...]",
        description="GRPO-train an unmasking policy over a frozen dLLM (the config's policy "
        "section; see docs/config.md).",
    )
    train.add_argument("config", nargs="?", help="YAML config (see examples/policy_lookup.yaml)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. policy.steps=10")
    train.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    train.set_defaults(_policy_run=run_train)
    ev = subparsers.add_parser(
        "eval",
        help="accuracy and mean NFE of a policy and the heuristics on a task's held-out prompts",
        description=__doc__.split("\n\n")[2],
    )
    add_eval_arguments(ev)
    ev.set_defaults(_policy_run=run_eval)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="policy_command", metavar="SUBCOMMAND")
    add_policy_commands(sub)


def run(args: argparse.Namespace) -> int:
    if not getattr(args, "_policy_run", None):
        print("megadiff policy: error: give a sub-command (train, eval)", file=sys.stderr)
        return 2
    return int(args._policy_run(args) or 0)


def run_train(args: argparse.Namespace) -> int:
    from megadiff.config import ConfigError, dump_config, load_config
    from megadiff.parallel.env import read_launch_env
    from megadiff.training.cli import split_config_arg

    path, overrides = split_config_arg(args)
    launch = read_launch_env()
    try:
        cfg = load_config(path, overrides)
    except (ConfigError, ValueError) as e:
        print(f"megadiff policy train: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        if launch.rank == 0:
            print(dump_config(cfg), end="")
        return 0
    from megadiff.policy.train import run as train

    return train(cfg, launch)


# ----------------------------------------------------------------------------- eval


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    from megadiff.policy.evaluate import GAMMAS, TAUS

    p.add_argument("--ckpt", required=True, help="the dLLM: a run dir, checkpoints/ or step_N")
    p.add_argument(
        "--task",
        required=True,
        help="arith | lookup | sums | pick | FILE.jsonl ({prompt, answer} rows) | module:function "
        "(a verifier; prompts from --prompts)",
    )
    p.add_argument("--policy", help="a trained policy (folder or policy run dir); optional")
    p.add_argument(
        "--prompts", help="prompt source of a module:function verifier (JSONL or built-in name)"
    )
    p.add_argument("--n", type=number(int, AT_LEAST_1), default=200, help="held-out prompts scored")
    p.add_argument(
        "--gen-length", type=number(int, AT_LEAST_1), default=16, help="generation buffer"
    )
    p.add_argument(
        "--block-length",
        type=number(int, NON_NEGATIVE),
        default=0,
        help="semi-autoregressive block length (0 = full diffusion, one block)",
    )
    p.add_argument("--taus", type=_floats, default=list(TAUS), help="threshold strategy tau values")
    p.add_argument(
        "--gammas", type=_floats, default=list(GAMMAS), help="entropy strategy gamma values"
    )
    p.add_argument(
        "--seed", type=number(int, NON_NEGATIVE), default=0, help="which held-out prompts"
    )
    p.add_argument(
        "--batch-size", type=number(int, AT_LEAST_1), default=64, help="samples per forward"
    )
    p.add_argument(
        "--policy-temperature",
        dest="policy_tau",
        type=number(float, POSITIVE),
        default=1.0,
        help="--policy: temperature of its Bernoulli actions (an empty action commits the "
        "position of the largest policy logit)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def check_eval_args(args: argparse.Namespace) -> None:
    """Flag values the parser cannot check alone (:class:`ValueError` naming the flag)."""
    if args.block_length and args.block_length > args.gen_length:
        raise ValueError(
            f"--block-length {args.block_length} is longer than --gen-length {args.gen_length} "
            "(0 = one block)"
        )
    if not args.taus or not all(0.0 < t <= 1.0 for t in args.taus):
        raise ValueError(f"--taus must be values in (0, 1], got {args.taus}")
    if not args.gammas or not all(g >= 0.0 for g in args.gammas):
        raise ValueError(f"--gammas must be values >= 0, got {args.gammas}")


def _fail(msg: str) -> int:
    print(f"megadiff policy eval: error: {msg}", file=sys.stderr)
    return 2


def run_eval(args: argparse.Namespace) -> int:
    from megadiff.diffusion.sampling import SamplingError
    from megadiff.generation.load import CheckpointError, load_for_generation
    from megadiff.generation.tasks import TaskError
    from megadiff.policy.evaluate import compare, table, to_json
    from megadiff.policy.tasks import PolicyTaskError, check_expressible, load_task

    block = args.block_length or None
    try:
        check_eval_args(args)
        # tasks load before the checkpoint, but lookup's keys come from its tokenizer
        needs_tokenizer = "lookup" in (args.task, args.prompts)
        task = None if needs_tokenizer else load_task(args.task, None, args.prompts)
        bundle = load_for_generation(args.ckpt)
        bundle.require("text")
        tok = bundle.tokenizers["text"]
        task = task or load_task(args.task, tok, args.prompts)
        check_expressible(task, tok, n=min(args.n, 64), text_size=bundle.vocab.text_size)
        prompts = task.prompts("eval", args.n, args.seed)
        check_fits(bundle, tok, prompts, args.gen_length)
        policies = []
        if args.policy:
            setting = load_policy_setting(args.policy, args.gen_length, block, args.policy_tau)
            policies.append(setting)
    except (PolicyTaskError, CheckpointError, TaskError, SamplingError, ValueError) as e:
        return _fail(str(e))

    def log(p) -> None:
        if not args.json:
            print(p.row(), flush=True)

    if not args.json:
        mode = f"blocks of {block}" if block else "full diffusion"
        print(
            f"{task.name}: {len(prompts)} held-out prompts ({len(set(prompts))} distinct), "
            f"gen length {args.gen_length}, {mode}, greedy tokens"
        )
        print("| setting | accuracy | 95% interval | mean NFE | n | s |")
        print("| --- | --- | --- | --- | --- | --- |")
    points = compare(
        bundle, task, prompts, args.gen_length, block, args.taus, args.gammas, policies,
        args.batch_size, log,
    )  # fmt: skip
    meta = dict(
        ckpt=str(bundle.path),
        step=bundle.step,
        task=task.name,
        n=len(prompts),
        distinct=len(set(prompts)),
        gen_length=args.gen_length,
        block_length=block,
        policy=args.policy,
    )
    print(to_json(points, meta) if args.json else "\n" + table(points))
    return 0


def check_fits(bundle, tok, prompts: list[str], gen_length: int) -> None:
    """The longest prompt plus the generation buffer must fit the model's context."""
    context = bundle.cfg.model.seq_length if bundle.cfg is not None else None
    longest = max(len(tok.encode(p)) for p in prompts)
    if context is not None and longest + gen_length > context:
        raise ValueError(
            f"--gen-length {gen_length}: the longest prompt ({longest} tokens) plus the buffer "
            f"is {longest + gen_length} tokens, more than the checkpoint's context {context}"
        )


def load_policy_setting(path: str, gen_length: int, block: int | None, tau: float = 1.0):
    """``(label, policy, sampler settings)`` of a trained policy (greedy tokens, the policy's
    argmax fallback, at most one step per generated token)."""
    from megadiff.diffusion.sampling import SamplerConfig
    from megadiff.policy.network import load_policy
    from megadiff.policy.sampler import PolicySampler

    policy = PolicySampler(load_policy(path), tau=tau)
    cfg = SamplerConfig("policy", steps=gen_length, block_length=block, temperature=0.0)
    return (f"policy {path}", policy, cfg)
