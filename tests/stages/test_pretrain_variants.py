"""`lmrun stage=pretrain` with architecture variants: the MoE auxiliary losses and dropped-token
counts are logged, and the validation loss falls for an MoE and an attention-free (Hyena) model."""
from __future__ import annotations

import json

import pytest

from tests.stages.test_pretrain_stage import metrics, run_pretrain


@pytest.mark.parametrize("overrides", [
    ["model=moe", "model.ffn.moe.num_experts=4", "model.ffn.moe.capacity_factor=1.0"],
    ["model=mla", "model/ffn=moe", "model.ffn.moe.num_experts=4"],
    ["model=hyena"],
], ids=["moe-capacity", "mla-moe", "hyena"])
@pytest.mark.slow
def test_variant_pretrains_with_falling_validation_loss(overrides, isolated_workspace):
    run_dir = run_pretrain(*overrides, "train.max_steps=40", "train.eval_every=10", "train.log_every=10",
                           "optimizer.lr=3e-3", "train.samples=1")
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = metrics(run_dir)
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 4 and val[-1] < val[0] - 0.2, val
    train_rows = [r for r in rows if "loss" in r]
    if "model/ffn=moe" in overrides or "model=moe" in overrides:
        for r in train_rows:
            assert 0 < r["moe_balance_loss"] < 4.0 and r["moe_router_z_loss"] > 0 and 1.0 <= r["moe_max_load"] <= 4.0
            assert 0.0 <= r["moe_dropped_frac"] < 1.0
        capacity = "model.ffn.moe.capacity_factor=1.0" in overrides
        assert any(r["moe_dropped_tokens"] > 0 for r in train_rows) == capacity  # dropless drops nothing
    else:
        assert not any(k.startswith("moe_") for k in train_rows[0])
    assert summary["steps"] == 40 and summary["params"] > 0
