"""4 gloo ranks in TP2xDP2 and PP2xDP2 layouts (megatron-core parallel_state): only
model-parallel rank 0 of each DP replica builds a loader (after the process group exists: no
global barrier from StreamingDataset), every rank of a DP replica sees the same batches, DP
replicas are disjoint and together cover the stream, and no shared memory is left behind."""

import os
import pickle

import numpy as np
import torch.multiprocessing as mp
from conftest import make_pair_stream

WORLD, BATCH, STEPS, N = 4, 5, 4, 40  # 2 DP replicas x 4 batches x 5 rows = one epoch of 40


def _shm_names(prefixes):
    from megadiff.data.mds import streaming_mds

    api = streaming_mds()
    return {api.shm_name(p, n) for p in prefixes for n in api.SHM_TO_CLEAN}


def _inode(name: str) -> int | None:
    try:
        return os.stat(f"/dev/shm/{name}").st_ino
    except FileNotFoundError:
        return None


def _worker(rank, path, init_file, out_dir):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megadiff.data.loader import MixtureLoader, StreamSpec, model_parallel_batch

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = {}
    for layout, (tp, pp) in {"tp2dp2": (2, 1), "pp2dp2": (1, 2)}.items():
        ps.initialize_model_parallel(tp, pp)
        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        reads = dist.get_rank(ps.get_model_parallel_group()) == 0
        loader = (
            MixtureLoader(
                [StreamSpec("pairs", path, tasks=["t2i"])], 40, BATCH, dp_rank, dp_size, seed=11
            )
            if reads
            else None
        )
        batches = [
            model_parallel_batch(loader, BATCH, 40)["tokens"].numpy().copy() for _ in range(STEPS)
        ]
        prefixes = [ls.shm_prefix for ls in loader.streams] if loader else []
        live = all(os.path.exists(f"/dev/shm/{p:06}_locals") for p in prefixes)
        # the segments' inodes: a concurrent test may create segments of the same names later
        inodes = {n: _inode(n) for n in _shm_names(prefixes) if _inode(n) is not None}
        if loader:
            loader.close()
        results[layout] = {
            "reads": reads,
            "dp_rank": dp_rank,
            "dp_size": dp_size,
            "pp_rank": ps.get_pipeline_model_parallel_rank(),
            "tokens": np.stack(batches),
            "prefixes": prefixes,
            "live": live,
            "inodes": inodes,
        }
        dist.barrier()
        ps.destroy_model_parallel()
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(results, f)
    dist.destroy_process_group()


def test_tp2dp2_and_pp2dp2(tmp_path, text_tok):
    path, _truth = make_pair_stream(tmp_path / "pairs", "image", N, text_tok, codebook=16)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "megatron.core.parallel_state"])
    procs = [
        ctx.Process(target=_worker, args=(r, path, str(tmp_path / "init"), str(tmp_path)))
        for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(50)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    res = [pickle.loads((tmp_path / f"{r}.pkl").read_bytes()) for r in range(WORLD)]
    for layout in ("tp2dp2", "pp2dp2"):
        by_dp: dict[int, list[np.ndarray]] = {}
        for r in res:
            assert r[layout]["dp_size"] == 2
            by_dp.setdefault(r[layout]["dp_rank"], []).append(r[layout]["tokens"])
        assert sorted(by_dp) == [0, 1] and all(len(v) == 2 for v in by_dp.values())
        readers = [r[layout] for r in res if r[layout]["reads"]]
        assert sorted(r["dp_rank"] for r in readers) == [0, 1]  # one reader per replica
        assert all(r["live"] and r["prefixes"] for r in readers)
        ours = {n: i for r in readers for n, i in r["inodes"].items()}
        assert ours and not [n for n, i in ours.items() if _inode(n) == i]  # closed: unlinked
        for toks in by_dp.values():  # TP peers / PP stages of one replica agree
            assert np.array_equal(toks[0], toks[1])
        rows = [set(map(bytes, by_dp[d][0].reshape(-1, 40).astype(np.int64))) for d in (0, 1)]
        assert len(rows[0]) == len(rows[1]) == N // 2
        assert not rows[0] & rows[1]
        assert len(rows[0] | rows[1]) == N
    if "pp2dp2" in res[0]:
        assert {r["pp2dp2"]["pp_rank"] for r in res} == {0, 1}
