"""Build (anchor, positive) text pairs for contrastive fine-tuning from Python docstrings and package metadata.

    python examples/finetune/make_pairs.py
    # -> examples/data/docstring_pairs.jsonl  (all pairs, shuffled; the fine-tuning job holds out its own share)

Real, offline text, from three kinds of source, in this order:

1. standard library: each public function, class and method (name without a leading ``_``) of a
   fixed, sorted list of modules (``STDLIB``), read with ``inspect.getdoc``. Module docstrings are
   left out (too many are copyright notes, usage listings or code);
2. third-party: the same for a fixed, sorted list of modules of packages this project depends on
   (``THIRD_PARTY``: numpy, torch, torchvision, torchaudio, pyarrow, Pillow, PyYAML, soundfile,
   transformers, Ray Data). Their markup is made plain first (``docstrings.clean_markup``): numpydoc
   underlines, Examples / See Also / Notes / References sections, directive and literal blocks (math,
   code) and roles (``:func:`x``` -> ``x``) go; parameter sections stay as prose (``Parameters: a : int
   ...``). A docstring counts only when its prose before any parameter section alone gives a pair;
3. package metadata of the distributions installed in site-packages (``importlib.metadata``; not
   this project's own), sorted by name: ``Summary`` as the anchor, the prose the long description
   starts with (headings, badges, link URLs, tables and code dropped; ``docstrings.description_prose``)
   as the positive, ``pypi:<name>`` as the source.

Each docstring gives one candidate pair:

- ``anchor``: the first sentence of the first paragraph (whitespace collapsed), a summary;
- ``positive``: the rest of the docstring (whitespace collapsed), its elaboration, cut to its
  first 120 words. Signature lines that some builtins put at the top (``min(iterable) -> value``)
  and doctests are stripped first;
- ``source``: where it came from: a qualified name (``json.dumps``, ``numpy.linalg.svd``,
  ``torch.nn.Module.apply``) or ``pypi:<distribution>`` for metadata.

A pair is kept when the anchor has 4 to 40 words and does not read as code, the positive has at
least 12 words, and neither its anchor nor its positive repeats one already kept (compared
case-folded): no two pairs share an anchor, so in-batch negatives are never true positives.
Candidates are deduplicated in the order above (sorted module, member, method; then distributions),
then shuffled with ``random.Random(seed)`` and capped at ``--max-pairs``; ``--held-out N`` moves
the last N of them to ``--held-out-output`` (none by default).

Everything iterated is sorted, so two runs in one environment give byte-identical files. The text
depends on the Python version, on the versions of the packages read and, for metadata, on which
distributions are installed: the summary line names the versions. The committed file (2,826 pairs:
1,644 stdlib, 1,094 third-party, 88 metadata) was made in this project's venv with CPython 3.11.7,
numpy 2.4.6, torch 2.11.0, torchvision 0.26.0, torchaudio 2.11.0, pyarrow 26.0.1, Pillow 13.0.0,
PyYAML 6.0.4, soundfile 0.14.0, transformers 5.24.0 and ray 2.60.0; elsewhere the pairs are similar
but not identical. Modules that fail to import (``curses`` without its C extension) are skipped and
named in the summary line.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import platform
import random
import re
import site
import sys
import warnings
from pathlib import Path

from docstrings import (
    ANCHOR_WORDS,
    POSITIVE_MAX_WORDS,
    POSITIVE_MIN_WORDS,
    description_prose,
    is_code_like,
    make_pair,
    module_docs,
    third_party_pair,
)

ROOT = Path(__file__).resolve().parents[2]

# Pure standard library, on CPython >= 3.10 on Linux, quiet on import (no ``this``, ``antigravity``,
# GUI, IDLE or test packages), public (no ``_pyio``) and not deprecated for removal (no ``cgi``,
# ``telnetlib``, ``asyncore``, ``chunk``, ``lib2to3``, ...). Many submodules re-export into their
# package: their members count once, under the name met first in sorted order.
STDLIB: tuple[str, ...] = tuple(
    sorted(
        """
        abc argparse array ast asyncio asyncio.events asyncio.futures asyncio.locks asyncio.queues asyncio.runners
        asyncio.streams asyncio.subprocess asyncio.taskgroups asyncio.tasks asyncio.timeouts base64 bdb binascii bisect
        builtins bz2 cProfile calendar cmath cmd code codecs codeop collections collections.abc colorsys compileall
        concurrent.futures concurrent.futures.process concurrent.futures.thread configparser contextlib contextvars copy
        copyreg csv ctypes ctypes.util curses curses.ascii curses.panel curses.textpad dataclasses datetime dbm dbm.dumb
        decimal difflib dis doctest email.charset email.contentmanager email.encoders email.errors email.feedparser
        email.generator email.header email.headerregistry email.iterators email.message email.mime.application
        email.mime.audio email.mime.base email.mime.image email.mime.message email.mime.multipart
        email.mime.nonmultipart email.mime.text email.parser email.policy email.utils encodings encodings.idna
        encodings.punycode enum faulthandler filecmp fileinput fnmatch fractions ftplib functools gc getopt getpass
        gettext glob graphlib gzip hashlib heapq hmac html html.entities html.parser http http.client http.cookiejar
        http.cookies http.server imaplib importlib importlib.abc importlib.machinery importlib.metadata
        importlib.resources importlib.util inspect io ipaddress itertools json json.decoder json.encoder keyword
        linecache locale logging logging.config logging.handlers lzma mailbox math mimetypes mmap modulefinder
        multiprocessing multiprocessing.connection multiprocessing.managers multiprocessing.pool multiprocessing.process
        multiprocessing.queues multiprocessing.shared_memory multiprocessing.synchronize netrc numbers operator optparse
        os os.path pathlib pdb pickle pickletools pkgutil platform plistlib poplib pprint profile pstats py_compile
        pyclbr pydoc queue quopri random re reprlib rlcompleter runpy sched secrets selectors shelve shlex shutil signal
        site smtplib socket socketserver sqlite3 ssl stat statistics string stringprep struct subprocess symtable sys
        sysconfig tabnanny tarfile tempfile textwrap threading time timeit token tokenize tomllib trace traceback
        tracemalloc types typing unicodedata unittest unittest.async_case unittest.case unittest.loader unittest.main
        unittest.mock unittest.result unittest.runner unittest.suite urllib.error urllib.parse urllib.request
        urllib.response urllib.robotparser uuid venv warnings wave weakref wsgiref wsgiref.handlers wsgiref.headers
        wsgiref.simple_server wsgiref.util wsgiref.validate xml.dom xml.dom.expatbuilder xml.dom.minidom xml.dom.pulldom
        xml.etree.ElementInclude xml.etree.ElementTree xml.parsers.expat xml.sax xml.sax.expatreader xml.sax.handler
        xml.sax.saxutils xml.sax.xmlreader xmlrpc.client xmlrpc.server zipfile zipimport zlib zoneinfo
        """.split()
    )
)

# Modules of packages this project depends on (directly, or numpy through all of them) whose
# docstrings read as prose. Left out: generated or boilerplate docs (pyarrow.compute repeats one
# parameter text in hundreds of functions), torch's top level (terse op docs, many in LaTeX).
THIRD_PARTY: tuple[str, ...] = tuple(
    sorted(
        """
        numpy numpy.fft numpy.linalg numpy.polynomial numpy.random PIL.Image PIL.ImageFilter PIL.ImageOps pyarrow
        pyarrow.dataset pyarrow.fs pyarrow.parquet ray.data soundfile torch.distributions torch.fft torch.linalg
        torch.nn torch.nn.functional torch.nn.init torch.optim torch.utils.data torchaudio.functional
        torchaudio.transforms torchvision.datasets torchvision.io torchvision.ops torchvision.transforms.v2
        transformers.tokenization_utils_base yaml
        """.split()
    )
)

# This project's own distribution: its README changes with the code, not with the venv.
SKIPPED_DISTRIBUTIONS = ("omniembed",)


def docstring_candidates() -> tuple[list[tuple[str, str, str, bool]], list[str]]:
    """(source, name, docstring, is third-party) in sorted order, and the modules that failed to import."""
    found: list[tuple[str, str, str, bool]] = []
    skipped: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for third_party, modules in ((False, STDLIB), (True, THIRD_PARTY)):
            for name in modules:
                try:
                    module = importlib.import_module(name)
                except Exception:  # an optional C extension (curses) or a broken install
                    skipped.append(name)
                    continue
                found.extend((source, member, doc, third_party) for source, member, doc in module_docs(module, name))
    return found, skipped


def metadata_candidates() -> list[tuple[str, str, str]]:
    """(source, summary, description prose) of the distributions installed in site-packages, sorted by normalised name.

    Only site-packages: not the working directory's ``*.egg-info`` nor what a package vendors onto
    ``sys.path`` when imported (Ray's ``thirdparty_files``).
    """
    distributions = {}
    for dist in importlib.metadata.distributions(path=site.getsitepackages()):
        name = dist.metadata["Name"] or ""
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key and key not in SKIPPED_DISTRIBUTIONS:
            distributions.setdefault(key, []).append((str(dist.version), name, dist))
    found = []
    for key in sorted(distributions):
        _, name, dist = min(distributions[key], key=lambda entry: entry[:2])  # one per name (more: a left-over)
        meta = dist.metadata
        summary = " ".join((meta["Summary"] or "").split())
        description = meta.get_payload() or meta["Description"] or ""
        found.append((f"pypi:{name}", summary, description_prose(str(description), summary)))
    return found


def metadata_pair(summary: str, prose: str) -> tuple[str, str] | None:
    if not ANCHOR_WORDS[0] <= len(summary.split()) <= ANCHOR_WORDS[1] or is_code_like(summary):
        return None
    words = prose.split()
    return (summary, " ".join(words[:POSITIVE_MAX_WORDS])) if len(words) >= POSITIVE_MIN_WORDS else None


def build_pairs() -> tuple[list[dict[str, str]], list[str]]:
    """Deduplicated pairs in source order (before any shuffle), and the modules skipped."""
    found, skipped = docstring_candidates()
    candidates = [
        (source, third_party_pair(doc, name) if third_party else make_pair(doc, name))
        for source, name, doc, third_party in found
    ]
    candidates += [(source, metadata_pair(summary, prose)) for source, summary, prose in metadata_candidates()]
    pairs: list[dict[str, str]] = []
    seen_anchors: set[str] = set()
    seen_positives: set[str] = set()
    for source, pair in candidates:
        if pair is None:
            continue
        anchor, positive = pair
        a_key, p_key = anchor.casefold(), positive.casefold()
        if a_key in seen_anchors or p_key in seen_positives:
            continue
        seen_anchors.add(a_key)
        seen_positives.add(p_key)
        pairs.append({"anchor": anchor, "positive": positive, "source": source})
    return pairs, skipped


def source_kind(source: str) -> str:
    if source.startswith("pypi:"):
        return "metadata"
    return "stdlib" if source.split(".", 1)[0] in sys.stdlib_module_names else "third-party"


def versions() -> str:
    """Python's version and those of the third-party packages read (their top-level ``__version__``)."""
    found = {f"Python {platform.python_version()}"}
    for name in THIRD_PARTY:
        top = sys.modules.get(name.split(".", 1)[0])
        version = getattr(top, "__version__", None)
        if isinstance(version, str):
            found.add(f"{top.__name__} {version}")
    return ", ".join(sorted(found, key=lambda item: (not item.startswith("Python"), item.casefold())))


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n", 1)[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--output", type=Path, default=ROOT / "examples/data/docstring_pairs.jsonl", help="pairs (JSONL)"
    )
    parser.add_argument(
        "--held-out-output",
        type=Path,
        default=ROOT / "examples/data/docstring_pairs_heldout.jsonl",
        help="held-out pairs (JSONL); written only with --held-out",
    )
    parser.add_argument("--max-pairs", type=int, default=3000, help="pairs written in all (both files)")
    parser.add_argument("--held-out", type=int, default=0, help="the last N pairs go to --held-out-output")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle")
    args = parser.parse_args(argv)
    if args.max_pairs < 1 or args.held_out < 0:
        parser.error("--max-pairs must be positive and --held-out non-negative")

    pairs, skipped = build_pairs()
    candidates = len(pairs)
    random.Random(args.seed).shuffle(pairs)
    pairs = pairs[: args.max_pairs]
    if args.held_out >= len(pairs):
        parser.error(f"--held-out {args.held_out} leaves no training pairs out of {len(pairs)}")
    cut = len(pairs) - args.held_out
    write_jsonl(args.output, pairs[:cut])
    held_out = ""
    if args.held_out:
        write_jsonl(args.held_out_output, pairs[cut:])
        held_out = f", {args.held_out} held out -> {args.held_out_output}"
    kinds = {kind: 0 for kind in ("stdlib", "third-party", "metadata")}
    for pair in pairs:
        kinds[source_kind(pair["source"])] += 1
    print(
        f"{cut} pairs -> {args.output}{held_out} ({', '.join(f'{n} {kind}' for kind, n in kinds.items())}; "
        f"{candidates} candidates; made with {versions()}; skipped: {', '.join(skipped) or 'none'})"
    )


if __name__ == "__main__":
    main()
