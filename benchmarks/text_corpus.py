"""Build realistic English text corpora offline, from what is already on the machine.

Sources: package documentation under /usr/share/doc (READMEs, copyright/licence texts, NEWS,
Debian and upstream changelogs, .txt/.md/.rst) and the docstrings of the Python standard
library. Synthetic text ("lorem ipsum", repeated strings) would make the benchmark lie:
throughput of a transformer depends on the token-length mix, so we want the lengths real
corpora have: many one-sentence texts, many paragraphs, and some long chunks that exceed
the model's 256-token window and get truncated.

Two corpora from the same sources:
  mixed  the length mix above: sentences, paragraphs and chunks past the window.
  short  single sentences of 4-12 words (median ~16 tokens): queries, titles, log lines,
         the many-rows workload where per-row overhead, not the model, decides throughput.

    python benchmarks/text_corpus.py corpus.parquet --rows 10000 --seed 0 [--kind short] [--stats MODEL]
"""

from __future__ import annotations

import argparse
import ast
import functools
import gzip
import hashlib
import random
import re
import sysconfig
import time
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

DOC_ROOT = Path("/usr/share/doc")
# Names of the files under DOC_ROOT worth reading; html, C sources and examples are skipped.
DOC_NAME = re.compile(r"^(README.*|NEWS.*|copyright|changelog.*|.*\.(txt|md|rst)(\.gz)?)$", re.I)
MAX_FILE_BYTES = 256 * 1024  # some upstream changelogs are megabytes; the head is plenty

# Length classes, in words (~1.3 BERT tokens per English word). "long" sits past the
# 256-token window, so those rows exercise truncation the way real document chunks do.
SHORT_MAX, MEDIUM_MAX = 30, 200
LONG_MIN_WORDS, LONG_MAX_WORDS = 260, 900
MIX = {"short": 0.45, "medium": 0.40, "long": 0.15}
# The short corpus: one sentence each, 4-12 words (_clean already drops anything under 4).
SENTENCE_MAX_WORDS = 12
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")
CORPUS_KINDS = ("mixed", "short")

BULLET = re.compile(r"^\s*(?:[*+o-]|\d+[.)])\s+")
WORDISH = re.compile(r"^[(\"']?[A-Za-z][a-z'-]*[.,;:!?)\"']*$")
NOISE_LINE = re.compile(
    r"^\s*(?:--\s.*<.*@.*>|\S+ \([^)]*\) [\w-]+; urgency=|Files:|Copyright:|License:|Comment:"
    r"|Upstream-\w+:|Source:|Format:|[-=*#~_]{3,}\s*$)"
)


def _clean(text: str) -> str | None:
    """Collapse whitespace; return None unless this reads as English prose."""
    text = " ".join(BULLET.sub("", text, count=1).split())
    words = text.split()
    if len(words) < 4 or not text.isascii():
        return None
    # Mostly plain words: rejects code, paths, tables, e-mail lists, version/date lines.
    if sum(bool(WORDISH.match(w)) for w in words) < 0.7 * len(words):
        return None
    return text


def _paragraphs(raw: str) -> list[str]:
    """Split a plain-text file into paragraphs; list items (changelog bullets) stand alone."""
    out: list[str] = []
    for block in re.split(r"\n\s*(?:\.\s*)?\n", raw):  # DEP-5 copyright uses " ." as blank
        lines = [ln for ln in block.splitlines() if not NOISE_LINE.match(ln)]
        items: list[list[str]] = []
        for ln in lines:
            if BULLET.match(ln) or not items:
                items.append([ln])
            else:
                items[-1].append(ln)
        out.extend(p for p in (_clean("\n".join(i)) for i in items) if p)
    return out


def _read_doc(path: Path) -> str | None:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                data = fh.read(MAX_FILE_BYTES)
        else:
            with open(path, "rb") as fh:
                data = fh.read(MAX_FILE_BYTES)
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None  # binary or broken: skip


def _doc_documents() -> list[tuple[str, list[str]]]:
    docs = []
    if not DOC_ROOT.is_dir():
        return docs
    for path in sorted(DOC_ROOT.rglob("*")):  # sorted: determinism across runs
        if path.is_file() and not path.is_symlink() and DOC_NAME.match(path.name):
            raw = _read_doc(path)
            if raw and "\x00" not in raw:
                docs.append(("doc", _paragraphs(raw)))
    return docs


def _py_documents() -> list[tuple[str, list[str]]]:
    """Docstrings of the standard library: one document per module, in source order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(stdlib.rglob("*.py")):
        # Test suites are a third of the stdlib's bytes but few docstrings: skip for speed.
        if {"site-packages", "test", "tests", "idle_test"} & set(path.parts):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escape sequences in old modules
                tree = ast.parse(path.read_text("utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue  # lib2to3 test data and the like
        found = []
        for node in ast.walk(tree):  # breadth-first; re-sorted into source order below
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    found.append((getattr(node, "lineno", 0), doc))
        # Doctest examples are code, not prose.
        paras = [p for _, doc in sorted(found) for p in _paragraphs(doc) if ">>>" not in p]
        docs.append(("py", paras))
    return docs


@functools.lru_cache(maxsize=1)
def _documents() -> tuple[tuple[str, list[str]], ...]:
    """Every source document, read once per process (both corpora draw from them)."""
    return tuple(_doc_documents() + _py_documents())


def _pools(docs: tuple[tuple[str, list[str]], ...]) -> dict[str, dict[str, str]]:
    """Deduplicated texts per length class: {class: {text: source}} (dicts keep order)."""
    pools: dict[str, dict[str, str]] = {"short": {}, "medium": {}, "long": {}}
    seen: set[str] = set()

    def add(text: str, source: str) -> None:
        key = text.lower()
        if key in seen:
            return  # licence paragraphs recur in hundreds of copyright files
        seen.add(key)
        n = len(text.split())
        cls = "short" if n <= SHORT_MAX else "medium" if n <= MEDIUM_MAX else "long"
        pools[cls][text] = source

    for source, paras in docs:
        for p in paras:
            add(" ".join(p.split()[:LONG_MAX_WORDS]), source)
        # Long texts as a RAG chunker makes them: consecutive paragraphs of one document.
        chunk: list[str] = []
        for p in paras:
            chunk.append(p)
            words = sum(len(c.split()) for c in chunk)
            if words >= LONG_MIN_WORDS:
                if len(chunk) > 1:
                    add(" ".join(" ".join(chunk).split()[:LONG_MAX_WORDS]), source)
                chunk = []
    return pools


def _sentences(docs: tuple[tuple[str, list[str]], ...]) -> dict[str, str]:
    """Deduplicated single sentences of up to SENTENCE_MAX_WORDS words: {text: source}."""
    out: dict[str, str] = {}
    seen: set[str] = set()
    for source, paras in docs:
        for p in paras:
            for sentence in SENTENCE_END.split(p):
                text = _clean(sentence) if len(sentence.split()) <= SENTENCE_MAX_WORDS else None
                if text and text.lower() not in seen:
                    seen.add(text.lower())
                    out[text] = source
    return out


def _pick_mixed(rows: int, rng: random.Random) -> list[tuple[str, str]]:
    pools = _pools(_documents())
    total = sum(len(p) for p in pools.values())
    if total < rows:
        raise RuntimeError(f"only {total} unique texts found on this machine; asked for {rows}")
    want = {cls: round(rows * frac) for cls, frac in MIX.items()}
    want["medium"] += rows - sum(want.values())
    picked: list[tuple[str, str]] = []
    for cls in ("long", "medium", "short"):  # scarcest first; the deficit rolls over
        items = list(pools[cls].items())
        take = min(len(items), want[cls])
        picked += rng.sample(items, take)
        nxt = {"long": "medium", "medium": "short", "short": None}[cls]
        if nxt:
            want[nxt] += want[cls] - take
    if len(picked) < rows:  # short pool ran dry: top up from whatever is left
        taken = set(picked)
        rest = [kv for cls in pools for kv in pools[cls].items() if kv not in taken]
        picked += rng.sample(rest, rows - len(picked))
    return picked


def _pick_short(rows: int, rng: random.Random) -> list[tuple[str, str]]:
    items = list(_sentences(_documents()).items())
    if len(items) < rows:
        raise RuntimeError(f"only {len(items)} unique short sentences found on this machine; asked for {rows}")
    return rng.sample(items, rows)


def build_corpus(path: str, rows: int = 10_000, seed: int = 0, kind: str = "mixed") -> str:
    """Write `rows` unique texts (columns id, text) of corpus `kind` to the Parquet file `path`.

    The row order is shuffled, so any prefix has the same length mix as the whole file
    (the floors and the Ray baseline run on a prefix).
    """
    if kind not in CORPUS_KINDS:
        raise ValueError(f"corpus kind {kind!r} is not valid; valid values: {', '.join(CORPUS_KINDS)}")
    rng = random.Random(seed)
    picked = _pick_mixed(rows, rng) if kind == "mixed" else _pick_short(rows, rng)
    rng.shuffle(picked)
    ids = [f"{src}-{hashlib.sha1(t.encode()).hexdigest()[:16]}" for t, src in picked]
    assert len(set(ids)) == len(ids), "id collision"
    table = pa.table({"id": pa.array(ids, pa.string()), "text": pa.array([t for t, _ in picked], pa.string())})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def token_stats(texts: list[str], tokenizer, max_len: int = 256) -> dict[str, float]:
    """Token lengths (with [CLS]/[SEP], before truncation) of a list of texts."""
    import statistics

    tokenizer.model_max_length = 10**9  # silence "longer than the maximum" warnings
    lens = [len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]]
    return {
        "rows": len(lens),
        "mean": statistics.fmean(lens),
        "median": statistics.median(lens),
        "max": max(lens),
        f"over_{max_len}": sum(n > max_len for n in lens),
    }


def _main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path")
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kind", choices=CORPUS_KINDS, default="mixed")
    ap.add_argument("--stats", metavar="TOKENIZER", help="print token-length stats (model path)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    build_corpus(args.path, args.rows, args.seed, args.kind)
    print(f"wrote {args.rows} {args.kind} rows to {args.path} in {time.perf_counter() - t0:.1f}s")
    if args.stats:
        from transformers import AutoTokenizer

        texts = pq.read_table(args.path, columns=["text"]).column("text").to_pylist()
        print(token_stats(texts, AutoTokenizer.from_pretrained(args.stats)))


if __name__ == "__main__":
    _main()
