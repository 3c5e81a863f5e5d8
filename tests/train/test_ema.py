"""ParameterEMA against the formula, its swap, its state; and a pretrain run with train.ema_decay:
validation uses the averaged weights, resume restores them, stage=evaluate reproduces the figure."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from lmrun import cli
from lmrun.train.ema import ParameterEMA
from tests.stages.test_pretrain_stage import SMALL, run_pretrain


def test_update_follows_the_warmed_up_decay():
    model = torch.nn.Linear(3, 2)
    ema = ParameterEMA(model, 0.6)
    expected = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(0)
    for n in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        d = min(0.6, (1 + n) / (10 + n))
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, model.parameters())]
        ema.update()
    assert ema.num_updates == 30 and ema.current_decay() == 0.6
    for s, e in zip(ema.shadow, expected):
        torch.testing.assert_close(s, e, rtol=1e-6, atol=1e-6)


def test_applied_swaps_and_restores():
    model = torch.nn.Linear(4, 4)
    ema = ParameterEMA(model, 0.5)
    trained = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for s in ema.shadow:
            s.fill_(7.0)
    with ema.applied():
        assert all(torch.equal(p, torch.full_like(p, 7.0)) for p in model.parameters())
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))
    with pytest.raises(RuntimeError), ema.applied():  # restored even when the block raises
        raise RuntimeError
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))
    state = ema.averaged_state(model)
    assert torch.equal(state["weight"], torch.full((4, 4), 7.0)) and torch.equal(model.weight, trained[0])


def test_state_round_trip_and_mismatch():
    model = torch.nn.Linear(3, 2)
    ema = ParameterEMA(model, 0.99)
    ema.update()
    other = ParameterEMA(torch.nn.Linear(3, 2), 0.99)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1 and all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow))
    with pytest.raises(ValueError, match="shape"):
        ParameterEMA(torch.nn.Linear(4, 2), 0.99).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="decay"):
        ParameterEMA(model, 1.0)


@pytest.mark.slow
def test_pretrain_with_ema_resumes_and_evaluates_the_average(isolated_workspace):
    common = ["train.max_steps=12", "train.log_every=1", "train.eval_every=6", "train.checkpoint_every=6",
              "train.keep_last=5", "train.samples=1", "train.eval_tokens=null", "train.ema_decay=0.9"]
    full = run_pretrain(*common)
    summary = json.loads((full / "summary.json").read_text())
    ckpt = torch.load(full / "checkpoints" / "ckpt_00000012.pt", weights_only=True)
    assert ckpt["ema"]["num_updates"] == 12
    # the checkpoint's training weights differ from the average the validation figures describe
    name = "layers.0.attn.q_proj.weight"
    assert not torch.equal(ckpt["model"][name], ckpt["ema"]["shadow"][name])
    # resuming from step 6 restores the average: the same final validation loss
    cut = isolated_workspace / "interrupted"
    shutil.copytree(full, cut)
    (cut / "checkpoints" / "ckpt_00000012.pt").unlink()
    (cut / "summary.json").unlink()
    assert cli.main(["stage=pretrain", *SMALL, *common, f"hydra.run.dir={cut}"]) == 0
    assert json.loads((cut / "summary.json").read_text())["val_loss"] == summary["val_loss"]
    # stage=evaluate loads the averaged weights
    assert cli.main(["stage=evaluate", "logger=none", "progress=false", f"evaluate.checkpoint={full}"]) == 0
    (eval_dir,) = (isolated_workspace / "runs" / "evaluate").iterdir()
    assert json.loads((eval_dir / "eval.json").read_text())["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-6)
    # and without the average the final figure differs
    plain = run_pretrain(*[c for c in common if not c.startswith("train.ema_decay")])
    assert json.loads((plain / "summary.json").read_text())["val_loss"] != summary["val_loss"]


def test_ema_decay_validation(isolated_workspace, capsys):
    assert cli.main(["stage=pretrain", *SMALL, "train.ema_decay=1.5"]) == 2
    assert "train.ema_decay=1.5" in capsys.readouterr().err
