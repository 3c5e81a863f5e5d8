"""Language-model losses: cross-entropy with our own log-sum-exp, and the PaLM z-loss.

Sources: CS336 assignment 1 (``cross_entropy``: subtract the row maximum before ``exp``, cancel
``log`` and ``exp`` where possible); Chowdhery et al. 2022, "PaLM", section 5 (the auxiliary
z-loss ``1e-4 · log²Z`` that keeps the softmax normaliser ``Z`` close to 1).

Units: nats per predicted token. The hot path is :class:`_CrossEntropyLSE`, a custom autograd
function: the forward pass keeps only ``(N,)`` vectors besides the logits it was given, and the
backward pass builds the softmax once, in a single ``(N, V)`` float32 buffer that becomes the
gradient, so no extra ``(N, V)`` float32 copy is saved between the two passes (autograd through
``log_softmax`` + ``nll_loss`` keeps one, and ``F.cross_entropy`` keeps the log-softmax output).

:func:`linear_cross_entropy` goes one step further for training: it fuses the LM head's matrix
multiply with the loss and its gradient, chunk by chunk of tokens, so the ``(N, V)`` logits never
exist whole (the idea of Liger Kernel's fused linear cross-entropy, Hsu et al. 2024, and of
Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models").
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

__all__ = ["cross_entropy", "cross_entropy_with_z", "linear_cross_entropy", "logsumexp", "z_loss"]

REDUCTIONS = ("mean", "sum", "none")


def logsumexp(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``log Σ exp(x)`` along ``dim``, stable for any magnitude: ``m + log Σ exp(x - m)`` with
    ``m`` the maximum (a row of ``-inf`` gives ``-inf``). Computed in float32 at least (bf16 and
    float16 inputs are upcast). Shape: ``x`` with ``dim`` removed. Differentiable (autograd)."""
    x = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    m = x.amax(dim=dim, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return (x - m).exp().sum(dim=dim).log() + m.squeeze(dim)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float32, or float64 for float64 logits."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shifted(logits: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``logits - m`` in the accumulation dtype, as one new tensor (bf16/fp16 upcast, then shifted
    in place)."""
    acc = _acc_dtype(logits.dtype)
    if logits.dtype != acc:
        return logits.to(acc).sub_(m)
    return torch.sub(logits, m)


class _CrossEntropyLSE(torch.autograd.Function):
    """Per-row ``(loss, lse)`` for 2-D logits ``(N, V)`` and targets ``(N,)``.

    ``lse[i] = log Σ_v exp(x[i, v])``, ``loss[i] = lse[i] - x[i, t_i]`` (float32; float64 for
    float64 logits). Targets equal to ``ignore_index`` are read as class 0 here; callers mask
    those rows. Backward, with ``g_loss`` and ``g_lse`` the incoming gradients of the two outputs
    (``g_lse`` is None unless the z-loss is trained): ``∂/∂x[i, v] = softmax(x_i)[v] · (g_loss[i] +
    g_lse[i]) - [v = t_i] · g_loss[i]``.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int):
        ctx.set_materialize_grads(False)
        acc = _acc_dtype(logits.dtype)
        m = logits.amax(dim=-1, keepdim=True).to(acc)                # (N, 1)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all -inf row: lse = -inf, not nan
        buf = _shifted(logits, m)  # the one (N, V) float32 temporary of the forward pass
        s = buf.exp_().sum(dim=-1)                                   # (N,)
        del buf
        log_s = s.log()
        safe_t = torch.where(targets == ignore_index, torch.zeros_like(targets), targets)
        x_t = logits.gather(-1, safe_t.unsqueeze(-1)).squeeze(-1).to(acc)
        m = m.squeeze(-1)
        loss = log_s - (x_t - m)  # log Σ exp(x - m) - (x_t - m): no cancellation of two huge numbers
        lse = m + log_s
        ctx.save_for_backward(logits, safe_t, m, s)
        return loss, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss, g_lse):
        logits, safe_t, m, s = ctx.saved_tensors
        if g_loss is None and g_lse is None:
            return None, None, None
        coef = torch.zeros_like(s)  # per-row weight of the softmax term
        if g_loss is not None:
            coef = coef + g_loss.to(s.dtype)
        if g_lse is not None:
            coef = coef + g_lse.to(s.dtype)
        grad = _shifted(logits, m.unsqueeze(-1))
        grad.exp_().mul_((coef / s).unsqueeze(-1))  # softmax · coef, without forming softmax separately
        if g_loss is not None:
            grad.scatter_add_(-1, safe_t.unsqueeze(-1), -g_loss.to(grad.dtype).unsqueeze(-1))
        return grad.to(logits.dtype), None, None


def _flatten(logits: torch.Tensor, targets: torch.Tensor):
    if logits.dim() < 1 or logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)}: expected logits "
                         f"(..., vocab) and targets (...) with the same leading shape")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets dtype {targets.dtype}: expected an integer tensor of class indices")
    return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).long()


def _reduce(rows: torch.Tensor, valid: torch.Tensor, n_valid: torch.Tensor, reduction: str, shape) -> torch.Tensor:
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows.reshape(shape)
    total = rows.sum()
    return total if reduction == "sum" else total / n_valid


def cross_entropy_with_z(logits: torch.Tensor, targets: torch.Tensor, z_weight: float = 0.0,
                         ignore_index: int = -100, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and z-loss from one log-sum-exp pass.

    Args:
        logits: ``(..., vocab)``, float32, bfloat16 or float16 (accumulated in float32).
        targets: ``(...)`` integer class ids in ``[0, vocab)``, or ``ignore_index`` for positions
            that count for nothing (no loss, no gradient, not in the mean's denominator).
        z_weight: if 0 the z term is returned detached (it costs no backward work); otherwise
            the z term carries gradient, and ``ce + z_weight * z`` is the usual training loss.
        reduction: ``mean`` over non-ignored positions (all ignored: nan, as in PyTorch),
            ``sum``, or ``none`` (shape ``(...)``, zeros at ignored positions).

    Returns:
        ``(ce, z)``: ``ce`` the cross-entropy ``lse - logit[target]`` in nats per token, ``z``
        the z-loss ``lse²`` (PaLM; ``lse = log Σ_v exp(logit_v)``), both float32 (float64 for
        float64 logits) and reduced the same way. ``z`` is unweighted: multiply by ``z_weight`` yourself.

    Raises ValueError for mismatched shapes, non-integer targets or an unknown reduction; a
    target outside ``[0, vocab)`` that is not ``ignore_index`` fails in ``gather`` (an index
    error on CPU, a device assert on CUDA). Not twice differentiable.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction {reduction!r}: expected one of {', '.join(REDUCTIONS)}")
    shape = targets.shape
    x, t = _flatten(logits, targets)
    loss_rows, lse = _CrossEntropyLSE.apply(x, t, ignore_index)
    if not z_weight:
        lse = lse.detach()
    valid = t != ignore_index
    n_valid = valid.sum()
    return (_reduce(loss_rows, valid, n_valid, reduction, shape),
            _reduce(lse.square(), valid, n_valid, reduction, shape))


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy ``-log softmax(logits)[target]`` in nats per token (CS336 assignment 1).

    ``logits (..., vocab)`` (any leading batch shape; bf16/fp16 accumulated in float32),
    ``targets (...)`` integer; positions equal to ``ignore_index`` are skipped. Returns a float32
    scalar (float64 for float64 logits): the mean over non-ignored positions (nan if there are
    none, like ``torch.nn.functional.cross_entropy``), or the sum, or per-position values
    (``reduction``).
    Stable for any logit magnitude: the log-sum-exp subtracts each row's maximum.
    See :func:`cross_entropy_with_z` for errors.
    """
    return cross_entropy_with_z(logits, targets, 0.0, ignore_index, reduction)[0]


def z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The z-loss of Chowdhery et al. 2022 (PaLM): mean of ``log²Z`` over positions, with
    ``log Z = logsumexp(logits, -1)``. ``logits (..., vocab)``; ``mask (...)`` bool, True where a
    position counts (None: all). Returns a float32 scalar (unweighted; PaLM uses weight 1e-4;
    nan if the mask selects nothing). Differentiable."""
    lse = logsumexp(logits, -1)
    sq = lse.square()
    if mask is None:
        return sq.mean()
    mask = mask.to(torch.bool)
    if mask.shape != sq.shape:
        raise ValueError(f"mask {tuple(mask.shape)}: expected the logits' leading shape {tuple(sq.shape)}")
    return torch.where(mask, sq, torch.zeros_like(sq)).sum() / mask.sum()


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy (+ weighted z-loss) of ``logits = hidden @ weightᵀ`` and its gradients,
    computed chunk by chunk in the forward pass.

    Per chunk of rows: logits in float32, row max ``m``, ``s = Σ exp(x - m)``, ``lse = m + log s``;
    the loss terms; then, in the same buffer, ``∂loss/∂x = softmax · (1 + 2·z_weight·lse)/n -
    onehot/n`` (``n`` non-ignored rows; zero for ignored rows), multiplied into
    ``∂hidden = g @ weight`` and accumulated into ``∂weight += gᵀ @ hidden``. The backward pass
    only scales those by the incoming gradient (the loss is linear in it).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, z_weight: float, chunk_size: int):
        n_rows = hidden.shape[0]
        valid = targets != ignore_index
        safe_t = torch.where(valid, targets, torch.zeros_like(targets))
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        cd = hidden.dtype  # matmul dtype (bf16 hidden from autocast: weight cast to it)
        acc = _acc_dtype(cd)
        n = valid.sum().clamp_min(1).to(acc)
        w = weight.to(cd)
        g_hidden = torch.empty_like(hidden) if need_grad else None
        g_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_grad else None
        ce_sum = torch.zeros((), dtype=acc, device=hidden.device)
        z_sum = torch.zeros((), dtype=acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for i in range(0, n_rows, chunk_size):
                h, t, ok = hidden[i:i + chunk_size], safe_t[i:i + chunk_size, None], valid[i:i + chunk_size]
                x = (h @ w.T).to(acc)                             # (c, V) logits of this chunk
                m = x.amax(dim=-1, keepdim=True)
                m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
                x_t = x.gather(-1, t)
                s = x.sub_(m).exp_().sum(dim=-1, keepdim=True)  # x now holds exp(x - m)
                log_s = s.log()
                lse = (m + log_s).squeeze(-1)
                ce_sum += torch.where(ok, (log_s - (x_t - m)).squeeze(-1), 0.0).sum()
                z_sum += torch.where(ok, lse.square(), 0.0).sum()
                if not need_grad:
                    continue
                coef = torch.where(ok, (1.0 + 2.0 * z_weight * lse) / n, 0.0)[:, None]
                x.mul_(coef / s)                                  # softmax · coef
                x.scatter_add_(-1, t, torch.where(ok, -1.0 / n, 0.0)[:, None].expand_as(x_t))
                g = x.to(cd)
                torch.mm(g, w, out=g_hidden[i:i + chunk_size])
                g_weight.addmm_(x.T, h.to(acc)) if cd != acc else g_weight.addmm_(g.T, h)
        some = valid.any()  # all ignored: nan, like torch (a tensor test: no host sync)
        ce = torch.where(some, ce_sum / n, float("nan"))
        z = torch.where(some, z_sum / n, float("nan"))
        ctx.save_for_backward(g_hidden, g_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(ce, z)
        return ce + z_weight * z, ce, z

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss, _g_ce, _g_z):
        g_hidden, g_weight = ctx.saved_tensors
        if g_loss is None or g_hidden is None:
            return None, None, None, None, None, None
        return ((g_hidden * g_loss.to(g_hidden.dtype)), (g_weight * g_loss).to(ctx.weight_dtype),
                None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, z_weight: float = 0.0,
                         ignore_index: int = -100, chunk_size: int = 1024
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training loss of an LM head ``logits = hidden @ weightᵀ`` without materialising the logits.

    Args:
        hidden: ``(..., d_model)`` final hidden states (after the final norm), float32 or bf16.
        weight: ``(vocab, d_model)`` the LM head's weight (tied or not).
        targets: ``(...)`` integer ids, ``ignore_index`` for positions that do not count.
        z_weight: weight of the z-loss term in the differentiable loss.
        chunk_size: rows per chunk; the float32 buffer is ``chunk_size × vocab``.

    Returns:
        ``(loss, ce, z)``: ``loss = ce + z_weight · z`` (differentiable; its gradients were
        computed in the forward pass, which therefore costs what forward+backward of the unfused
        head costs), ``ce`` the mean cross-entropy in nats per token and ``z`` the mean ``lse²``
        over non-ignored positions (both detached; nan when every position is ignored) — the
        same values as :func:`cross_entropy_with_z` on ``hidden @ weightᵀ``.

    Raises ValueError for mismatched shapes or non-integer targets. Not twice differentiable;
    no logit soft-capping (use :func:`cross_entropy_with_z` on the logits for that).
    """
    if hidden.shape[:-1] != targets.shape or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, targets {tuple(targets.shape)}: "
                         "expected hidden (..., d), weight (vocab, d) and targets (...)")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets dtype {targets.dtype}: expected an integer tensor of class indices")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: expected a positive integer")
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1).long(),
                                     ignore_index, float(z_weight), int(chunk_size))
