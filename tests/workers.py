"""Module-level functions run inside gloo worlds by the distributed tests."""

from __future__ import annotations

import os

# a tiny model that every tested layout can split: 4 layers (PP2 x VPP2), 4 heads (TP2)
TINY = [
    "model.num_layers=4",
    "model.hidden_size=32",
    "model.num_attention_heads=4",
    "model.ffn_hidden_size=64",
    "model.vocab_size=120",
    "model.seq_length=16",
    "train.micro_batch=2",
    "train.global_batch=4",
    "optim.lr=1e-3",
    "optim.warmup_tokens=16",
    "diffusion.random_length_prob=0.25",
    "diffusion.modality_mask_prob=0.25",
    "diffusion.restrict_loss_to_modality=true",
    "logging.progress=false",
    "logging.tensorboard=false",  # on by default; tests/test_logging.py reads its events
]


def train_capture(overrides: list[str], steps: int, run_dir: str) -> dict:
    """Train ``steps`` steps; return per-step losses, first-step full grads and final params."""
    from megadiff.config import load_config
    from megadiff.model.gather import full_tensors
    from megadiff.parallel.state import destroy_distributed
    from megadiff.plan import resolve
    from megadiff.training.trainer import Trainer

    world = int(os.environ["WORLD_SIZE"])
    plan = resolve(load_config(None, [*TINY, f"run.dir={run_dir}", *overrides]), world)
    trainer = Trainer(plan)
    captured: dict = {}

    def grab(t: Trainer) -> None:
        captured["grads"] = full_tensors(t.model, "grad")

    losses = []
    for s in range(steps):
        rec = trainer.train_step(on_grads=grab if s == 0 else None)
        losses.append(rec.get("loss"))
    params = full_tensors(trainer.model, "param")
    rank = trainer.ranks.rank
    destroy_distributed()
    out = {"losses": losses if losses[0] is not None else None}
    if rank == 0:
        out.update(grads=captured["grads"], params=params)
    return out


def record_noise(overrides: list[str], run_dir: str) -> dict:
    """Run one step and return this rank's DP rank and the masked inputs it computed."""
    from megadiff.config import load_config
    from megadiff.parallel.state import destroy_distributed
    from megadiff.plan import resolve
    from megadiff.training.trainer import Trainer

    world = int(os.environ["WORLD_SIZE"])
    plan = resolve(load_config(None, [*TINY, f"run.dir={run_dir}", *overrides]), world)
    trainer = Trainer(plan)
    seen = []
    corrupt = trainer.objective.corrupt

    def spy(tokens, modality, gen, prompt=None):
        out = corrupt(tokens, modality, gen, prompt)
        seen.append(out.inputs.clone())
        return out

    trainer.objective.corrupt = spy
    trainer.train_step()
    ranks = trainer.ranks
    destroy_distributed()
    return {"dp": ranks.dp_rank, "tp": ranks.tp_rank, "pp": ranks.pp_rank, "inputs": seen}


def logits_vs_reference(overrides: list[str], run_dir: str) -> dict:
    """Megatron-core logits (gathered over TP) and the plain-PyTorch twin's, same weights."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megadiff.config import load_config
    from megadiff.model.gather import full_tensors, unwrap
    from megadiff.model.reference import ReferenceConfig, ReferenceModel
    from megadiff.parallel.state import destroy_distributed
    from megadiff.plan import resolve
    from megadiff.training.trainer import Trainer

    world = int(os.environ["WORLD_SIZE"])
    plan = resolve(load_config(None, [*TINY, f"run.dir={run_dir}", *overrides]), world)
    trainer = Trainer(plan)
    cfg = plan.cfg
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, cfg.model.vocab_size, (3, cfg.model.seq_length), generator=gen)
    pad = torch.zeros_like(tokens, dtype=torch.bool)
    pad[1, -5:] = True
    model = unwrap(trainer.model[0]).eval()
    with torch.no_grad():
        shard = model(tokens, pad[:, None, None, :])  # [s, b, V/tp]
        changed = tokens.clone()
        changed[:, -1] = (changed[:, -1] + 1) % cfg.model.vocab_size
        moved = model(changed)[0] - model(tokens)[0]  # position 0, all of this rank's columns
        first_pos_moved = moved[torch.isfinite(moved)].abs().max().item()
    parts = [torch.empty_like(shard) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, shard.contiguous(), group=ps.get_tensor_model_parallel_group())
    ours = torch.cat(parts, -1).transpose(0, 1)
    ref = ReferenceModel(ReferenceConfig.from_model_config(cfg.model))
    ref.load_state_dict(full_tensors(trainer.model))
    with torch.no_grad():
        theirs = ref(tokens, pad)
    destroy_distributed()
    return {"ours": ours, "ref": theirs, "pad": pad, "first_pos_moved": first_pos_moved}


def _trainer(overrides: list[str], run_dir: str):
    from megadiff.config import load_config
    from megadiff.plan import resolve
    from megadiff.training.trainer import Trainer

    world = int(os.environ["WORLD_SIZE"])
    return Trainer(resolve(load_config(None, [*TINY, f"run.dir={run_dir}", *overrides]), world))


def final_params(overrides: list[str], run_dir: str) -> dict:
    """Build a trainer on ``run_dir`` (auto-resume) and return its step and full parameters."""
    from megadiff.model.gather import full_tensors
    from megadiff.parallel.state import destroy_distributed

    trainer = _trainer(overrides, run_dir)
    params = full_tensors(trainer.model, "param")
    out = {"step": trainer.step, "params": params if trainer.ranks.rank == 0 else None}
    destroy_distributed()
    return out


def session(overrides: list[str], run_dir: str, pre: int, save: bool, post: int) -> dict:
    """Build a trainer (fresh, resumed or ``checkpoint.load``), train ``pre`` steps, optionally
    save, evaluate, train ``post`` steps."""
    from megadiff.parallel.state import destroy_distributed

    trainer = _trainer(overrides, run_dir)
    start = trainer.step
    for _ in range(pre):
        trainer.train_step()
    if save:
        trainer.save_checkpoint()
    ev = trainer.evaluate()
    losses = [trainer.train_step().get("loss") for _ in range(post)]
    destroy_distributed()
    return {"start": start, "eval": ev, "losses": losses if losses[0] is not None else None}


def faults_run(overrides: list[str], run_dir: str, nan_steps: list[int]) -> dict:
    """``fit()`` with the loss made NaN at ``nan_steps`` (1-based); report what happened."""
    import json

    from megadiff.model.gather import full_tensors
    from megadiff.parallel.state import destroy_distributed

    trainer = _trainer(overrides, run_dir)
    loss_fn = trainer.objective.loss
    snapshots: dict[int, dict] = {}

    def loss(output, noised):
        value, stats = loss_fn(output, noised)
        if trainer.step + 1 in nan_steps:
            value, stats = value * float("nan"), stats * float("nan")
        return value, stats

    trainer.objective.loss = loss
    original_step = trainer.train_step

    def train_step(on_grads=None):
        snapshots[trainer.step] = full_tensors(trainer.model, "param")
        return original_step(on_grads)

    trainer.train_step = train_step
    history = trainer.fit()
    snapshots[trainer.step] = full_tensors(trainer.model, "param")
    metrics = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    out = {
        "exit_code": trainer.exit_code,
        "step": trainer.step,
        "history": history,
        "metrics": metrics,
        "snapshots": snapshots,
        "nonfinite_steps": trainer.nonfinite_steps,
    }
    destroy_distributed()
    return out


def fit_run(overrides: list[str], run_dir: str) -> dict:
    """``fit()``; return the per-step losses (last stage) and the exit code."""
    from megadiff.parallel.state import destroy_distributed

    trainer = _trainer(overrides, run_dir)
    history = trainer.fit()
    destroy_distributed()
    losses = [r.get("loss") for r in history]
    if not losses or losses[0] is None:
        losses = None
    return {"losses": losses, "exit": trainer.exit_code}


def optimizer_recipe(overrides: list[str], run_dir: str) -> dict:
    """Build a Trainer, run one step; return the optimizer's hyper-parameters and the log."""
    import io

    from megadiff.config import load_config
    from megadiff.parallel.state import destroy_distributed
    from megadiff.plan import resolve
    from megadiff.training.trainer import Trainer

    world = int(os.environ["WORLD_SIZE"])
    plan = resolve(load_config(None, [*TINY, f"run.dir={run_dir}", *overrides]), world)
    trainer = Trainer(plan)
    trainer.metrics.stream = io.StringIO()
    trainer.metrics.live = False
    trainer.cfg.train.steps = 1
    trainer.fit()
    groups = trainer.optimizer.param_groups
    out = {
        "max_lr": trainer.scheduler.max_lr,
        "min_lr": trainer.scheduler.min_lr,
        "betas": {tuple(g["betas"]) for g in groups},
        "eps": {g["eps"] for g in groups},
        "wd": {g["weight_decay"] for g in groups},
        "log": trainer.metrics.stream.getvalue(),
    }
    destroy_distributed()
    return out


def deepspeed_capture(overrides: list[str], steps: int, run_dir: str) -> dict:
    """Train ``steps`` steps with the DeepSpeed engine; per-step records and final params."""
    from megadiff.config import load_config
    from megadiff.model.gather import unwrap
    from megadiff.parallel.state import destroy_distributed
    from megadiff.plan import resolve
    from megadiff.training.trainer import Trainer

    world = int(os.environ["WORLD_SIZE"])
    plan = resolve(
        load_config(None, [*TINY, f"run.dir={run_dir}", "train.engine=deepspeed", *overrides]),
        world,
    )
    trainer = Trainer(plan)
    records = [trainer.train_step() for _ in range(steps)]
    stage = plan.cfg.deepspeed.zero_stage
    params = None
    if stage < 3:
        params = {
            n: p.detach().float().clone()
            for n, p in unwrap(trainer.engine.engine).named_parameters()
        }
    trainer.close()
    destroy_distributed()
    return {"records": records, "params": params}


def optimizer_groups(overrides: list[str], run_dir: str) -> dict:
    """Per-parameter optimizer values (max_lr, min_lr, eps, weight decay) and residual scales."""
    from megadiff.config import load_config
    from megadiff.model.gather import unwrap
    from megadiff.parallel.state import destroy_distributed
    from megadiff.plan import resolve
    from megadiff.training.trainer import Trainer

    world = int(os.environ["WORLD_SIZE"])
    plan = resolve(
        load_config(
            None,
            [*TINY, f"run.dir={run_dir}", "parallel.distributed_optimizer=false", *overrides],
        ),
        world,
    )
    trainer = Trainer(plan)
    model = unwrap(trainer.model[0])
    names = {id(p): n for n, p in model.named_parameters()}
    per_param = {}
    for g in trainer.optimizer.param_groups:
        for p in g["params"]:
            per_param[names[id(p)]] = (g["max_lr"], g["min_lr"], g["eps"], g["weight_decay"])
    scales = [
        (getattr(layer.self_attn_bda, "scale", None), getattr(layer.mlp_bda, "scale", None))
        for layer in model.decoder.layers
    ]
    destroy_distributed()
    return {"groups": per_param, "scales": scales}


def read_model(path: str) -> dict:
    """``read_checkpoint_model`` in a fresh process (it builds its own one-process group)."""
    from megadiff.model.reader import read_checkpoint_model

    m = read_checkpoint_model(path)
    return {"params": m.params, "step": m.meta["step"], "tp": m.cfg.parallel.tensor_parallel}


def megatron_logits_at(overrides: list[str], run_dir: str, tokens, pad) -> dict:
    """Logits of the megatron-core model built by a Trainer (``checkpoint.load`` in
    ``overrides``) at its layout (PP = 1), gathered over TP: ``[b, s, V]`` on every rank."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megadiff.model.gather import unwrap
    from megadiff.parallel.state import destroy_distributed

    trainer = _trainer(overrides, run_dir)
    model = unwrap(trainer.model[0]).eval()
    with torch.no_grad():
        shard = model(tokens, pad[:, None, None, :])  # [s, b, V/tp]
    parts = [torch.empty_like(shard) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, shard.contiguous(), group=ps.get_tensor_model_parallel_group())
    destroy_distributed()
    return {"logits": torch.cat(parts, -1).transpose(0, 1).contiguous()}


def convert(direction: str, src: str, out: str, kwargs: dict, perturb: float = 0.0) -> dict:
    """``to_hf``/``from_hf`` in a fresh process; ``perturb`` adds that much to the HF logits
    (to exercise the failing --verify path). Returns the parity or the error."""
    from megadiff.export import from_hf, parity, to_hf

    if perturb:
        real = parity.hf_logits

        def off(*a, **k):
            return real(*a, **k) + perturb

        to_hf.hf_logits = from_hf.hf_logits = off
    fn = to_hf.to_hf if direction == "to-hf" else from_hf.from_hf
    try:
        r = fn(src, out, **kwargs)
    except Exception as e:  # noqa: BLE001 - reported to the test
        return {"error": type(e).__name__, "message": str(e)}
    p = r.parity
    return {"error": None, "diff": None if p is None else p.max_abs_diff}


def fit_with_eval(overrides: list[str], run_dir: str) -> dict:
    """``fit()`` with held-out evaluation (``eval.*`` in ``overrides``); returns metrics.jsonl."""
    import json

    from megadiff.parallel.state import destroy_distributed

    trainer = _trainer(overrides, run_dir)
    trainer.fit()
    trainer.close()
    destroy_distributed()
    lines = open(os.path.join(run_dir, "metrics.jsonl")).read().splitlines()
    return {"metrics": [json.loads(x) for x in lines]}


def eval_rows(overrides: list[str], run_dir: str, train_steps: int) -> dict:
    """Train ``train_steps`` steps and save them (0: just build, e.g. with checkpoint.load), then
    one held-out eval; returns its record (logging rank) and every row this rank scored (index
    -> masked inputs and weights)."""
    from megadiff.parallel.state import destroy_distributed

    trainer = _trainer(["eval.every=1", *overrides], run_dir)
    for _ in range(train_steps):
        trainer.train_step()
    if train_steps:
        trainer.save_checkpoint()
    rows: dict = {}
    forward = trainer.evaluator.forward

    def spy(model, batch):
        n = batch["noised"]
        for j, (i, live) in enumerate(zip(batch["rows"].tolist(), batch["live"].tolist())):
            if live:
                rows[i] = (n.inputs[j].clone(), n.weight[j].clone())
        return forward(model, batch)

    trainer.evaluator.forward = spy
    record = trainer.run_eval()
    rank = trainer.ranks
    trainer.close()
    destroy_distributed()
    return {"record": record, "rows": rows, "tp": rank.tp_rank, "pp": rank.pp_rank}


def save_until_disk_full(overrides: list[str], run_dir: str, ckpt_dir: str) -> dict:
    """Save step 1, fill ``ckpt_dir``'s file system to within 64 KiB, save step 2; report the
    error of the second save and the checkpoints left."""
    import shutil
    from pathlib import Path

    from megadiff.checkpoint_files import list_checkpoints, verify
    from megadiff.parallel.state import destroy_distributed

    trainer = _trainer([*overrides, f"checkpoint.dir={ckpt_dir}"], run_dir)
    trainer.train_step()
    trainer.save_checkpoint()
    trainer.checkpointer.wait()  # a background save: written and published
    free = shutil.disk_usage(ckpt_dir).free
    with open(os.path.join(ckpt_dir, "filler"), "wb") as f:
        f.write(b"\0" * max(free - (64 << 10), 0))
    trainer.train_step()
    try:
        trainer.save_checkpoint()
        trainer.checkpointer.wait()
        error = None
    except Exception as e:  # noqa: BLE001 - the test inspects whatever was raised
        error = (type(e).__name__, str(e))
    os.remove(os.path.join(ckpt_dir, "filler"))
    left = sorted(p.name for p in Path(ckpt_dir).iterdir())
    problems = {str(p): verify(p) for _, p in list_checkpoints(Path(ckpt_dir))}
    destroy_distributed()
    return {"error": error, "left": left, "problems": problems}


def cli_main(argv: list[str], out: str, err: str, cwd: str) -> int:
    """``megadiff ARGV`` in this rank's (preloaded) process, from ``cwd``: the command's exit
    code. Its stdout and stderr (file descriptors 1 and 2) are appended to the files ``out`` and
    ``err`` (``{rank}`` filled in; the same path: one log). Saves an interpreter start-up and the
    torch/megatron-core imports per launch."""
    import sys

    from megadiff.cli import main

    os.chdir(cwd)
    rank = os.environ["RANK"]
    out, err = out.format(rank=rank), err.format(rank=rank)
    with open(out, "a") as o, open(err, "a") if err != out else o as e:
        os.dup2(o.fileno(), 1)
        os.dup2(e.fileno(), 2)
        try:
            return main(argv)
        except SystemExit as stop:  # argparse errors
            return stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()


def init_stds(overrides: list[str], run_dir: str) -> dict:
    """Standard deviations of the freshly initialised embedding and first attention matrix."""
    from megadiff.config import load_config
    from megadiff.model.gather import unwrap
    from megadiff.parallel.state import destroy_distributed
    from megadiff.plan import resolve
    from megadiff.training.trainer import Trainer

    world = int(os.environ["WORLD_SIZE"])
    plan = resolve(load_config(None, [*TINY, f"run.dir={run_dir}", *overrides]), world)
    trainer = Trainer(plan)
    params = dict(unwrap(trainer.model[0]).named_parameters())
    out = {
        "embedding": params["embedding.word_embeddings.weight"].std().item(),
        "qkv": params["decoder.layers.0.self_attention.linear_qkv.weight"].std().item(),
    }
    trainer.close()
    destroy_distributed()
    return out


def world_rank() -> int:
    """Meet the other ranks through megadiff's launch store (the rendezvous ``run_world`` set
    up) and return this rank."""
    from megadiff.parallel.env import read_launch_env
    from megadiff.parallel.state import launch_store

    launch = read_launch_env()
    store = launch_store(launch)
    store.set(f"rank{launch.rank}", "here")
    store.wait([f"rank{r}" for r in range(launch.world_size)])
    return launch.rank
