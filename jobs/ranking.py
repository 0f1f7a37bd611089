"""Top-k ranking and its metrics, shared by the recommender, its baselines and validation.

A user's candidates are all items but the ones already seen (``exclude``, as CSR arrays).
recall@k = hits / |held-out items|; NDCG@k with binary relevance, normalized by the ideal
ranking of min(k, |held-out|) hits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class UserItems:
    """Items per user as CSR: user u's items are ``items[indptr[u]:indptr[u + 1]]``."""

    indptr: np.ndarray  # (users + 1,) int64
    items: np.ndarray  # (nnz,) int64

    @classmethod
    def from_pairs(cls, users: np.ndarray, items: np.ndarray, n_users: int) -> "UserItems":
        order = np.lexsort((items, users))
        counts = np.bincount(users, minlength=n_users)
        return cls(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), items[order].astype(np.int64))

    def of(self, user: int) -> np.ndarray:
        return self.items[self.indptr[user] : self.indptr[user + 1]]

    def users_with_items(self) -> np.ndarray:
        return np.flatnonzero(np.diff(self.indptr) > 0)

    def merged(self, other: "UserItems") -> "UserItems":
        n = len(self.indptr) - 1
        users = np.concatenate(
            [np.repeat(np.arange(n), np.diff(self.indptr)), np.repeat(np.arange(n), np.diff(other.indptr))]
        )
        return UserItems.from_pairs(users, np.concatenate([self.items, other.items]), n)


def top_k(scores: torch.Tensor, users: np.ndarray, exclude: UserItems, k: int) -> tuple[np.ndarray, np.ndarray]:
    """scores (u, n_items) for ``users`` -> (items (u, k), scores (u, k)), seen items left out."""
    scores = scores.clone()
    for row, user in enumerate(users):
        seen = exclude.of(int(user))
        if len(seen):
            scores[row, torch.from_numpy(seen)] = -torch.inf
    top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    return top.indices.cpu().numpy(), top.values.cpu().numpy()


def recall_ndcg(ranked: np.ndarray, users: np.ndarray, held_out: UserItems, k: int) -> tuple[float, float]:
    """Mean recall@k and NDCG@k over ``users`` (each with >= 1 held-out item); ranked (u, >=k)."""
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    recalls, ndcgs = [], []
    for row, user in enumerate(users):
        relevant = set(held_out.of(int(user)).tolist())
        hits = np.array([item in relevant for item in ranked[row, :k].tolist()], dtype=float)
        recalls.append(hits.sum() / len(relevant))
        ideal = discounts[: min(k, len(relevant))].sum()
        ndcgs.append(float((hits * discounts[: len(hits)]).sum() / ideal))
    return float(np.mean(recalls)), float(np.mean(ndcgs))


def evaluate_scores(
    score_fn, users: np.ndarray, exclude: UserItems, held_out: UserItems, k: int, batch: int = 1024
) -> tuple[float, float]:
    """``score_fn(users) -> (u, n_items)`` tensor, ranked and scored in batches of users."""
    ranked = []
    for start in range(0, len(users), batch):
        chunk = users[start : start + batch]
        ranked.append(top_k(score_fn(chunk), chunk, exclude, k)[0])
    if not ranked:
        return float("nan"), float("nan")
    return recall_ndcg(np.concatenate(ranked), users, held_out, k)


def popularity_scorer(seen: UserItems, n_items: int):
    """The baseline every recommender must beat: the same most-interacted items for everyone."""
    counts = torch.from_numpy(np.bincount(seen.items, minlength=n_items).astype(np.float32))
    return lambda users: counts.expand(len(users), n_items)


def content_scorer(seen: UserItems, content: np.ndarray):
    """Content only: a user is the mean of their items' unit vectors; items score by cosine."""
    unit = torch.from_numpy(content / np.maximum(np.linalg.norm(content, axis=1, keepdims=True), 1e-12)).float()

    def score(users: np.ndarray) -> torch.Tensor:
        profiles = torch.stack(
            [
                unit[torch.from_numpy(seen.of(int(u)))].mean(0) if len(seen.of(int(u))) else torch.zeros(unit.shape[1])
                for u in users
            ]
        )  # (u, D)
        return profiles @ unit.T  # (u, n_items)

    return score
