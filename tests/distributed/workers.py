"""Functions the multi-process tests run in each rank (importable by spawned processes)."""
from __future__ import annotations

import torch
from torch import nn

from lmrun.model import TransformerLM

VOCAB, CTX, BATCH = 64, 16, 8


def tiny_model(seed: int = 0, dtype=torch.float64, **kw) -> TransformerLM:
    """A 2-layer model with tied embeddings, a frozen parameter and a parameter unused in forward
    (float64 by default: parity then holds to ~1e-10 instead of fp32 rounding amplified by Adam)."""
    torch.manual_seed(seed)
    args = dict(vocab_size=VOCAB, context_length=CTX, d_model=32, num_layers=2, num_heads=4, d_ff=48,
                tie_embeddings=True)
    args.update(kw)
    m = TransformerLM(**args).to(dtype)
    m.frozen = nn.Parameter(torch.randn(7, dtype=dtype), requires_grad=False)
    m.unused = nn.Parameter(torch.randn(5, dtype=dtype))
    return m


def batches(steps: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (BATCH, CTX + 1), generator=g) for _ in range(steps)]


def loss_fn(model, x, y):
    logits = model(x)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def opt_cfg(name: str = "adamw"):
    from lmrun.optim.config import OptimizerConfig

    return OptimizerConfig(name=name, lr=1e-2, weight_decay=0.1)


def reference_train(steps: int, max_norm: float = 1.0, grad_accum: int = 1, **model_kw) -> dict:
    """One process on the full batch: the state every strategy must reproduce."""
    from lmrun.optim import build_optimizer, clip_grad_norm

    model = tiny_model(**model_kw)
    opt = build_optimizer(model, opt_cfg())
    norms = []
    for batch in batches(steps):
        for xs in batch.chunk(grad_accum):
            (loss_fn(model, xs[:, :-1], xs[:, 1:]) / grad_accum).backward()
        norms.append(clip_grad_norm([p for p in model.parameters() if p.grad is not None], max_norm))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"params": {k: v.detach().clone() for k, v in model.state_dict().items()}, "norms": norms,
            "optimizer": opt.state_dict()}


def strategy_train(rank: int, world: int, strategies: list[str], steps: int, grad_accum: int = 1,
                   extra: dict | None = None, model_kw: dict | None = None) -> dict:
    """Train with each strategy through ``Parallel``; returns per strategy the full parameters,
    grad norms, the full optimizer state and per-rank memory accounting."""
    from lmrun.distributed.config import DistributedConfig
    from lmrun.distributed.env import DistEnv
    from lmrun.distributed.strategy import Parallel

    env = DistEnv(rank, world, rank, "gloo", torch.device("cpu"))
    out = {}
    for strategy in strategies:
        cfg = DistributedConfig(strategy=strategy, bucket_size_mb=0.01, **(extra or {}))
        par = Parallel(cfg, env)
        model = tiny_model(seed=rank, **(model_kw or {}))  # different init per rank: the initial broadcast must fix it
        fwd = par.wrap(model, find_unused_parameters=True)
        opt = par.build_optimizer(opt_cfg())
        norms = []
        for batch in batches(steps):
            chunks = batch.chunk(grad_accum)
            for i, xs in enumerate(chunks):
                (xs_local,) = par.shard_batch(xs)
                with par.sync_context(i == len(chunks) - 1):
                    (loss_fn(fwd, xs_local[:, :-1], xs_local[:, 1:]) / grad_accum).backward()
            par.finish()
            norms.append(par.clip_grad_norm(1.0))
            opt.step()
            opt.zero_grad(set_to_none=True)
        out[strategy] = {"params": par.model_state(), "norms": norms, "optimizer": par.optimizer_state(),
                         "memory": par.memory_bytes()}
    return out


def unit_checks(rank: int, world: int) -> dict:
    """Library-level checks in one process group: bucket layout, ZeRO-1 ownership and state,
    FSDP gathered parameters and bf16, tensor-parallel block, full-state round trips."""
    import torch.distributed as dist

    from lmrun.distributed.config import DistributedConfig
    from lmrun.distributed.ddp import DDPBucketed
    from lmrun.distributed.env import DistEnv
    from lmrun.distributed.fsdp import FSDP
    from lmrun.distributed.strategy import Parallel
    from lmrun.distributed.tensor_parallel import tensor_parallelize
    from lmrun.distributed.zero import ShardedOptimizer
    from lmrun.optim import AdamW

    out: dict = {}
    # buckets: uneven parameter sizes (odd numel) and a bucket cap between them
    net = nn.Sequential(nn.Linear(7, 13), nn.Linear(13, 5), nn.Linear(5, 3)).double()
    sizes = [p.numel() * 8 for p in net.parameters()]
    ddp = DDPBucketed(net, bucket_size_mb=(sizes[-1] + sizes[-2] + 1) / 2**20)
    out["bucket_params"] = [[p.numel() for p in b.params] for b in ddp.buckets]
    plain = nn.Sequential(nn.Linear(7, 13), nn.Linear(13, 5), nn.Linear(5, 3)).double()
    plain.load_state_dict(net.state_dict())  # the broadcast parameters, without hooks
    torch.manual_seed(10 + rank)
    x = torch.randn(4, 7, dtype=torch.float64)
    plain(x).square().sum().backward()
    local = [p.grad.clone() for p in plain.parameters()]
    net(x).square().sum().backward()
    ddp.finish_gradient_synchronization()
    out["bucket_local_grads"] = local
    out["bucket_synced_grads"] = [p.grad.clone() for p in net.parameters()]

    # ZeRO-1 with add_param_group: ownership, state only for owned parameters, consolidated state
    net2 = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 4)).double()
    params = list(net2.parameters())
    opt = ShardedOptimizer(params[:2], AdamW, lr=1e-2, weight_decay=0.0)
    opt.add_param_group({"params": params[2:], "weight_decay": 0.1})
    net2(torch.randn(3, 6, dtype=torch.float64)).sum().backward()
    opt.step()
    owned = [i for i, o in enumerate(opt.owner) if o == rank]
    held = [i for i, p in enumerate(params) if p in opt.local_optimizer.state]
    out["zero_owner"], out["zero_owned"], out["zero_held"] = opt.owner, owned, held
    out["zero_state_bytes"] = opt.local_state_bytes()
    full = opt.state_dict()
    out["zero_full_state_keys"] = sorted(full["state"])
    out["zero_groups_wd"] = [g["weight_decay"] for g in full["param_groups"]]
    opt2 = ShardedOptimizer(params[:2], AdamW, lr=1e-2, weight_decay=0.0)
    opt2.add_param_group({"params": params[2:], "weight_decay": 0.1})
    opt2.load_state_dict(full)
    out["zero_roundtrip"] = all(torch.equal(opt2.local_optimizer.state[p]["exp_avg"], opt.local_optimizer.state[p]["exp_avg"])
                                for p in opt.local_optimizer.state)

    # FSDP: gathered parameters equal the module's before sharding; bf16 compute runs and is close
    ref = tiny_model(seed=0)
    expected = {k: v.clone() for k, v in ref.state_dict().items()}
    fsdp = FSDP(tiny_model(seed=rank))
    got = fsdp.gather_full_params()
    out["fsdp_gather_maxdiff"] = max((got[k] - expected[k]).abs().max().item() for k in got)
    out["fsdp_gather_names"] = sorted(got)
    out["fsdp_shard_numel"] = [p.numel() for p in fsdp.parameters()]
    out["fsdp_memory"] = fsdp.memory_bytes()
    xs = batches(1)[0]
    with torch.no_grad():
        out["fsdp_eval_logits"] = fsdp(xs[:, :-1]).clone()
    out["ref_logits"] = ref(xs[:, :-1]).detach()
    m32 = tiny_model(seed=0, dtype=torch.float32)
    with torch.no_grad():
        out["ref_logits32"] = m32(xs[:, :-1]).clone()
    bf = FSDP(tiny_model(seed=0, dtype=torch.float32), compute_dtype=torch.bfloat16)
    loss_fn(bf, xs[:, :-1], xs[:, 1:]).backward()
    bf.finish_gradient_synchronization()
    with torch.no_grad():
        out["fsdp_bf16_logits"] = bf(xs[:, :-1]).float()
    out["fsdp_bf16_grad_dtypes"] = sorted({str(p.grad.dtype) for p in bf.parameters() if p.grad is not None})

    # tensor parallelism: forward and backward of the split model equal the unsplit model
    for kv in (4, 2):
        full_m = tiny_model(seed=0, n_kv_heads=kv)
        tp_m = tensor_parallelize(tiny_model(seed=0, n_kv_heads=kv))
        lf = loss_fn(full_m, xs[:, :-1], xs[:, 1:])
        lt = loss_fn(tp_m, xs[:, :-1], xs[:, 1:])
        lf.backward()
        lt.backward()
        grads_full = {n: p.grad for n, p in full_m.named_parameters() if p.grad is not None}
        from lmrun.distributed.tensor_parallel import split_tp_tensor

        diffs = [(split_tp_tensor(n, grads_full[n], rank, world) - p.grad).abs().max().item()
                 for n, p in tp_m.named_parameters() if p.grad is not None]
        out[f"tp_kv{kv}"] = {"loss_diff": abs(lf.item() - lt.item()), "grad_maxdiff": max(diffs),
                             "local_q_rows": tp_m.layers[0].attn.q_proj.weight.shape[0]}

    # full-state round trip through Parallel for each sharded strategy
    env = DistEnv(rank, world, rank, "gloo", torch.device("cpu"))
    for strategy in ("fsdp", "tp", "zero1"):
        par = Parallel(DistributedConfig(strategy=strategy), env)
        fwd = par.wrap(tiny_model(seed=0))
        opt = par.build_optimizer(opt_cfg())
        xl = par.shard_batch(xs)[0]
        loss_fn(fwd, xl[:, :-1], xl[:, 1:]).backward()
        par.finish()
        opt.step()
        ms, os_ = par.model_state(), par.optimizer_state()
        par2 = Parallel(DistributedConfig(strategy=strategy), env)
        par2.wrap(tiny_model(seed=5))
        par2.build_optimizer(opt_cfg())
        par2.load_model_state(ms)
        par2.load_optimizer_state(os_)
        ms2, os2 = par2.model_state(), par2.optimizer_state()
        out[f"roundtrip_{strategy}"] = (all(torch.equal(ms[k], ms2[k]) for k in ms)
                                        and all(torch.equal(os_["state"][i]["exp_avg"], os2["state"][i]["exp_avg"])
                                                for i in os_["state"]))
    dist.barrier()
    return out
