"""Every distributed strategy against one process training on the full batch (2 processes,
gloo, CPU), and the library pieces on their own. Two process groups are spawned per module run."""
from __future__ import annotations

import pytest
import torch

from lmrun.distributed.config import STRATEGIES
from lmrun.distributed.env import spawn
from tests.distributed.workers import reference_train, strategy_train, unit_checks

STEPS = 3
#: float64 models: per-rank sums and the all-reduce add in another order than one process does;
#: Adam divides by sqrt(v), which turns 1e-16 differences of near-zero gradients into ~4e-8
PARAM_ATOL = 1e-6
NORM_RTOL = 1e-9


@pytest.fixture(scope="module")
def trained():
    ref = reference_train(STEPS)
    ranks = spawn(strategy_train, 2, STRATEGIES, STEPS)
    return ref, ranks


@pytest.fixture(scope="module")
def accumulated():
    ref = reference_train(2, grad_accum=2)
    ranks = spawn(strategy_train, 2, ["ddp", "ddp_bucketed", "fsdp", "zero1"], 2, 2)
    return ref, ranks


@pytest.fixture(scope="module")
def checks():
    return spawn(unit_checks, 2)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_parameters_equal_single_process_training(trained, strategy):
    ref, ranks = trained
    for rank, res in enumerate(ranks):
        got = res[strategy]["params"]
        if strategy == "torch_fsdp" and rank > 0:
            assert got == {}  # PyTorch gathers the full state on rank 0 only
            continue
        assert set(got) == set(ref["params"])
        for name, expected in ref["params"].items():
            torch.testing.assert_close(got[name], expected, atol=PARAM_ATOL, rtol=0, msg=f"{strategy} {name}")
        # the frozen parameter never changes and the unused one only by... nothing: grad None, skipped
        torch.testing.assert_close(got["unused"], ref["params"]["unused"], atol=0, rtol=0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_global_gradient_norm_equals_single_process(trained, strategy):
    ref, ranks = trained
    for res in ranks:
        assert res[strategy]["norms"] == pytest.approx(ref["norms"], rel=NORM_RTOL if strategy != "torch_fsdp" else 1e-6)


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "torch_fsdp"])
def test_full_optimizer_state_equals_single_process(trained, strategy):
    ref, ranks = trained
    state = ranks[0][strategy]["optimizer"]["state"]
    assert sorted(state) == sorted(ref["optimizer"]["state"])
    for i, expected in ref["optimizer"]["state"].items():
        torch.testing.assert_close(state[i]["exp_avg"], expected["exp_avg"], atol=1e-8, rtol=0)
        torch.testing.assert_close(state[i]["exp_avg_sq"], expected["exp_avg_sq"], atol=1e-9, rtol=1e-6)


def test_gradient_accumulation_with_no_sync(accumulated):
    ref, ranks = accumulated
    for res in ranks:
        for strategy, r in res.items():
            for name, expected in ref["params"].items():
                torch.testing.assert_close(r["params"][name], expected, atol=PARAM_ATOL, rtol=0, msg=strategy)


def test_memory_per_rank(trained):
    _, ranks = trained
    mem = {s: [r[s]["memory"] for r in ranks] for s in STRATEGIES}
    full_state = mem["ddp"][0]["optimizer_state"]
    full_params = mem["ddp"][0]["params"]
    # ZeRO-1: every rank holds part of the state; together exactly the unsharded state
    z = [m["optimizer_state"] for m in mem["zero1"]]
    assert all(0 < s < full_state for s in z) and sum(z) == full_state
    # FSDP: persistent parameters are 1/world_size (+ padding); optimizer state too
    for m in mem["fsdp"]:
        assert full_params / 2 <= m["params"] <= full_params / 2 + 8 * 2 * 30
        assert m["optimizer_state"] < full_state / 2 + 16 * 30 * 2
    # tensor parallelism: the split matrices are halved, embeddings and norms replicated
    for m in mem["tp"]:
        assert full_params / 2 < m["params"] < full_params


def test_buckets_follow_reverse_order_and_size_cap(checks):
    # nn.Linear(7,13), (13,5), (5,3): reversed sizes 3, 15, 5, 65, 13, 91; cap = 144 bytes + 1
    assert checks[0]["bucket_params"] == [[3, 15], [5], [65], [13], [91]]
    for r in checks:
        mean = [(a + b) / 2 for a, b in zip(checks[0]["bucket_local_grads"], checks[1]["bucket_local_grads"])]
        for got, expected in zip(r["bucket_synced_grads"], mean):
            torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    assert not torch.equal(checks[0]["bucket_local_grads"][0], checks[1]["bucket_local_grads"][0])


def test_zero1_holds_only_its_shard_state(checks):
    owners = checks[0]["zero_owner"]
    assert owners == checks[1]["zero_owner"] and set(owners) == {0, 1}
    for rank, r in enumerate(checks):
        assert r["zero_held"] == r["zero_owned"] == [i for i, o in enumerate(owners) if o == rank]
        assert r["zero_full_state_keys"] == [0, 1, 2, 3]  # consolidated: every parameter's state
        assert r["zero_groups_wd"] == [0.0, 0.1]  # add_param_group kept the group's own setting
        assert r["zero_roundtrip"]


def test_fsdp_gathers_reference_parameters_and_shards_them(checks):
    for r in checks:
        assert r["fsdp_gather_maxdiff"] == 0.0
        assert "lm_head.weight" in r["fsdp_gather_names"] and "frozen" in r["fsdp_gather_names"]
        assert r["fsdp_shard_numel"][1] == 64 * 32 // 2  # the tied embedding, once, half per rank
        torch.testing.assert_close(r["fsdp_eval_logits"], r["ref_logits"], atol=1e-12, rtol=0)


def test_fsdp_bf16_compute_is_close_and_keeps_fp32_gradients(checks):
    for r in checks:
        diff = (r["fsdp_bf16_logits"] - r["ref_logits32"]).abs()
        assert 0 < diff.max() < 0.25 and diff.mean() < 0.03
        assert r["fsdp_bf16_grad_dtypes"] == ["torch.float32"]


@pytest.mark.parametrize("kv", [4, 2])
def test_tensor_parallel_forward_and_backward_equal_unsplit(checks, kv):
    for r in checks:
        got = r[f"tp_kv{kv}"]
        assert got["loss_diff"] < 1e-12 and got["grad_maxdiff"] < 1e-12
        assert got["local_q_rows"] == 16  # 4 heads of 8 dims split over 2 ranks


@pytest.mark.parametrize("strategy", ["fsdp", "tp", "zero1"])
def test_full_state_round_trip(checks, strategy):
    assert all(r[f"roundtrip_{strategy}"] for r in checks)
