"""Global-batch invariance of the worker step, for every objective, without Ray.

For each objective in robust_objectives.OBJECTIVES the same 3 global batches of 8 pairs (or lists)
are trained three ways from the same weights:
  (a) 1 worker,  micro-batch 8, no accumulation            (the reference run)
  (b) 2 workers, micro-batch 4 each (torch.distributed gloo, two spawned processes)
  (c) 1 worker,  micro-batch 4, 2 accumulation micro-steps (global_accumulation=True)
and must give the same loss at every step and the same parameters at the end.  Tolerance (CPU,
fp32, plain SGD with lr 0.1 so the parameters are a linear image of the gradients and a wrong
gradient scale cannot hide behind Adam's normalisation): losses and gradient norms rel. 1e-5,
parameters abs. 2e-6 (steps move them by ~1e-2; what remains is float summation order: padding
widths and all-reduce order).  Coupled objectives use sharp temperatures (tau = beta' = lam = 0.05,
beta = 1, wdpo's coupled "sqrt" form) so their weights are far from uniform.  Two negative controls
show the test can fail: without the gather (local statistics) kldpo's 2 x 4 run, and without
global accumulation its 4 x 2 run, both differ from 1 x 8.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

STEPS = 3
GLOBAL = 8
LOSS_RTOL = 1e-5
PARAM_ATOL = 2e-6
# Sharp settings: with beta = 1 and temperatures 0.05 the batch weights differ from uniform a lot.
SHARP = {"beta": 1.0, "tau": 0.05, "beta_prime": 0.05, "lam": 0.05, "penalty": "sqrt", "rho": 0.1}


def _global_batches(listwise: bool) -> list[dict]:
    from train_datasets import make_list_columns, make_pair_columns

    batches = []
    for step in range(STEPS):
        columns = make_list_columns(GLOBAL, 3, seed=100 + step) if listwise else make_pair_columns(GLOBAL, seed=100 + step)
        batches.append({k: v for k, v in columns.items() if k.endswith("input_ids") or k in ("scores", "calibration")})
    return batches


def _context(name: str, rank: int, world: int, *, coupled: bool | None = None, global_accumulation: bool = True):
    import robust_objectives as ro

    from pipelines.train.step import StepContext

    defaults = ro.objective_hyperparameters(name)
    hyperparameters = {**defaults, **{k: v for k, v in SHARP.items() if k in defaults}}
    return StepContext(
        objective=ro.get_objective(name), hyperparameters=hyperparameters,
        listwise=name in ro.LISTWISE, needs_vocab=name in ro.TOKEN_LEVEL,
        needs_embeddings=name in ro.NEEDS_EMBEDDINGS,
        batch_coupled=(name in ro.BATCH_COUPLED) if coupled is None else coupled,
        live_reference=True, world_size=world, rank=rank, global_accumulation=global_accumulation,
    )


def run_objective(model_dir: str, name: str, rank: int, world: int, micro: int, **ctx_kwargs):
    """Train STEPS steps of one objective; return ((losses, grad norms) per step, final parameters)."""
    import robust_objectives as ro

    from pipelines import collate as collate_lib
    from pipelines import model as model_lib
    from pipelines.train.batches import split_global_batch
    from pipelines.train.step import train_step

    attn = "eager" if name in ro.NEEDS_EMBEDDINGS else "sdpa"
    policy = model_lib.load_causal_lm(model_dir, attn_implementation=attn).train()
    _perturb(policy)
    reference = model_lib.load_causal_lm(model_dir, attn_implementation=attn).eval().requires_grad_(False)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    ctx = _context(name, rank, world, **ctx_kwargs)
    collate = collate_lib.collate_lists if ctx.listwise else collate_lib.collate_pairs
    layout = "packed" if name in ro.NEEDS_EMBEDDINGS else "shared"  # the train stage's (train.config.batch_layout)
    losses = []
    for step, rows in enumerate(_global_batches(ctx.listwise)):
        micro_batches = [collate(r, 0, layout=layout, response_head=True)
                         for r in split_global_batch(rows, rank=rank, world_size=world, micro_batch_size=micro)]
        metrics = train_step(policy, reference, optimizer, scheduler, micro_batches, ctx, step)
        losses += [metrics["loss"], metrics["grad_norm"]]
    return losses, {n: p.detach().clone() for n, p in policy.named_parameters()}


def _perturb(policy) -> None:
    """Move the policy off the reference (seeded, identical in every run).  At policy == reference
    every token log-ratio is exactly 0 and Ra-DPO's CVaR tail is a tie: its (sub)gradient then
    depends on how argsort breaks ties, which is not a property of the training stage."""
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))


def _distributed_worker(rank: int, world: int, port: int, model_dir: str, names: list[str], out: str) -> None:
    import torch.distributed as dist
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {name: run_objective(model_dir, name, rank, world, GLOBAL // world) for name in names}
    results["kldpo/local_statistics"] = run_objective(model_dir, "kldpo", rank, world, GLOBAL // world, coupled=False)
    dist.barrier()
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_same(run, reference, what: str) -> None:
    losses, params = run
    ref_losses, ref_params = reference
    assert losses == pytest.approx(ref_losses, rel=LOSS_RTOL), f"{what}: losses {losses} vs {ref_losses}"
    worst = max(float((params[n] - ref_params[n]).abs().max()) for n in ref_params)
    assert worst <= PARAM_ATOL, f"{what}: parameters differ by {worst:.3g}"


@pytest.fixture(scope="module")
def two_worker_results(tiny_model_dir, tmp_path_factory):
    import robust_objectives as ro
    import torch.multiprocessing as mp

    out = str(tmp_path_factory.mktemp("invariance") / "two_workers.pt")
    names = sorted(ro.OBJECTIVES)
    mp.spawn(_distributed_worker, args=(2, _free_port(), str(tiny_model_dir), names, out), nprocs=2, join=True)
    return torch.load(out, weights_only=False)


@pytest.mark.slow
def test_every_objective_is_invariant_to_workers_and_accumulation(tiny_model_dir, two_worker_results):
    import robust_objectives as ro

    model_dir = str(tiny_model_dir)
    for name in sorted(ro.OBJECTIVES):
        single = run_objective(model_dir, name, 0, 1, GLOBAL)
        assert all(torch.isfinite(torch.tensor(single[0]))), name
        _assert_same(two_worker_results[name], single, f"{name}: 2 workers x 4 vs 1 x 8")
        _assert_same(run_objective(model_dir, name, 0, 1, GLOBAL // 2), single, f"{name}: 4 x 2 accumulation vs 1 x 8")
        moved = max(float((single[1][n] - p).abs().max()) for n, p in _initial_parameters(model_dir).items())
        assert moved > 1e-3, f"{name}: parameters did not move"


def _initial_parameters(model_dir: str) -> dict:
    from pipelines import model as model_lib

    policy = model_lib.load_causal_lm(model_dir, attn_implementation="sdpa")
    _perturb(policy)
    return {n: p.detach() for n, p in policy.named_parameters()}


@pytest.mark.slow
def test_negative_controls_local_statistics_differ(tiny_model_dir, two_worker_results):
    """Without the gather (2 x 4) or without global accumulation (4 x 2), kldpo's batch statistic
    is local and the run departs from 1 x 8: the invariance above is not vacuous."""
    model_dir = str(tiny_model_dir)
    single = run_objective(model_dir, "kldpo", 0, 1, GLOBAL)
    local = two_worker_results["kldpo/local_statistics"]
    assert abs(local[0][-2] - single[0][-2]) > 1e-3 * abs(single[0][-2])
    per_micro = run_objective(model_dir, "kldpo", 0, 1, GLOBAL // 2, global_accumulation=False)
    assert abs(per_micro[0][-2] - single[0][-2]) > 1e-3 * abs(single[0][-2])
