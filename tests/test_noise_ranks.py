"""Masking noise: identical on every TP rank and pipeline stage of a DP replica, distinct
across DP replicas (4 gloo processes, TP2 x DP2 and PP2 x DP2)."""

from __future__ import annotations

import pytest
import torch

from megadiff.data.synthetic import synthetic_layout
from megadiff.parallel.launch import run_world
from tests.workers import record_noise


@pytest.mark.parametrize("layout", ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"])
def test_noise_shared_within_replica_distinct_across(layout, tmp_path):
    results = run_world(record_noise, 4, ([layout], str(tmp_path)))
    by_dp: dict[int, list] = {}
    for r in results:
        assert r["inputs"], "rank computed no noise"
        by_dp.setdefault(r["dp"], []).append(r)
    assert sorted(by_dp) == [0, 1]
    for members in by_dp.values():
        assert len(members) == 2
        a, b = (torch.stack(m["inputs"]) for m in members)
        assert torch.equal(a, b), "ranks of one DP replica saw different masks"
    a0 = torch.stack(by_dp[0][0]["inputs"])
    a1 = torch.stack(by_dp[1][0]["inputs"])
    mask = synthetic_layout(120).mask_id  # TINY's 120 synthetic ids
    assert (a0 == mask).any() and (a1 == mask).any()
    assert not torch.equal(a0 == mask, a1 == mask), "DP replicas drew the same mask"
