"""The trainable text tower of ``jobs.finetune``: the pipeline's own hf-text encoder for a model
folder (tokenizer, transformer, pooling, the folder's modules after Pooling, normalization), as
a ``torch.nn.Module`` with gradients; the multiple-negatives ranking loss over in-batch
negatives, computed in cached mini-batches so the batch is not capped by memory; and the
retrieval metrics of a validation split.

- ``TowerSpec`` is what the driver resolves once through the pipeline's planner
  (``pipeline.plan.plan_encoder``): the same options the pipeline would embed with.
- ``cached_mnrl_step`` is GradCache (Gao et al., 2021), as sentence-transformers'
  ``CachedMultipleNegativesRankingLoss``: embed every text without a graph, take the loss and
  its gradient with respect to the embeddings, then re-embed mini-batch by mini-batch with a
  graph, replaying each mini-batch's random state so dropout is the same, and back-propagate
  the cached gradient. The gradient is the full batch's; memory is one mini-batch's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from encoders.core.batching import pad_sequences
from encoders.core.pooling import pool_tokens
from encoders.text.st_head import load_head, run_head
from encoders.text.tokenize import load_tokenizer, read_folder_settings, tokenize_texts

SCALE = 20.0  # cosine similarity x 20: sentence-transformers' MultipleNegativesRankingLoss default
DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout")


@dataclass(frozen=True)
class TowerSpec:
    """A model folder and the options the pipeline embeds it with (picklable)."""

    path: str  # the folder (a sentence-transformers root, or a plain Hugging Face folder)
    options: Mapping[str, Any]  # the hf-text spec's options: pooling, normalize, max_length, prefix, ...
    weights_sha256: str


class TextTower(torch.nn.Module):
    def __init__(self, spec: TowerSpec, dropout: float | None = None) -> None:
        from transformers import AutoConfig, AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a loading bar per worker and per save only clutters the log
        super().__init__()
        folder = read_folder_settings(spec.path)
        trust = bool(spec.options.get("trust_remote_code", False))
        self.spec = spec
        self.tokenizer = load_tokenizer(folder.model_dir, trust)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.pass_token_types = "token_type_ids" in self.tokenizer.model_input_names
        config = AutoConfig.from_pretrained(folder.model_dir, trust_remote_code=trust)
        if dropout is not None:
            for name in DROPOUT_FIELDS:
                if isinstance(getattr(config, name, None), float):
                    setattr(config, name, dropout)
        self.model = AutoModel.from_pretrained(
            folder.model_dir, config=config, trust_remote_code=trust, dtype=torch.float32
        )
        # The pooler (BERT's [CLS] dense + tanh) is not part of the embedding: frozen, it is saved
        # unchanged, and DDP does not wait for gradients it never gets.
        pooler = getattr(self.model, "pooler", None)
        if isinstance(pooler, torch.nn.Module):
            pooler.requires_grad_(False)
        self.head = load_head(folder.head, folder.root, trust) if folder.head else None
        self.head_paths = [path for _, path in folder.head]

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids as the pipeline's prepare makes them (prompt, lowercasing, truncation)."""
        options = {**self.spec.options, "long_text": "truncate"}
        prepared = tokenize_texts(self.tokenizer, list(texts), options)
        bad = [e for e in prepared.errors if e]
        if bad:
            raise ValueError(f"a text cannot be embedded: {bad[0]}")
        return [row[0] for row in prepared.values.to_pylist()]

    def forward(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Token id lists -> (n, D) vectors, normalized when the folder normalizes."""
        device = next(self.model.parameters()).device
        ids, mask = pad_sequences([list(s) for s in sequences], self.pad_id)
        ids, mask = ids.to(device), mask.to(device)
        inputs = {"input_ids": ids, "attention_mask": mask}
        if self.pass_token_types:
            inputs["token_type_ids"] = torch.zeros_like(ids)
        hidden = self.model(**inputs).last_hidden_state
        pooled = pool_tokens(hidden, mask, mask.sum(1), self.spec.options["pooling"])
        if self.head is not None:
            pooled = run_head(self.head, pooled.float(), hidden.float(), mask)
        pooled = pooled.float()
        return F.normalize(pooled, dim=-1) if self.spec.options["normalize"] else pooled


def mnrl_loss(anchors: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Row i of ``anchors`` against every candidate: the positive is candidate i; the other
    positives of the batch (and any hard negatives after them) are its negatives."""
    scores = SCALE * F.normalize(anchors, dim=-1) @ F.normalize(candidates, dim=-1).T
    return F.cross_entropy(scores, torch.arange(len(anchors), device=scores.device))


class _RandomState:
    """The CPU (and CUDA) generator state before a mini-batch's first forward, replayed for the
    second one, so dropout masks match."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def replay(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def cached_mnrl_step(
    tower: torch.nn.Module,
    columns: Sequence[Sequence[Sequence[int]]],
    mini_batch: int,
    autocast: Any = None,
    scaler: Any = None,
) -> float:
    """One optimizer step's gradients (accumulated into ``tower``'s parameters) for a batch of
    anchors, positives and optional negatives (``columns``, each a list of token id lists);
    returns the loss. ``autocast`` is a context factory for mixed precision (None: fp32);
    ``scaler`` an fp16 ``GradScaler`` (the cached gradients are then scaled too).

    The batch's texts are embedded ``mini_batch`` at a time in length order, so a mini-batch of
    short anchors is not padded to the longest positive."""
    amp = autocast or contextlib.nullcontext
    scaled = scaler.scale if scaler is not None else (lambda loss: loss)
    texts = [seq for column in columns for seq in column]
    n = len(columns[0])
    if len(texts) <= mini_batch:  # it fits: one plain forward (one DDP forward) and backward
        with amp():
            embedded = tower(texts).float()
        loss = mnrl_loss(embedded[:n], embedded[n:])
        scaled(loss).backward()
        return float(loss.detach())
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    parts = [order[part] for part in _chunks(len(order), mini_batch)]
    states, outs = [], []
    with torch.no_grad():
        for rows in parts:
            states.append(_RandomState())
            with amp():
                outs.append(tower([texts[i] for i in rows]).float())
    reps = _in_input_order(outs, order).requires_grad_()
    loss = mnrl_loss(reps[:n], reps[n:])
    scaled(loss).backward()
    grads = reps.grad
    sync = getattr(tower, "no_sync", None)  # DDP: all-reduce once, on the last backward
    for i, (rows, state) in enumerate(zip(parts, states)):
        context = sync() if sync is not None and i < len(parts) - 1 else contextlib.nullcontext()
        with context:
            state.replay()
            with amp():
                again = tower([texts[j] for j in rows]).float()
            again.backward(grads[rows])
    return float(loss.detach())


@dataclass(frozen=True)
class Retrieval:
    recall_at_1: float
    recall_at_10: float
    mrr: float

    def as_dict(self) -> dict[str, float]:
        return {"recall@1": self.recall_at_1, "recall@10": self.recall_at_10, "mrr": self.mrr}


def retrieval_metrics(anchors: torch.Tensor, positives: torch.Tensor, block: int = 1024) -> Retrieval:
    """Anchor i's positive is positive i; every validation positive is a candidate. The rank is
    the number of candidates scored strictly higher than the right one (ties count for it)."""
    a = F.normalize(anchors.float(), dim=-1)
    p = F.normalize(positives.float(), dim=-1)
    ranks = []
    for rows in _chunks(len(a), block):
        scores = a[rows] @ p.T
        right = scores[torch.arange(rows.stop - rows.start), torch.arange(rows.start, rows.stop)]
        ranks.append((scores > right[:, None]).sum(1))
    rank = torch.cat(ranks).cpu().numpy().astype(np.float64)
    return Retrieval(float((rank < 1).mean()), float((rank < 10).mean()), float((1.0 / (rank + 1)).mean()))


def embed_all(
    tower: TextTower, sequences: Sequence[Sequence[int]], batch: int = 64, autocast: Any = None
) -> torch.Tensor:
    """Eval-mode vectors of many token id lists, longest first (less padding), in input order."""
    amp = autocast or contextlib.nullcontext
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    parts = []
    was_training = tower.training
    tower.eval()
    with torch.no_grad():
        for part in _chunks(len(order), batch):
            with amp():
                parts.append(tower([sequences[i] for i in order[part]]).float().cpu())
    tower.train(was_training)
    return _in_input_order(parts, order) if parts else torch.zeros((0, 0))


def _in_input_order(parts: Sequence[torch.Tensor], order: Sequence[int]) -> torch.Tensor:
    """Rows computed in ``order`` (batch after batch), put back where they came from."""
    done = torch.cat(list(parts))
    out = torch.empty_like(done)
    out[torch.tensor(order, device=done.device)] = done
    return out
