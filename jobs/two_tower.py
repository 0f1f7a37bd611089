"""The two-tower recommender: learned user and item id tables, with the items' content vectors
as pretrained knowledge, trained with a full softmax over the catalog.

Item tower modes (``--item-tower``):
- ``concat`` (default): an item is ``mix([id_embedding ; project(content)])``. Items with little
  history still sit where their content puts them.
- ``init``: the item id table starts as the content vectors' top principal directions (a
  pretrained initialization), then trains like any id table.
- ``ids``: ids only, no content (collaborative filtering, for comparison).

Both towers end L2-normalized; a score is the cosine over a temperature. The softmax over all
items is exact for catalogs up to ~1e5 items (a (batch, items) score matrix per step).
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from jobs.ranking import UserItems, evaluate_scores

ITEM_TOWERS = ("concat", "init", "ids")
log = logging.getLogger(__name__)


class TwoTower(nn.Module):
    def __init__(
        self,
        n_users: int,
        n_items: int,
        dim: int,
        mode: str,
        dropout: float,
        content: torch.Tensor | None,
        temperature: float = 0.1,
    ) -> None:
        super().__init__()
        if mode not in ITEM_TOWERS:
            raise ValueError(f"item tower {mode!r} is not valid; valid modes: {', '.join(ITEM_TOWERS)}")
        if mode != "ids" and content is None:
            raise ValueError(f"item tower {mode!r} needs content vectors")
        self.mode, self.temperature = mode, temperature
        self.users = nn.Embedding(n_users, dim)
        self.items = nn.Embedding(n_items, dim)
        nn.init.normal_(self.users.weight, std=0.1)
        nn.init.normal_(self.items.weight, std=0.1)
        self.dropout = nn.Dropout(dropout)
        if mode == "concat":
            self.register_buffer("content", content.float(), persistent=False)  # (n_items, D), fixed
            self.project = nn.Linear(content.shape[1], dim)
            self.mix = nn.Linear(2 * dim, dim)
        elif mode == "init":
            with torch.no_grad():
                self.items.weight.copy_(principal_init(content.float(), dim, std=0.1))

    def user_vectors(self, users: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.dropout(self.users(users)), dim=-1)  # (b, dim)

    def item_vectors(self) -> torch.Tensor:
        ids = self.dropout(self.items.weight)  # (n_items, dim)
        if self.mode == "concat":
            ids = self.mix(
                torch.cat([ids, self.dropout(self.project(self.content))], dim=1)
            )  # (n_items, 2*dim) -> (n_items, dim)
        return F.normalize(ids, dim=-1)

    def forward(self, users: torch.Tensor) -> torch.Tensor:
        """(b,) user rows -> (b, n_items) logits."""
        return self.user_vectors(users) @ self.item_vectors().T / self.temperature


def principal_init(content: torch.Tensor, dim: int, std: float) -> torch.Tensor:
    """(n, D) -> (n, dim): coordinates on the top ``dim`` principal directions, scaled to ``std``."""
    centered = content - content.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centered, full_matrices=False)  # v: (min(n, D), D)
    coords = centered @ v[:dim].T  # (n, dim); fewer when n or D < dim
    if coords.shape[1] < dim:
        coords = torch.cat([coords, torch.randn(len(coords), dim - coords.shape[1]) * coords.std()], dim=1)
    return coords / coords.std().clamp_min(1e-12) * std


def build_model(spec: Mapping[str, Any], content: np.ndarray | None) -> TwoTower:
    return TwoTower(
        spec["n_users"],
        spec["n_items"],
        spec["dim"],
        spec["mode"],
        spec["dropout"],
        None if content is None else torch.tensor(content, dtype=torch.float32),
    )


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: minibatches of (user, item) positives, validation recall@k each epoch,
    early stopping; the best weights are the checkpoint."""
    import ray
    import ray.train
    import ray.train.torch

    from jobs.trainer import EarlyStopping, report_final, train_epoch, unwrap, worker_setup

    device = worker_setup(config, config["seed"])
    data = ray.get(config["data"][0])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    users = torch.from_numpy(data["train_users"][rank::world])
    items = torch.from_numpy(data["train_items"][rank::world])
    seen, held = UserItems(*data["train_seen"]), UserItems(*data["val_held"])
    val_users = held.users_with_items()
    model = ray.train.torch.prepare_model(build_model(config["model"], data.get("content")))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    stopper = EarlyStopping(config["patience"])
    history: list[dict[str, float]] = []
    k = config["k"]
    generator = torch.Generator().manual_seed(config["seed"] + rank)

    def step_loss(batch: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(users[batch].to(device)), items[batch].to(device))  # logits (b, n_items)

    for epoch in range(config["epochs"]):
        started = time.perf_counter()
        loss = train_epoch(model, optimizer, len(users), config, generator, step_loss)
        model.eval()
        net = unwrap(model)
        with torch.no_grad():
            item_vectors = net.item_vectors()
            scores = functools.partial(_scores, net, item_vectors, device)  # users -> (n, n_items) scores
            recall, ndcg = evaluate_scores(scores, val_users, seen, held, k)
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": loss,
                f"val_recall@{k}": recall,
                f"val_ndcg@{k}": ndcg,
                "seconds": time.perf_counter() - started,
            }
        )
        if rank == 0:
            log.info(
                "two-tower epoch %d/%d: loss %.4f, val recall@%d %.4f, ndcg@%d %.4f",
                epoch + 1,
                config["epochs"],
                history[-1]["train_loss"],
                k,
                recall,
                k,
                ndcg,
            )
        if stopper.step(recall, epoch + 1, model):
            break
    report_final(
        {f"val_recall@{k}": stopper.best, "best_epoch": stopper.best_epoch, "epochs_run": len(history)},
        {"state": stopper.best_state, "history": history},
    )


def _scores(net: Any, item_vectors: torch.Tensor, device: Any, users: np.ndarray) -> torch.Tensor:
    return (net.user_vectors(torch.from_numpy(users).to(device)) @ item_vectors.T).cpu()
