"""The decoder-only Transformer LM: embeddings -> blocks -> final norm -> LM head.

Sources: Vaswani et al. 2017; Radford et al. 2019 (GPT-2: pre-norm, learned positions, tied
embeddings); Touvron et al. 2023 (Llama: pre-RMSNorm, SwiGLU, RoPE); Gemma 2 team 2024 (logit
soft-capping); CS336 assignment 1 (the interface, init and checkpoint key names).

State-dict keys (``TransformerLM.state_dict()``): ``token_embeddings.weight``,
``[position_embeddings.weight]`` (learned positions), ``layers.{i}.attn.{q_proj,k_proj,v_proj,
output_proj}.weight``, ``[layers.{i}.attn.{q_norm,k_norm}.weight]`` (QK-norm),
``layers.{i}.ln1.weight``, ``layers.{i}.ln2.weight``, ``layers.{i}.ffn.{w1,w2[,w3]}.weight``,
``ln_final.weight``, ``lm_head.weight``; LayerNorm adds ``.bias`` to its norms and
``bias=True`` adds ``.bias`` to attention/FFN linears; norm kind/placement ``none`` removes the
norm keys. RoPE and sinusoidal tables are non-persistent buffers (no keys).

Variants (``lmrun.model.variants``) keep these names where they exist: the token mixer is
always ``layers.{i}.attn`` (MLA, linear attention and Hyena add their own keys beneath it, see
``lmrun.model.mla`` / ``linear_attention`` / ``hyena``) and the FFN ``layers.{i}.ffn`` (MoE:
``ffn.router``, ``ffn.experts.{e}.{w1,w2,w3}``, ``ffn.shared``); the dense baseline's keys are
unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from lmrun.model.attention import MultiHeadSelfAttention
from lmrun.model.config import ModelConfig, as_model_config, default_d_ff, resolved_d_ff, validate_model
from lmrun.model.variants import (HyenaConfig, LinearAttentionConfig, MLAConfig, MoEConfig, expert_width, layer_windows,
                                  mla_sizes)
from lmrun.model.ffn import build_ffn
from lmrun.model.layers import Dropout, Embedding, Linear, linear_init_std
from lmrun.model.norms import build_norm
from lmrun.model.positions import RotaryEmbedding, SinusoidalPositionalEmbedding


class TransformerBlock(nn.Module):
    """One block: causal self-attention then feed-forward, each with a residual connection.

    ``dropout``: probability of zeroing each element of the attention and FFN outputs before
    they join the residual stream (training mode only; Srivastava et al. 2014, as in GPT-2).
    ``norm_placement``: ``pre`` — ``x + attn(ln1(x))``, ``x + ffn(ln2(x))``; ``post`` —
    ``ln1(x + attn(x))``, ``ln2(x + ffn(x))``; ``none`` — no norms (no ln1/ln2 modules).
    ``window``: sliding-window size of the self-attention (None: full causal).
    ``attn_module`` / ``ffn_module``: a prebuilt token mixer / feed-forward module to use
    instead (the variants: MLA, linear attention, Hyena, MoE).
    Shapes: ``x (..., seq_len, d_model)`` -> same.
    """

    def __init__(self, d_model: int, num_heads: int, d_ff: int, *, n_kv_heads: int | None = None,
                 norm: str = "rmsnorm", norm_placement: str = "pre", norm_eps: float = 1e-5,
                 ffn: str = "swiglu", rope: RotaryEmbedding | None = None, attn_impl: str = "sdpa",
                 qk_norm: bool = False, bias: bool = False, dropout: float = 0.0, window: int | None = None,
                 attn_module: nn.Module | None = None, ffn_module: nn.Module | None = None, norm_impl: str = "torch",
                 device=None, dtype=None):
        super().__init__()
        if norm_placement not in ("pre", "post", "none"):
            raise ValueError(f"norm_placement {norm_placement!r}: expected pre, post or none")
        self.norm_placement = norm_placement if norm != "none" else "none"
        self.attn = attn_module if attn_module is not None else MultiHeadSelfAttention(
            d_model, num_heads, n_kv_heads, rope=rope, impl=attn_impl, qk_norm=qk_norm, bias=bias, norm_eps=norm_eps,
            window=window, device=device, dtype=dtype)
        self.ffn = ffn_module if ffn_module is not None else build_ffn(ffn, d_model, d_ff, bias=bias, device=device,
                                                                       dtype=dtype)
        self.drop = Dropout(dropout) if dropout > 0 else nn.Identity()  # residual dropout (GPT-2)
        if self.norm_placement != "none":
            self.ln1 = build_norm(norm, d_model, norm_eps, device=device, dtype=dtype, impl=norm_impl)
            self.ln2 = build_norm(norm, d_model, norm_eps, device=device, dtype=dtype, impl=norm_impl)

    def forward(self, x: torch.Tensor, token_positions: torch.Tensor | None = None) -> torch.Tensor:
        drop = self.drop
        if self.norm_placement == "pre":
            x = x + drop(self.attn(self.ln1(x), token_positions))
            return x + drop(self.ffn(self.ln2(x)))
        if self.norm_placement == "post":
            x = self.ln1(x + drop(self.attn(x, token_positions)))
            return self.ln2(x + drop(self.ffn(x)))
        x = x + drop(self.attn(x, token_positions))
        return x + drop(self.ffn(x))


class TransformerLM(nn.Module):
    """A decoder-only Transformer language model.

    ``forward(token_ids, token_positions=None)``: token_ids integer ``(batch, seq_len)`` (any
    leading dims), ``seq_len <= context_length``; token_positions integer, broadcastable to
    token_ids (default ``0..seq_len-1``) -> logits ``(batch, seq_len, vocab_size)``
    (unnormalised, float32 for float32 weights). Raises ValueError for a sequence longer than
    ``context_length``.

    The positional arguments follow CS336's ``TransformerLM(vocab_size, context_length,
    d_model, num_layers, num_heads, d_ff, rope_theta)``; the keyword arguments select variants
    (defaults: the Llama-style pre-RMSNorm / SwiGLU / RoPE model). ``dropout`` applies to the
    embeddings and to each block's attention and FFN outputs (training mode only). ``norm_impl``
    (torch | triton) picks RMSNorm's implementation; ``attn_impl`` the attention's (naive | sdpa |
    flash_torch | flash_triton; the Triton ones need CUDA or ``TRITON_INTERPRET=1``, else
    ConfigError). ``rope_theta`` is also the
    base of the sinusoidal table. ``d_ff=None`` picks ``default_d_ff(d_model, ffn)``.

    Init: linears truncated N(0, 2/(d_in+d_out)); token (and learned position) embeddings
    truncated N(0, 1); with ``tie_embeddings`` the shared matrix uses the LM head's linear
    init (std ``sqrt(2/(vocab_size+d_model))``), learned positions the same std.
    ``build_model(cfg)`` / ``TransformerLM.from_config(cfg)`` construct one from a ModelConfig.

    Variants (``lmrun.model.variants``): ``attention_kind`` mha | mla | linear | hyena (with the
    ``mla`` / ``linear`` / ``hyena`` configs; defaults when None); ``windows``: one sliding
    window (or None) per layer for kind mha; ``ffn="moe"`` with ``moe`` (a ``MoEConfig``).
    ``auxiliary()`` returns the auxiliary losses of the last forward pass (MoE).
    """

    def __init__(self, vocab_size: int, context_length: int, d_model: int, num_layers: int, num_heads: int,
                 d_ff: int | None = None, rope_theta: float = 10000.0, *, n_kv_heads: int | None = None,
                 norm: str = "rmsnorm", norm_placement: str = "pre", final_norm: bool = True,
                 norm_eps: float = 1e-5, ffn: str = "swiglu", position: str = "rope", attn_impl: str = "sdpa",
                 qk_norm: bool = False, bias: bool = False, tie_embeddings: bool = False,
                 logit_softcap: float | None = None, dropout: float = 0.0, attention_kind: str = "mha",
                 windows: list[int | None] | None = None, mla: MLAConfig | None = None,
                 linear: LinearAttentionConfig | None = None, hyena: HyenaConfig | None = None,
                 moe: MoEConfig | None = None, norm_impl: str = "torch", device=None, dtype=None):
        super().__init__()
        if position not in ("rope", "sinusoidal", "learned", "none"):
            raise ValueError(f"position {position!r}: expected rope, sinusoidal, learned or none")
        d_ff = d_ff or default_d_ff(d_model, ffn)
        self.vocab_size, self.context_length, self.d_model = vocab_size, context_length, d_model
        self.position, self.tie_embeddings, self.logit_softcap = position, tie_embeddings, logit_softcap
        emb_std = linear_init_std(d_model, vocab_size) if tie_embeddings else 1.0
        self.token_embeddings = Embedding(vocab_size, d_model, device, dtype, init_std=emb_std)
        if position == "learned":
            self.position_embeddings = Embedding(context_length, d_model, device, dtype, init_std=emb_std)
        elif position == "sinusoidal":
            self.position_table = SinusoidalPositionalEmbedding(context_length, d_model, rope_theta, device)
        rope = RotaryEmbedding(rope_theta, d_model // num_heads, context_length, device) if position == "rope" else None
        windows = list(windows) if windows is not None else [None] * num_layers
        if len(windows) != num_layers:
            raise ValueError(f"windows: expected {num_layers} entries (one per layer), got {len(windows)}")
        mixers = _build_mixers(attention_kind, num_layers, d_model, num_heads, n_kv_heads, context_length, rope_theta,
                               rope, position == "rope", attn_impl, bias, norm_eps, mla, linear, hyena, device, dtype)
        ffns = [None] * num_layers
        if ffn == "moe":
            from lmrun.model.moe import MoE

            m = moe or MoEConfig()
            ffns = [MoE(d_model, expert_width(m, d_ff), m.num_experts, m.top_k, renormalize=m.renormalize,
                        capacity_factor=m.capacity_factor, aux_loss_weight=m.aux_loss_weight,
                        z_loss_weight=m.z_loss_weight, shared_experts=m.shared_experts, bias=bias, device=device,
                        dtype=dtype) for _ in range(num_layers)]
        self.layers = nn.ModuleList(
            TransformerBlock(d_model, num_heads, d_ff, n_kv_heads=n_kv_heads, norm=norm, norm_placement=norm_placement,
                             norm_eps=norm_eps, ffn=ffn, rope=rope, attn_impl=attn_impl, qk_norm=qk_norm, bias=bias,
                             dropout=dropout, window=windows[i], attn_module=mixers[i], ffn_module=ffns[i],
                             norm_impl=norm_impl, device=device, dtype=dtype)
            for i in range(num_layers))
        self.embed_drop = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.ln_final = build_norm(norm if final_norm else "none", d_model, norm_eps, device=device, dtype=dtype,
                                   impl=norm_impl if final_norm else "torch")
        if tie_embeddings:
            self.lm_head = Linear(d_model, vocab_size, "meta", dtype)  # no memory; its weight is replaced
            self.lm_head.weight = self.token_embeddings.weight  # one Parameter, two state-dict keys
        else:
            self.lm_head = Linear(d_model, vocab_size, device, dtype)

    @classmethod
    def from_config(cls, cfg: ModelConfig, device=None, dtype=None) -> TransformerLM:
        """Build from a ``ModelConfig`` (or the composed ``cfg.model`` node); call
        ``validate_model`` first for one-line errors."""
        cfg = as_model_config(cfg)
        a = cfg.attention
        return cls(cfg.vocab_size, cfg.context_length, cfg.d_model, cfg.num_layers, cfg.num_heads,
                   resolved_d_ff(cfg), cfg.position.theta, n_kv_heads=cfg.n_kv_heads, norm=cfg.norm.kind,
                   norm_placement=cfg.norm.placement, final_norm=cfg.norm.final, norm_eps=cfg.norm.eps,
                   ffn=cfg.ffn.kind, position=cfg.position.kind, attn_impl=a.impl,
                   qk_norm=a.qk_norm, bias=cfg.bias, tie_embeddings=cfg.tie_embeddings,
                   logit_softcap=cfg.logit_softcap, dropout=cfg.dropout, attention_kind=a.kind,
                   windows=layer_windows(cfg), mla=a.mla, linear=a.linear, hyena=a.hyena, moe=cfg.ffn.moe,
                   norm_impl=cfg.norm.impl,
                   device=device, dtype=dtype)

    def forward(self, token_ids: torch.Tensor, token_positions: torch.Tensor | None = None, *,
                return_hidden: bool = False) -> torch.Tensor:
        """``token_ids (..., seq_len)`` -> logits ``(..., seq_len, vocab_size)``; with
        ``return_hidden`` the final hidden states ``(..., seq_len, d_model)`` after the final norm
        instead (the LM head is left to a fused loss, ``lmrun.train.loss.linear_cross_entropy``).
        Raises ValueError for a sequence longer than ``context_length``."""
        seq_len = token_ids.shape[-1]
        if seq_len > self.context_length:
            raise ValueError(f"sequence of {seq_len} tokens is longer than context_length={self.context_length}")
        x = self.token_embeddings(token_ids)
        if self.position in ("learned", "sinusoidal"):
            pos = token_positions if token_positions is not None else torch.arange(seq_len, device=token_ids.device)
            table = self.position_embeddings if self.position == "learned" else self.position_table
            x = x + table(pos).to(x.dtype)
        x = self.embed_drop(x)
        for layer in self.layers:
            x = layer(x, token_positions)
        x = self.ln_final(x)
        if return_hidden:
            return x
        logits = self.lm_head(x)
        if self.logit_softcap is not None:
            logits = self.logit_softcap * torch.tanh(logits / self.logit_softcap)
        return logits

    def auxiliary(self) -> tuple[torch.Tensor | None, dict[str, float]]:
        """The auxiliary losses of the last forward pass, to add to the training loss, and their
        statistics to log: ``(loss or None, stats)``. Collects ``module.aux = {"loss", "stats"}``
        from every submodule that sets it (MoE layers) and clears it; ``loss`` is the sum over
        those modules (already weighted), ``stats`` the mean of each statistic over them."""
        total, sums, n = None, {}, {}
        for module in self.modules():
            aux = getattr(module, "aux", None)
            if not aux:
                continue
            total = aux["loss"] if total is None else total + aux["loss"]
            for key, value in aux["stats"].items():
                sums[key] = sums.get(key, 0.0) + float(value)
                n[key] = n.get(key, 0) + 1
            module.aux = None
        return total, {key: sums[key] / n[key] for key in sums}

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters (a tied matrix counted once); ``non_embedding`` leaves out the token and
        learned position embeddings (a tied LM head goes with them)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.token_embeddings.weight.numel()
            if self.position == "learned":
                n -= self.position_embeddings.weight.numel()
        return n


def _build_mixers(kind: str, num_layers: int, d_model: int, num_heads: int, n_kv_heads: int | None,
                  context_length: int, theta: float, rope: RotaryEmbedding | None, use_rope: bool, impl: str, bias: bool,
                  norm_eps: float, mla: MLAConfig | None, linear: LinearAttentionConfig | None, hyena: HyenaConfig | None,
                  device, dtype) -> list[nn.Module | None]:
    """One token mixer per layer for the non-default attention kinds (None: the block builds
    its ``MultiHeadSelfAttention``)."""
    if kind == "mha":
        return [None] * num_layers
    if kind == "mla":
        from lmrun.model.mla import MultiHeadLatentAttention

        sizes = mla_sizes(mla or MLAConfig(), d_model // num_heads, use_rope)
        mla_rope = RotaryEmbedding(theta, sizes["rope_dim"], context_length, device) if use_rope else None
        return [MultiHeadLatentAttention(d_model, num_heads, sizes["kv_rank"], q_rank=sizes["q_rank"],
                                         rope_dim=sizes["rope_dim"], rope=mla_rope, impl=impl, bias=bias,
                                         norm_eps=norm_eps, device=device, dtype=dtype) for _ in range(num_layers)]
    if kind == "linear":
        from lmrun.model.linear_attention import LinearAttention

        c = linear or LinearAttentionConfig()
        return [LinearAttention(d_model, num_heads, n_kv_heads, feature_map=c.feature_map, chunk_size=c.chunk_size,
                                rope=rope, bias=bias, device=device, dtype=dtype) for _ in range(num_layers)]
    if kind == "hyena":
        from lmrun.model.hyena import HyenaOperator

        c = hyena or HyenaConfig()
        return [HyenaOperator(d_model, context_length, order=c.order, filter_dim=c.filter_dim,
                              filter_emb_dim=c.filter_emb_dim, short_kernel=c.short_kernel, bias=bias, device=device,
                              dtype=dtype) for _ in range(num_layers)]
    raise ValueError(f"attention kind {kind!r}: expected mha, mla, linear or hyena")


def build_model(cfg: ModelConfig, device=None, dtype=None) -> TransformerLM:
    """``TransformerLM.from_config(cfg)``: validates ``cfg`` (ConfigError on a bad value) and
    builds the model on ``device`` (``"meta"`` builds it without allocating memory)."""
    cfg = as_model_config(cfg)
    validate_model(cfg)
    return TransformerLM.from_config(cfg, device=device, dtype=dtype)
