"""Ray Train plumbing shared by the recommender and the fraud classifier.

- ``fit`` runs a ``TorchTrainer`` (one worker by default, 1 CPU each: never every CPU) and
  returns the payload the workers saved: the best model's state dict, its history, metrics.
- In the worker, ``report_final`` saves that payload as the run's one checkpoint. Progress is
  one log line per epoch (Ray forwards it to the driver), not ``ray.train.report``: each
  report waits for the controller's next poll (2 s by default), longer than a small epoch.
- ``EarlyStopping`` keeps the best weights by a validation metric and stops after
  ``patience`` epochs without improvement.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from jobs.entrypoint import JobError, add_common_flags, add_ray_flags

PAYLOAD = "model.pt"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    workers: int = 1
    use_gpu: str = "auto"  # auto | yes | no
    cpus_per_worker: float = 1.0
    threads: int | None = None  # torch threads per worker (default: Ray's, one per reserved CPU)
    storage_path: str | None = None  # checkpoints; shared storage (s3://, NFS) on a multi-node cluster

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainSettings":
        if args.workers < 1:
            raise JobError(f"--workers: must be >= 1, got {args.workers}")
        return cls(args.workers, args.use_gpu, args.cpus_per_worker, args.threads, args.storage_path)


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Ray Train")
    group.add_argument("--workers", type=int, default=1, help="training workers (default 1)")
    group.add_argument(
        "--use-gpu",
        choices=("auto", "yes", "no"),
        default="auto",
        help="a GPU per worker: auto (default) when the cluster has GPUs",
    )
    group.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per worker (default 1)")
    group.add_argument("--threads", type=int, help="torch threads per worker (default: one per reserved CPU)")
    group.add_argument(
        "--storage-path",
        help="where Ray Train keeps checkpoints (default: Ray's, ~/ray_results); "
        "shared storage such as s3://... on a multi-node cluster",
    )


def add_fit_flags(
    parser: argparse.ArgumentParser, model: Any, *, lr: str, epochs: int, metric: str
) -> argparse.ArgumentParser:
    """The training-loop flags both trained jobs share (into their ``model`` group), then Ray
    Train's, Ray's and the common ones; returns the finished parser."""
    model.add_argument("--lr", type=float, default=float(lr), help=f"(default {lr})")
    model.add_argument("--batch-size", type=int, default=256, help="(default 256)")
    model.add_argument("--epochs", type=int, default=epochs, help=f"at most (default {epochs})")
    model.add_argument(
        "--patience",
        type=int,
        default=4,
        help=f"epochs without a better validation {metric} before stopping (default 4)",
    )
    model.add_argument("--seed", type=int, default=0)
    add_train_flags(parser)
    add_ray_flags(parser)
    add_common_flags(parser)
    return parser


def _wants_gpu(setting: str) -> bool:
    import ray

    if setting == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return setting == "yes"


def fit(
    loop: Callable[[dict[str, Any]], None], config: Mapping[str, Any], settings: TrainSettings, name: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``loop`` on the workers; returns (final metrics, the payload rank 0 saved)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = _wants_gpu(settings.use_gpu)
    resources = {"CPU": settings.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        loop,
        train_loop_config={**config, "threads": settings.threads},
        scaling_config=ScalingConfig(num_workers=settings.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=settings.storage_path and _absolute(settings.storage_path)),
    )
    log.info("training %s on %d worker(s), gpu=%s", name, settings.workers, use_gpu)
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"{name}: training finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        payload = torch.load(os.path.join(folder, PAYLOAD), map_location="cpu", weights_only=True)
    return dict(result.metrics or {}), payload


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def worker_setup(config: Mapping[str, Any], seed: int) -> torch.device:
    """In the worker: threads, seed, device (the worker's GPU when it has one)."""
    import ray.train.torch

    # Epoch lines are INFO logs; a Ray worker's root logger has no handler of its own.
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    torch.manual_seed(seed)
    return ray.train.torch.get_device()


def report_final(metrics: Mapping[str, Any], payload: Mapping[str, Any]) -> None:
    """Every worker reports (a barrier); rank 0 attaches the checkpoint."""
    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(dict(metrics))
        return
    with tempfile.TemporaryDirectory() as folder:
        torch.save(dict(payload), os.path.join(folder, PAYLOAD))
        ray.train.report(dict(metrics), checkpoint=ray.train.Checkpoint.from_directory(folder))


def train_epoch(
    model: Any,
    optimizer: Any,
    n_rows: int,
    config: Mapping[str, Any],
    generator: Any,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
) -> float:
    """One epoch over a fresh shuffle of ``n_rows`` training rows, ``config["batch_size"]`` at a
    step; ``loss_of(rows)`` gives a step's mean loss. Returns the epoch's mean loss per row."""
    model.train()
    order = torch.randperm(n_rows, generator=generator)
    total = 0.0
    for start in range(0, n_rows, config["batch_size"]):
        rows = order[start : start + config["batch_size"]]
        loss = loss_of(rows)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += float(loss) * len(rows)
    return total / max(n_rows, 1)


class EarlyStopping:
    """Keeps the best state dict by a metric to maximize; ``step`` says when to stop."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best = float("-inf")
        self.best_epoch = -1
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_epochs = 0

    def step(self, score: float, epoch: int, model: torch.nn.Module) -> bool:
        if score > self.best:
            self.best, self.best_epoch, self.bad_epochs = score, epoch, 0
            self.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()})
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model  # DDP wraps it
