"""The training loop of ``jobs.finetune``, run by each Ray Train worker (``train_loop``) or, in
tests, in this process (``train``).

- Each worker tokenizes its own share of the training pairs (rows ``rank::world``, cut to the
  same length on every worker so that DDP's steps line up).
- AdamW with weight decay (not on biases and LayerNorm weights, as Hugging Face's Trainer), a
  linear warm-up then linear decay, gradient norm clipped at 1, dropout as the model's config
  (or ``--dropout``), mixed precision (bf16 autocast on a GPU that has it, else fp16 with a
  gradient scaler; bf16 on a CPU that computes it natively). Validation runs in fp32.
- Torch threads: the node's cores shared by the workers on it (``--threads`` overrides).
- Epoch 0 is the base model: rank 0 scores the validation pairs before any step, so the base
  and tuned figures come from the same code. Early stopping is on validation MRR and keeps the
  best weights, which may be the base model's.
- Rank 0 decides when to stop and broadcasts it, so every worker leaves the loop together.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Mapping

import torch

from encoders.core.device import autocast, native_reduced, resolve_precision
from jobs.text_tower import TextTower, cached_mnrl_step, embed_all, retrieval_metrics

log = logging.getLogger(__name__)
MINI_BATCH = {False: 16, True: 128}  # texts per forward: CPU, GPU
NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker entry point."""
    import ray
    import ray.train
    import ray.train.torch

    from jobs.trainer import report_final, worker_setup
    from pipeline.cluster import this_node_cpus, threads_for_node

    device = worker_setup(config, config["seed"])
    context = ray.train.get_context()
    if not config.get("threads") and device.type == "cpu":  # the node's cores, shared by its workers
        threads = threads_for_node(this_node_cpus(), config["cpus_per_worker"], 1, context.get_local_world_size())
        torch.set_num_threads(threads)
    data = ray.get(config["data"][0])
    metrics, payload = train(
        config, data, device, context.get_world_rank(), context.get_world_size(), ray.train.torch.prepare_model
    )
    report_final(metrics, payload)


def amp_for(device: torch.device, precision: str) -> tuple[Callable[[], Any] | None, Any]:
    """(autocast factory or None, GradScaler or None) for ``precision`` on ``device``."""
    if precision == "auto":  # the GPU choice is inference's; a CPU trains in bf16 where it computes it natively
        precision = "bf16" if device.type == "cpu" and cpu_runs_bf16() else resolve_precision(device, "auto")
    if precision == "fp32":
        return None, None
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return (lambda: autocast(device, precision)), scaler


def cpu_runs_bf16() -> bool:
    """This CPU computes bf16 natively (AVX512_BF16 or AMX): bf16 autocast trains about 1.8x
    faster there than fp32 (benchmarks/finetune_step.py). Elsewhere it is emulated, and slower."""
    return native_reduced(torch.device("cpu")) == "bf16"


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if name.endswith(NO_DECAY) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def _warmup_then_linear(optimizer: Any, total: int, warmup: int) -> Any:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        return max(0.0, (total - step) / max(total - warmup, 1))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _agree(stop: bool, device: torch.device) -> bool:
    """Rank 0's decision, on every worker."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return stop
    flag = torch.tensor([1 if stop else 0], device=device)
    torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())


def train(
    config: Mapping[str, Any],
    data: Mapping[str, Any],
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    prepare: Callable[[torch.nn.Module], torch.nn.Module] = lambda model: model,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train; returns (final metrics, payload: the best state dict and the history)."""
    from jobs.trainer import EarlyStopping, unwrap

    tower = TextTower(config["spec"], config.get("dropout")).to(device)
    columns = ["anchor", "positive"] + (["negative"] if data["train"].get("negative") else [])
    n_local = len(data["train"]["anchor"]) // world
    train_ids = {c: tower.tokenize(data["train"][c][rank::world][:n_local]) for c in columns}
    val_ids = {c: tower.tokenize(data["val"][c]) for c in ("anchor", "positive")} if rank == 0 else {}
    amp, scaler = amp_for(device, config.get("precision", "auto"))
    model = prepare(tower)
    optimizer = torch.optim.AdamW(_param_groups(unwrap(model), config["weight_decay"]), lr=config["lr"])
    batch = min(config["batch_size"], n_local)
    mini_batch = config.get("mini_batch_size") or MINI_BATCH[device.type == "cuda"]
    steps = n_local // batch  # the last partial batch is dropped: a tiny batch is a weak contrast
    total = steps * config["epochs"]
    scheduler = _warmup_then_linear(optimizer, total, math.ceil(config["warmup_ratio"] * total))
    generator = torch.Generator().manual_seed(config["seed"] + rank)
    stopper = EarlyStopping(config["patience"])
    history: list[dict[str, Any]] = []

    def validate(epoch: int, loss: float | None, seconds: float) -> bool:
        if rank != 0:
            return _agree(False, device)
        # In fp32, as the pipeline embeds by default: base and tuned figures are the vectors users get.
        vectors = [embed_all(unwrap(model), val_ids[c]) for c in ("anchor", "positive")]
        scores = retrieval_metrics(*vectors).as_dict()
        history.append({"epoch": epoch, "train_loss": loss, **scores, "seconds": round(seconds, 2)})
        base = history[0]
        log.info(
            "finetune %s: val recall@1 %.4f (base %.4f), recall@10 %.4f, MRR %.4f%s, %.0f s",
            "base model" if epoch == 0 else f"epoch {epoch}/{config['epochs']}",
            scores["recall@1"],
            base["recall@1"],
            scores["recall@10"],
            scores["mrr"],
            "" if loss is None else f", train loss {loss:.4f}",
            seconds,
        )
        return _agree(stopper.step(scores["mrr"], epoch, model), device)

    validate(0, None, 0.0)
    for epoch in range(1, config["epochs"] + 1):
        started = last_line = time.perf_counter()
        model.train()
        order = torch.randperm(n_local, generator=generator)
        total_loss = 0.0
        for step in range(steps):
            rows = order[step * batch : (step + 1) * batch].tolist()
            optimizer.zero_grad(set_to_none=True)
            loss = cached_mnrl_step(model, [[train_ids[c][r] for r in rows] for c in columns], mini_batch, amp, scaler)
            if scaler is not None:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            total_loss += loss
            if rank == 0 and time.perf_counter() - last_line >= config.get("progress_seconds", 30):
                last_line = time.perf_counter()
                log.info("finetune epoch %d: step %d/%d, loss %.4f", epoch, step + 1, steps, total_loss / (step + 1))
        if validate(epoch, total_loss / max(steps, 1), time.perf_counter() - started):
            break
    best = {"best_epoch": stopper.best_epoch, "epochs_run": len(history) - 1, "best_mrr": stopper.best}
    return best, {"state": stopper.best_state, "history": history, **best}
