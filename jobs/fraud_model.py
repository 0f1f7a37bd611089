"""The fraud classifier: a learned ``nn.Embedding`` per categorical field, standardized numeric
fields and (optionally) the content vectors, through a small MLP with dropout; L2 through the
optimizer's weight decay; validation PR-AUC each epoch with early stopping.

One Ray Train run trains every requested variant (with and without content vectors), one
after the other on the same shards: the comparison then costs one worker-group start, not two.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)


def embedding_size(cardinality: int) -> int:
    """fast.ai's rule of thumb, capped: enough room for rare fields, no waste on big ones."""
    return int(min(16, max(2, round(1.6 * cardinality**0.56))))


class FraudNet(nn.Module):
    def __init__(
        self,
        cardinalities: list[int],
        numeric: int,
        content_dim: int,
        hidden: int = 64,
        dropout: float = 0.2,
        content_size: int = 32,
    ) -> None:
        super().__init__()
        # Row 0 of each table is "unknown": values first seen after training.
        self.fields = nn.ModuleList(nn.Embedding(c + 1, embedding_size(c + 1)) for c in cardinalities)
        self.content = nn.Sequential(nn.Linear(content_dim, content_size), nn.ReLU()) if content_dim else None
        width = sum(e.embedding_dim for e in self.fields) + numeric + (content_size + 1 if content_dim else 0)
        self.dropout = nn.Dropout(dropout)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden // 2),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden // 2, 1),
        )

    def forward(
        self,
        categorical: torch.Tensor,
        numeric: torch.Tensor,
        content: torch.Tensor | None = None,
        has_content: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """categorical (b, F) long, numeric (b, N), content (b, D), has_content (b,) -> (b,) logits."""
        parts = [self.dropout(table(categorical[:, i])) for i, table in enumerate(self.fields)] + [numeric]
        if self.content is not None:
            parts += [self.dropout(self.content(content)), has_content[:, None]]
        return self.mlp(torch.cat(parts, dim=1)).squeeze(1)


def build_model(spec: Mapping[str, Any], with_content: bool) -> FraudNet:
    return FraudNet(
        spec["cardinalities"],
        spec["numeric"],
        spec["content_dim"] if with_content else 0,
        spec["hidden"],
        spec["dropout"],
    )


def predict(
    model: FraudNet, arrays: Mapping[str, np.ndarray], with_content: bool, device: Any = "cpu", batch: int = 8192
) -> np.ndarray:
    """Fraud probabilities (n,) for the rows in ``arrays``."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(arrays["label"]), batch):
            rows = slice(start, start + batch)
            inputs = _inputs(arrays, rows, with_content, device)
            out.append(torch.sigmoid(model(*inputs)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _inputs(arrays: Mapping[str, np.ndarray], rows: Any, with_content: bool, device: Any) -> list[torch.Tensor | None]:
    inputs = [
        torch.as_tensor(arrays["categorical"][rows], device=device),
        torch.as_tensor(arrays["numeric"][rows], device=device),
    ]
    if with_content:
        inputs += [
            torch.as_tensor(arrays["content"][rows], device=device),
            torch.as_tensor(arrays["has_content"][rows], device=device),
        ]
    return inputs


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: each variant in turn, best weights by validation PR-AUC."""
    import ray
    import ray.train
    import ray.train.torch
    from sklearn.metrics import average_precision_score

    from jobs.trainer import EarlyStopping, report_final, train_epoch, unwrap, worker_setup

    device = worker_setup(config, config["seed"])
    data = ray.get(config["data"][0])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    train = {k: v[rank::world] for k, v in data["train"].items()}
    val = data["val"]
    labels = torch.as_tensor(train["label"], dtype=torch.float32)
    positives = float(labels.sum())
    # Fraud is rare: weigh positives up to balance the loss (ranking metrics do not change with it).
    pos_weight = torch.tensor(
        min(config["max_pos_weight"], (len(labels) - positives) / max(positives, 1.0)), device=device
    )
    states, histories, best = {}, {}, {}
    for variant, with_content in config["variants"].items():
        torch.manual_seed(config["seed"])
        model = ray.train.torch.prepare_model(build_model(config["model"], with_content))
        optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"], weight_decay=config["l2"])  # weight_decay: L2
        stopper = EarlyStopping(config["patience"])
        history = []
        generator = torch.Generator().manual_seed(config["seed"] + rank)

        def step_loss(rows: np.ndarray, model: Any = model, with_content: bool = with_content) -> torch.Tensor:
            logits = model(*_inputs(train, rows, with_content, device))
            return F.binary_cross_entropy_with_logits(logits, labels[rows].to(device), pos_weight=pos_weight)

        for epoch in range(config["epochs"]):
            started = time.perf_counter()
            loss = train_epoch(model, optimizer, len(labels), config, generator, lambda rows: step_loss(rows.numpy()))
            val_ap = float(average_precision_score(val["label"], predict(unwrap(model), val, with_content, device)))
            history.append(
                {"epoch": epoch + 1, "train_loss": loss, "val_pr_auc": val_ap, "seconds": time.perf_counter() - started}
            )
            if rank == 0:
                log.info(
                    "fraud %s epoch %d/%d: loss %.4f, val PR-AUC %.4f",
                    variant,
                    epoch + 1,
                    config["epochs"],
                    history[-1]["train_loss"],
                    val_ap,
                )
            if stopper.step(val_ap, epoch + 1, model):
                break
        states[variant], histories[variant], best[variant] = stopper.best_state, history, stopper.best
    report_final(
        {f"val_pr_auc/{name}": value for name, value in best.items()}, {"states": states, "history": histories}
    )
