"""Alignment losses against hand-computed values and their formulas."""
from __future__ import annotations

import math

import pytest
import torch

from lmrun.align.losses import (compute_entropy, compute_grpo_clip_loss, compute_group_normalized_rewards,
                                compute_naive_policy_gradient_loss, compute_per_instance_dpo_loss,
                                compute_policy_gradient_loss, dpo_loss, get_response_log_probs,
                                grpo_microbatch_train_step, masked_mean, masked_normalize, sequence_log_probs,
                                sft_microbatch_train_step)


def test_entropy_uniform_onehot_and_reference():
    assert torch.allclose(compute_entropy(torch.zeros(2, 3, 7)), torch.full((2, 3), math.log(7)))
    peaked = torch.tensor([[1000.0, 0.0, 0.0]])
    assert float(compute_entropy(peaked)) == pytest.approx(0.0, abs=1e-6)  # stable for large logits
    logits = torch.randn(4, 5, 11, generator=torch.Generator().manual_seed(0))
    ref = torch.distributions.Categorical(logits=logits).entropy()
    assert torch.allclose(compute_entropy(logits), ref, atol=1e-5)


class FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.w = torch.nn.Parameter(logits.clone())

    def forward(self, ids):
        return self.w[: ids.shape[0], : ids.shape[1]]


def test_get_response_log_probs_gathers_labels():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]]))
    model = FixedLogits(logits)
    out = get_response_log_probs(model, torch.zeros(1, 2, dtype=torch.long), torch.tensor([[1, 2]]),
                                 return_token_entropy=True)
    assert torch.allclose(out["log_probs"], torch.log(torch.tensor([[0.25, 0.7]])))
    h1 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert out["token_entropy"][0, 0].item() == pytest.approx(h1, rel=1e-5)
    assert out["log_probs"].requires_grad and not out["token_entropy"].requires_grad


def test_masked_mean_and_normalize():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 1, 0], [0, 0, 1]])
    assert masked_mean(x, m).item() == pytest.approx((1 + 2 + 6) / 3)
    assert masked_mean(x, m, dim=1).tolist() == pytest.approx([1.5, 6.0])
    assert masked_mean(x, m, dim=0).tolist() == pytest.approx([1.0, 2.0, 6.0])
    assert masked_normalize(x, m, normalize_constant=2.0).item() == pytest.approx(4.5)
    assert masked_normalize(x, m, dim=1, normalize_constant=4.0).tolist() == pytest.approx([0.75, 1.5])
    assert math.isnan(masked_mean(x, torch.zeros_like(m)).item())
    with pytest.raises(ValueError):
        masked_normalize(x, m, normalize_constant=0)


def test_sft_microbatch_step_value_and_gradient():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -4.0]], requires_grad=True)
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]])
    loss, meta = sft_microbatch_train_step(lp, mask, gradient_accumulation_steps=2, normalize_constant=2.0)
    # per sequence: (2+3)/2 = 2.5 and 0.5/2 = 0.25; batch mean 1.375; / 2 accumulation
    assert loss.item() == pytest.approx(1.375 / 2)
    assert meta["nll_per_token"].item() == pytest.approx((2 + 3 + 0.5) / 3)
    expected = -mask.float() / 2.0 / 2 / 2  # d loss / d lp = -mask / constant / batch / accumulation
    assert torch.allclose(lp.grad, expected)


def test_group_normalized_rewards_std_and_zero_variance():
    def reward(resp, truth):
        return {"reward": float(resp == truth), "format_reward": 1.0, "answer_reward": float(resp == truth)}

    responses = ["a", "b", "a", "b", "x", "x", "x", "x"]
    truths = ["a"] * 4 + ["y"] * 4
    adv, raw, meta = compute_group_normalized_rewards(reward, responses, truths, 4, 1e-6, True)
    assert raw.tolist() == [1, 0, 1, 0, 0, 0, 0, 0]
    std = torch.tensor([1.0, 0, 1, 0]).std().item()  # unbiased: sqrt(1/3)
    assert adv[:4].tolist() == pytest.approx([0.5 / (std + 1e-6), -0.5 / (std + 1e-6)] * 2)
    assert adv[4:].tolist() == [0.0] * 4  # a zero-variance group carries no signal (and no NaN)
    assert meta["zero_std_group_fraction"] == 0.5 and meta["reward_mean"] == 0.25
    assert meta["format_reward_mean"] == 1.0 and meta["answer_reward_mean"] == 0.25
    adv2, _, _ = compute_group_normalized_rewards(reward, responses, truths, 4, 1e-6, False)
    assert adv2.tolist() == [0.5, -0.5, 0.5, -0.5, 0, 0, 0, 0]
    with pytest.raises(ValueError):
        compute_group_normalized_rewards(reward, responses[:7], truths[:7], 4, 1e-6, True)


def test_naive_pg_and_grpo_clip_both_ends():
    lp = torch.log(torch.tensor([[0.5, 0.25]]))
    assert torch.allclose(compute_naive_policy_gradient_loss(torch.tensor([[2.0]]), lp), -2.0 * lp)
    old = torch.log(torch.tensor([[0.25, 0.5]]))  # ratios 2.0 and 0.5
    loss, meta = compute_grpo_clip_loss(torch.tensor([[1.0]]), lp, old, cliprange=0.2)
    # A > 0: ratio 2 is clipped to 1.2; ratio 0.5 is below 1 - eps but min keeps 0.5 (unclipped)
    assert loss[0].tolist() == pytest.approx([-1.2, -0.5])
    assert meta["clipped"].tolist() == [[True, False]]
    loss, meta = compute_grpo_clip_loss(torch.tensor([[-1.0]]), lp, old, cliprange=0.2)
    # A < 0: ratio 2 stays (−2 < −1.2), ratio 0.5 is clipped to 0.8
    assert loss[0].tolist() == pytest.approx([2.0, 0.8])
    assert meta["clipped"].tolist() == [[False, True]]
    same, meta = compute_grpo_clip_loss(torch.tensor([[3.0]]), lp, lp, cliprange=0.2)
    assert torch.allclose(same, torch.full_like(lp, -3.0)) and not meta["clipped"].any()


def test_policy_gradient_dispatch_and_errors():
    lp = torch.tensor([[-1.0, -2.0]])
    r, a = torch.tensor([[1.0]]), torch.tensor([[0.5]])
    assert torch.allclose(compute_policy_gradient_loss(lp, "no_baseline", raw_rewards=r)[0], -lp)
    assert torch.allclose(compute_policy_gradient_loss(lp, "reinforce_with_baseline", advantages=a)[0], -0.5 * lp)
    out, meta = compute_policy_gradient_loss(lp, "grpo_clip", advantages=a, old_log_probs=lp, cliprange=0.1)
    assert torch.allclose(out, torch.full_like(lp, -0.5)) and "clipped" in meta
    for kwargs in ({"loss_type": "no_baseline"}, {"loss_type": "grpo_clip", "advantages": a}, {"loss_type": "ppo"}):
        with pytest.raises(ValueError):
            compute_policy_gradient_loss(lp, **kwargs)


def test_grpo_microbatch_step_length_normalizations():
    lp = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv = torch.tensor([[1.0], [-1.0]])
    loss, _ = grpo_microbatch_train_step(lp, mask, 1, "reinforce_with_baseline", advantages=adv)
    # masked_mean per sequence: 1.0 and -2.0 -> mean -0.5
    assert loss.item() == pytest.approx(-0.5)
    lp.grad = None
    loss, _ = grpo_microbatch_train_step(lp, mask, 2, "reinforce_with_baseline", advantages=adv,
                                         length_normalization="masked_normalize", normalize_constant=3.0)
    # sums 3.0 and -2.0, / 3 -> 1.0 and -2/3; mean 1/6; / 2 accumulation
    assert loss.item() == pytest.approx(1 / 12)
    assert torch.allclose(lp.grad, torch.tensor([[-1, -1, -1], [1, 0, 0]]) / 3.0 / 2 / 2)
    lp.grad = None
    loss, meta = grpo_microbatch_train_step(lp, mask, 1, "grpo_clip", advantages=adv, old_log_probs=lp.detach() - 1.0,
                                            cliprange=0.2)
    assert meta["clip_fraction"].item() == pytest.approx(3 / 4)  # ratio e > 1.2: clipped where A > 0 (3 of 4 tokens)
    assert meta["approx_kl"].item() == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        grpo_microbatch_train_step(lp, mask, 1, "reinforce_with_baseline", advantages=adv,
                                   length_normalization="masked_normalize")


def test_dpo_loss_formula():
    pc, pr = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0])
    loss, meta = dpo_loss(pc, pr, rc, rr, beta=0.5)
    margins = [0.5 * ((-1 + 1.5) - (-2 + 1.5)), 0.5 * ((-3 + 2) - (-1 + 2))]
    expected = sum(-math.log(1 / (1 + math.exp(-m))) for m in margins) / 2
    assert loss.item() == pytest.approx(expected)
    assert meta["preference_accuracy"].item() == 0.5
    assert meta["reward_margin"].item() == pytest.approx(sum(margins) / 2)


class ByteTokenizer:
    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode(errors="replace")


def test_per_instance_dpo_loss_matches_manual_computation():
    from lmrun.model import build_model

    torch.manual_seed(0)
    cfg = {"vocab_size": 256, "context_length": 128, "d_model": 16, "num_layers": 1, "num_heads": 2}
    lm, ref = build_model(cfg), build_model(cfg)
    tok = ByteTokenizer()
    loss = compute_per_instance_dpo_loss(lm, ref, tok, 0.1, "2+2?", "4", "5", template="Q: {instruction}\nA:",
                                         eos_token="#")

    def logp(model, text):
        ids = torch.tensor([tok.encode(text)])
        lp = torch.log_softmax(model(ids[:, :-1]), -1).gather(-1, ids[:, 1:, None]).sum()
        return lp

    with torch.no_grad():
        m = (logp(lm, "Q: 2+2?\nA:4#") - logp(ref, "Q: 2+2?\nA:4#")) - (logp(lm, "Q: 2+2?\nA:5#") - logp(ref, "Q: 2+2?\nA:5#"))
    assert loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(0.1 * m).item(), rel=1e-4)
    loss.backward()
    assert any(p.grad is not None for p in lm.parameters()) and all(p.grad is None for p in ref.parameters())


def test_sequence_log_probs_counts_only_the_response():
    from lmrun.model import build_model

    torch.manual_seed(0)
    model = build_model({"vocab_size": 32, "context_length": 16, "d_model": 16, "num_layers": 1, "num_heads": 2})
    seq = [1, 2, 3, 4, 5]
    full = torch.log_softmax(model(torch.tensor([seq[:-1]])), -1)[0]
    want = sum(full[t - 1, seq[t]].item() for t in range(3, 5))
    got = sequence_log_probs(model, [seq, [7, 8, 9]], [3, 1])
    assert got[0].item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError):
        sequence_log_probs(model, [seq], [5])
