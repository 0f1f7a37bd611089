"""Build the downstream jobs' example data: real text, planted structure, fixed seeds.

    python examples/jobs/make_data.py
    # -> examples/jobs/data/{items.jsonl,interactions.parquet,transactions.parquet}

- ``items.jsonl`` (item_id, topic, text): real English, the first docstring paragraph of
  functions and classes of 12 areas of Python's standard library (e-mail, web, XML, asyncio,
  testing, ...). The topic is the area; the text never names it, so only an encoder that reads
  the text can recover it.
- ``interactions.parquet`` (user_id, item_id, rating, time): each user prefers one or two
  topics (planted) and takes most items from them, by a popularity skew inside each topic; the
  rest come from global popularity. A popularity ranking knows nothing of the preference.
- ``transactions.parquet`` (tx_id, merchant_id, item_id, device, country, channel, amount, hour,
  time, label): each purchase names the item bought (its text is the line on the receipt).
  Fraud odds are planted in the item's topic (two risky areas: fraudsters buy what resells), a
  few risky merchants, an emulator device, two risky countries, the amount and night hours.
  Nothing but the item's text tells its topic: without the content vectors a classifier sees
  the other fields only.

The committed files were made with Python 3.11's standard library; other versions have other
docstrings, so re-running elsewhere gives similar but not identical data.
"""

from __future__ import annotations

import argparse
import ast
import json
import sysconfig
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
TOPICS: dict[str, tuple[str, ...]] = {
    "email": ("email", "smtplib", "imaplib", "poplib", "mailbox"),
    "web": ("http", "urllib", "wsgiref", "html", "webbrowser", "cgi"),
    "xml": ("xml", "plistlib"),
    "asyncio": ("asyncio",),
    "testing": ("unittest", "doctest"),
    "concurrency": ("multiprocessing", "concurrent", "threading", "queue"),
    "gui": ("tkinter", "turtle", "idlelib"),
    "archives": ("zipfile", "tarfile", "gzip", "bz2", "lzma", "shutil", "zipimport"),
    "imports": ("importlib", "pkgutil", "modulefinder", "runpy"),
    "logging": ("logging",),
    "numbers": ("decimal", "_pydecimal", "fractions", "statistics", "random", "numbers"),
    "debugging": ("pdb", "bdb", "traceback", "inspect", "dis", "trace", "profile", "cProfile", "pstats"),
}
RISKY_TOPICS = ("archives", "debugging")
DEVICES = ("ios", "android", "web-chrome", "web-safari", "web-firefox", "pos-terminal", "emulator", "unknown")
DEVICE_P = (0.22, 0.26, 0.18, 0.08, 0.06, 0.13, 0.04, 0.03)
COUNTRIES = ("DE", "FR", "NL", "ES", "IT", "PL", "SE", "US", "XA", "XB")
COUNTRY_P = (0.24, 0.16, 0.10, 0.10, 0.10, 0.08, 0.06, 0.10, 0.03, 0.03)
RISKY_COUNTRIES = ("XA", "XB")


def _docstrings(path: Path) -> list[str]:
    """First paragraphs (8 to 80 words, no doctest) of the module's, classes' and functions' docstrings."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_text("utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                para = " ".join(doc.split("\n\n")[0].split())
                if 8 <= len(para.split()) <= 80 and ">>>" not in para and para.isascii():
                    found.append(para)
    return found


def topic_texts(per_topic: int, seed: int) -> list[tuple[str, str]]:
    """(topic, text) pairs, ``per_topic`` each, no text in two topics."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    pairs: list[tuple[str, str]] = []
    for topic, modules in TOPICS.items():
        texts: list[str] = []
        for module in modules:
            root = stdlib / module
            files = sorted(root.rglob("*.py")) if root.is_dir() else [stdlib / f"{module}.py"]
            for file in files:
                if not {"test", "tests", "idle_test"} & set(file.parts) and file.exists():
                    texts += _docstrings(file)
        texts = sorted(set(texts) - seen)
        if len(texts) < per_topic:
            raise RuntimeError(f"topic {topic!r}: only {len(texts)} docstrings in this Python's stdlib")
        picked = [texts[i] for i in sorted(rng.choice(len(texts), per_topic, replace=False))]
        seen.update(picked)
        pairs += [(topic, t) for t in picked]
    return pairs


def make_items(per_topic: int, seed: int) -> pa.Table:
    pairs = topic_texts(per_topic, seed)
    order = np.random.default_rng(seed + 1).permutation(len(pairs))  # ids say nothing of the topic
    return pa.table(
        {
            "item_id": [f"item-{i:04d}" for i in range(len(pairs))],
            "topic": [pairs[j][0] for j in order],
            "text": [pairs[j][1] for j in order],
        }
    )


def make_interactions(items: pa.Table, users: int, seed: int, preferred_share: float = 0.85) -> pa.Table:
    rng = np.random.default_rng(seed)
    ids = np.array(items.column("item_id").to_pylist())
    topics = np.array(items.column("topic").to_pylist())
    names = sorted(set(topics))
    by_topic = {t: rng.permutation(np.flatnonzero(topics == t)) for t in names}  # popularity order within a topic
    inside = {t: _zipf(len(rows), 0.8) for t, rows in by_topic.items()}
    global_order = rng.permutation(len(ids))
    global_p = _zipf(len(ids), 1.0)
    rows: list[tuple[str, str, int, int]] = []
    clock = 0
    for u in range(users):
        liked = rng.choice(names, size=1 if rng.random() < 0.6 else 2, replace=False)
        count = 8 + rng.poisson(12)
        taken: set[int] = set()
        while len(taken) < count:
            if rng.random() < preferred_share:
                topic = liked[rng.integers(len(liked))]
                item, rating = (
                    by_topic[topic][rng.choice(len(by_topic[topic]), p=inside[topic])],
                    int(rng.choice([4, 5])),
                )
            else:
                item, rating = global_order[rng.choice(len(ids), p=global_p)], int(rng.integers(1, 6))
            if item in taken:
                continue
            taken.add(item)
            clock += int(rng.integers(1, 600))
            rows.append((f"user-{u:04d}", str(ids[item]), rating, clock))
    users_, items_, ratings, times = zip(*rows)
    return pa.table(
        {
            "user_id": list(users_),
            "item_id": list(items_),
            "rating": pa.array(ratings, pa.int8()),
            "time": pa.array(times, pa.int64()),
        }
    )


def make_transactions(items: pa.Table, count: int, seed: int, merchants: int = 150) -> pa.Table:
    rng = np.random.default_rng(seed)
    ids = np.array(items.column("item_id").to_pylist())
    risky_item = np.isin(np.array(items.column("topic").to_pylist()), RISKY_TOPICS)
    item = rng.permutation(len(ids))[rng.choice(len(ids), size=count, p=_zipf(len(ids), 0.6))]
    risky_merchant = rng.random(merchants) < 0.05
    merchant = rng.choice(merchants, size=count, p=_zipf(merchants, 0.8))
    device = rng.choice(len(DEVICES), size=count, p=DEVICE_P)
    country = rng.choice(len(COUNTRIES), size=count, p=COUNTRY_P)
    channel = np.where(np.array(DEVICES)[device] == "pos-terminal", "in_store", "online")
    amount = np.round(np.exp(rng.normal(3.5, 1.0, size=count)), 2)
    hour = rng.integers(0, 24, size=count)
    logit = (
        -5.0
        + 3.0 * risky_item[item]
        + 1.5 * risky_merchant[merchant]
        + 1.8 * (np.array(DEVICES)[device] == "emulator")
        + 1.3 * np.isin(np.array(COUNTRIES)[country], RISKY_COUNTRIES)
        + 0.6 * (np.log(amount) - 3.5)
        + 0.9 * (hour < 5)
    )
    label = (rng.random(count) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    return pa.table(
        {
            "tx_id": [f"tx-{i:05d}" for i in range(count)],
            "merchant_id": [f"merchant-{m:03d}" for m in merchant],
            "item_id": ids[item].tolist(),
            "device": np.array(DEVICES)[device].tolist(),
            "country": np.array(COUNTRIES)[country].tolist(),
            "channel": channel.tolist(),
            "amount": amount,
            "hour": pa.array(hour, pa.int8()),
            "time": np.arange(count, dtype=np.int64),
            "label": pa.array(label, pa.int8()),
        }
    )


def _zipf(n: int, exponent: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    return weights / weights.sum()


def write_all(
    folder: Path, per_topic: int = 80, users: int = 800, transactions: int = 20_000, seed: int = 0
) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    items = make_items(per_topic, seed)
    paths = {
        "items": folder / "items.jsonl",
        "interactions": folder / "interactions.parquet",
        "transactions": folder / "transactions.parquet",
    }
    with open(paths["items"], "w") as handle:
        for row in items.to_pylist():
            handle.write(json.dumps(row) + "\n")
    pq.write_table(make_interactions(items, users, seed + 2), paths["interactions"])
    pq.write_table(make_transactions(items, transactions, seed + 3), paths["transactions"])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(HERE / "data"), help="folder (default examples/jobs/data)")
    parser.add_argument("--per-topic", type=int, default=80, help="items per topic (default 80, 12 topics)")
    parser.add_argument("--users", type=int, default=800)
    parser.add_argument("--transactions", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name, path in write_all(Path(args.out), args.per_topic, args.users, args.transactions, args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
