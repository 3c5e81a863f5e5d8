"""Mixture-of-experts feed-forward layer: a top-k softmax router over SwiGLU experts.

Sources: Shazeer et al. 2017 (sparsely-gated MoE); Lepikhin et al. 2020, GShard (top-2 gating,
expert capacity, first choices served before second choices); Fedus et al. 2021, Switch
Transformers (capacity factor, the load-balancing loss ``α·E·Σ_e f_e·P_e``, eq. 4-6); Zoph et
al. 2022, ST-MoE (router z-loss, eq. 5); Jiang et al. 2024, Mixtral (renormalised top-k
gates); DeepSeek-AI 2024, DeepSeekMoE / DeepSeek-V2 (shared experts).

Computation: the ``tokens·top_k`` (token, expert) assignments are sorted by expert (stable, so
within an expert first choices come before second choices and earlier tokens before later
ones), each expert runs once on its contiguous slice of gathered tokens, and the gated results
are scattered back with ``index_add_`` — a loop over experts, never over tokens.

After each forward the layer keeps ``self.aux = {"loss": weighted auxiliary loss (a tensor in
the graph), "stats": {...}}``; ``TransformerLM.auxiliary()`` collects it for the trainer.

State-dict keys under ``ffn.``: ``router.weight (E, d_model)``,
``experts.{e}.{w1,w2,w3}.weight`` (SwiGLU, as the dense FFN's), ``shared.{w1,w2,w3}.weight``
with shared experts. ``TransformerLM`` gives each expert the width ``model.ffn.moe.expert_d_ff``
(null: ``ceil(model.d_ff / top_k)``, the dense FFN's active FLOPs).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from lmrun.model.ffn import GatedFFN
from lmrun.model.layers import Linear
from lmrun.model.variants import MoEConfig  # noqa: F401  (re-exported beside the module)


def load_balancing_loss(probs: torch.Tensor, expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch/GShard auxiliary loss ``E · Σ_e f_e · P_e`` (1 for a perfectly uniform router).

    probs ``(tokens, E)`` router probabilities; expert_index ``(tokens, k)`` the chosen
    experts. ``f_e``: the fraction of the ``tokens·k`` assignments that chose e (counted
    before any capacity drop; no gradient); ``P_e``: the mean probability of e over tokens."""
    counts = torch.bincount(expert_index.reshape(-1), minlength=num_experts).to(probs.dtype)
    f = counts / expert_index.numel()
    return num_experts * (f * probs.mean(0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: ``mean over tokens of (log Σ_e exp(logits))²``; logits ``(tokens, E)``."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class MoE(nn.Module):
    """Top-k routed SwiGLU experts (+ optional shared experts); ``(..., d_model)`` -> same shape.

    Args: d_model; d_ff — each expert's width; num_experts E; top_k; renormalize — scale the
    top-k gates to sum to 1 (top_k > 1 only); capacity_factor — None (dropless) or c: an
    expert serves at most ``ceil(c·tokens·top_k/E)`` assignments per call, the rest are
    dropped (contribute 0); aux_loss_weight, z_loss_weight — weights of the load-balancing loss
    and the router z-loss in ``self.aux["loss"]``; shared_experts — a dense SwiGLU of width
    ``shared_experts·d_ff`` every token also passes through. ValueError for top_k outside [1, E].

    ``self.aux["stats"]`` (detached scalars): ``moe_balance_loss``, ``moe_router_z_loss``
    (unweighted), ``moe_dropped_tokens`` (dropped assignments), ``moe_dropped_frac``,
    ``moe_max_load`` (the busiest expert's share of assignments times E; 1 = balanced).
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int = 8, top_k: int = 2, *, renormalize: bool = True,
                 capacity_factor: float | None = None, aux_loss_weight: float = 0.01, z_loss_weight: float = 0.001,
                 shared_experts: int = 0, bias: bool = False, device=None, dtype=None):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k}: expected an integer in [1, num_experts={num_experts}]")
        self.d_model, self.d_ff, self.num_experts, self.top_k = d_model, d_ff, num_experts, top_k
        self.renormalize, self.capacity_factor = renormalize, capacity_factor
        self.aux_loss_weight, self.z_loss_weight = aux_loss_weight, z_loss_weight
        self.router = Linear(d_model, num_experts, device, dtype)
        self.experts = nn.ModuleList(GatedFFN(d_model, d_ff, device, dtype, activation="silu", bias=bias)
                                     for _ in range(num_experts))
        self.shared = (GatedFFN(d_model, shared_experts * d_ff, device, dtype, activation="silu", bias=bias)
                       if shared_experts else None)
        self.aux: dict | None = None

    def capacity(self, tokens: int) -> int | None:
        """Assignments one expert may take for ``tokens`` tokens (None: dropless)."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * tokens * self.top_k / self.num_experts)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x ``(tokens, d_model)`` -> (logits ``(tokens, E)`` (float32 at least), probs, gates
        ``(tokens, k)``, expert_index ``(tokens, k)``, best first)."""
        logits = self.router(x)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        probs = torch.softmax(logits, dim=-1)
        gates, index = probs.topk(self.top_k, dim=-1)
        if self.renormalize and self.top_k > 1:
            gates = gates / gates.sum(-1, keepdim=True)
        return logits, probs, gates, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.d_model)
        n, k, E = x.shape[0], self.top_k, self.num_experts
        logits, probs, gates, index = self.route(x)
        # assignments in priority order: all first choices (by token), then all second choices, ...
        flat_expert = index.T.reshape(-1)
        flat_token = torch.arange(n, device=x.device).repeat(k)
        flat_gate = gates.T.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        counts = torch.bincount(flat_expert, minlength=E)
        cap = self.capacity(n)
        if cap is not None:
            starts = counts.cumsum(0) - counts
            rank = torch.arange(order.numel(), device=x.device) - starts[flat_expert[order]]
            order = order[rank < cap]
            served = counts.clamp(max=cap)
        else:
            served = counts
        token = flat_token[order]
        gathered = x[token]
        outputs = [expert(chunk) for expert, chunk in zip(self.experts, gathered.split(served.tolist()))]
        y = torch.cat(outputs) * flat_gate[order, None].to(x.dtype)
        out = torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))
        if self.shared is not None:
            out = out + self.shared(x)
        balance = load_balancing_loss(probs, index, E)
        z = router_z_loss(logits)
        dropped = n * k - order.numel()
        with torch.no_grad():
            stats = {"moe_balance_loss": balance.detach(), "moe_router_z_loss": z.detach(),
                     "moe_dropped_tokens": torch.tensor(float(dropped)), "moe_dropped_frac": torch.tensor(dropped / (n * k)),
                     "moe_max_load": counts.max().float() * E / (n * k)}
        self.aux = {"loss": self.aux_loss_weight * balance + self.z_loss_weight * z, "stats": stats}
        return out.view(shape)

    def extra_repr(self) -> str:
        cap = "dropless" if self.capacity_factor is None else f"capacity_factor={self.capacity_factor}"
        return f"num_experts={self.num_experts}, top_k={self.top_k}, d_ff={self.d_ff}, {cap}"
