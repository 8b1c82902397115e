"""The rank topology of a 64-rank TP4 x PP4 x DP4 layout, built in one process on a fake
process group (no communication happens)."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch.testing._internal.distributed.fake_pg import FakeStore

TP, PP, DP = 4, 4, 4
WORLD = TP * PP * DP


def _coords(rank: int) -> tuple[int, int, int]:
    # megatron-core's default order "tp-cp-ep-dp-pp": TP fastest, then DP, then PP
    return rank % TP, (rank // TP) % DP, rank // (TP * DP)


@pytest.mark.parametrize("rank", [0, 5, 22, 37, 63])
def test_64_rank_layout(rank):
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=WORLD)
    try:
        ps.initialize_model_parallel(TP, PP, create_gloo_process_groups=False)
        tp, dp, pp = _coords(rank)
        assert ps.get_tensor_model_parallel_rank() == tp
        assert ps.get_data_parallel_rank() == dp
        assert ps.get_pipeline_model_parallel_rank() == pp
        assert ps.get_tensor_model_parallel_world_size() == TP
        assert ps.get_pipeline_model_parallel_world_size() == PP
        assert ps.get_data_parallel_world_size() == DP
        tp_group = dist.get_process_group_ranks(ps.get_tensor_model_parallel_group())
        dp_group = dist.get_process_group_ranks(ps.get_data_parallel_group())
        pp_group = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
        base = rank - tp
        assert tp_group == list(range(base, base + TP))
        assert dp_group == [tp + TP * d + TP * DP * pp for d in range(DP)]
        assert pp_group == [tp + TP * dp + TP * DP * p for p in range(PP)]
        # every group's members agree on the coordinates they share
        assert all(_coords(r)[1:] == (dp, pp) for r in tp_group)
        assert all(_coords(r)[0] == tp and _coords(r)[2] == pp for r in dp_group)
        assert ps.is_pipeline_first_stage() == (pp == 0)
        assert ps.is_pipeline_last_stage() == (pp == PP - 1)
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()
