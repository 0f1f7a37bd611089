"""Docstring -> (anchor, positive) helpers of ``make_pairs.py``: signature and markup stripping, sentence splitting.

Standard-library docstrings are plain text and go through ``make_pair`` as they are. Third-party ones
(numpydoc, Google style, reStructuredText) are first made plain by ``clean_markup``; installed
distributions' descriptions (Markdown or reStructuredText) by ``description_prose``.
"""

from __future__ import annotations

import inspect
import re
from types import ModuleType

ANCHOR_WORDS = (4, 40)
POSITIVE_MIN_WORDS = 12
POSITIVE_MAX_WORDS = 120

# A builtin's signature line: ``name(args)``, ``S.name(args) -> ret``, ``obj = name(args)``, ``Unix: name(args)``.
_SIGNATURE_START = re.compile(r"(?:[A-Z]\w*:\s*)?(?:[A-Za-z_]\w*\s*=\s*)?[A-Za-z_][\w.]*\(")
_ARROW = re.compile(r"-+>\s*")
# Candidate sentence ends: a terminator (maybe closed by a quote or bracket), then whitespace.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+")
_ABBREVIATIONS = ("e.g.", "i.e.", "a.k.a.", "etc.", "cf.", "vs.", "approx.", "resp.", "Mr.", "Dr.", "No.")
# What reads as code rather than a summary: a doctest, an assignment, keyword arguments, a call in a lowercase line.
_CODE_LIKE = re.compile(r">>>|-->|\w=\w|^\[|^[A-Za-z_]\w*\s*=\s|^[a-z].*\(")


def collapse(text: str) -> str:
    return " ".join(text.split())


def _call_end(lines: list[str]) -> tuple[int, str] | None:
    """(lines the call at the top spans, what follows its closing parenthesis on the last one)."""
    depth = 0
    for row, line in enumerate(lines):
        for i, char in enumerate(line):
            depth += {"(": 1, ")": -1, "[": 1, "]": -1}.get(char, 0)
            if char == ")" and depth == 0:
                return row + 1, line[i + 1 :].strip()
    return None


def strip_signatures(doc: str) -> str:
    """Drop the ``name(args) -> ret`` lines some builtins' docstrings start with (one or several).

    A signature may wrap onto the following lines; what follows an arrow is kept only when it
    reads as a sentence (``zip(*iterables) --> Yield tuples until an input is exhausted.``).
    """
    lines = doc.strip().splitlines()
    while lines and _SIGNATURE_START.match(lines[0]):
        end = _call_end(lines)
        if end is None or (end[1] and not _ARROW.match(end[1])):
            break  # prose that happens to start with a call: keep it
        used, rest = end
        returns = _ARROW.sub("", rest, count=1)
        depth = returns.count("(") + returns.count("[") - returns.count(")") - returns.count("]")
        while depth > 0 and used < len(lines):  # the return annotation wraps too
            depth += lines[used].count("(") + lines[used].count("[")
            depth -= lines[used].count(")") + lines[used].count("]")
            used += 1
        lines = lines[used:]
        if returns[:1].isupper() and returns.endswith(".") and depth == 0:
            lines.insert(0, returns)  # a sentence after the arrow: it is the summary
            break
        while lines and not lines[0].strip():
            lines = lines[1:]
    return "\n".join(lines)


def strip_doctests(doc: str) -> str:
    """Drop ``>>>`` examples and their output (up to the next blank line), and line-end backslashes."""
    kept: list[str] = []
    in_example = False
    for line in doc.splitlines():
        if line.lstrip().startswith(">>>"):
            in_example = True
        elif not line.strip():
            in_example = False
        if not in_example:
            kept.append(re.sub(r"\\$", "", line.rstrip()))
    return "\n".join(kept)


def split_first_sentence(paragraph: str) -> tuple[str, str]:
    """(first sentence, rest) of a whitespace-collapsed paragraph."""
    for match in _SENTENCE_END.finditer(paragraph):
        head, tail = paragraph[: match.end()].rstrip(), paragraph[match.end() :]
        if not tail[:1].isupper() and not tail[:1].isdigit() and tail[:1] not in "\"'`(":
            continue  # "Return x. y is ..." or a dotted name: not a sentence end we trust
        if head.endswith(_ABBREVIATIONS):
            continue
        return head, tail
    return paragraph, ""


def make_pair(doc: str, name: str = "") -> tuple[str, str] | None:
    """(anchor, positive) of ``name``'s docstring, or None when it gives no usable pair."""
    doc = strip_doctests(strip_signatures(doc))
    paragraphs = [p for p in re.split(r"\n\s*\n", doc) if p.strip()]
    if not paragraphs:
        return None
    first = collapse(paragraphs[0])
    if name and first.startswith(name + ": "):  # "uname_result: Result from os.uname()."
        first = first[len(name) + 2 :]
    anchor, rest = split_first_sentence(first)
    positive = collapse(" ".join([rest, *paragraphs[1:]]))
    if not ANCHOR_WORDS[0] <= len(anchor.split()) <= ANCHOR_WORDS[1] or _CODE_LIKE.search(anchor):
        return None
    words = positive.split()
    if len(words) < POSITIVE_MIN_WORDS:
        return None
    return anchor, " ".join(words[:POSITIVE_MAX_WORDS])


def own_doc(obj: object) -> str | None:
    """The object's own docstring (not one ``inspect.getdoc`` would inherit from a base class)."""
    raw = getattr(obj, "__doc__", None)
    if not isinstance(raw, str) or not raw.strip():
        return None
    return inspect.getdoc(obj)


def _defined_here(obj: object, module: ModuleType, name: str) -> bool:
    """For modules without ``__all__``: skip what they merely import from another public module."""
    owner = getattr(obj, "__module__", None)
    if owner is None or owner in (name, module.__name__) or owner.startswith((name + ".", module.__name__ + ".")):
        return True
    return any(part.startswith("_") for part in owner.split("."))  # a private C or Python implementation


def public_members(module: ModuleType, name: str) -> list[tuple[str, object]]:
    exported = getattr(module, "__all__", None)
    names = sorted({str(n) for n in exported} if exported is not None else vars(module))
    members = []
    for member in names:
        if member.startswith("_"):
            continue
        try:
            obj = getattr(module, member)
        except Exception:  # a lazy attribute that fails to import (ray.workflow)
            continue
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if exported is None and not _defined_here(obj, module, name):
            continue
        members.append((member, obj))
    return members


def methods(cls: type) -> list[tuple[str, object]]:
    """The class's own public methods (inherited ones are found on the class that defines them)."""
    found = []
    for name in sorted(vars(cls)):
        if name.startswith("_"):
            continue
        raw = vars(cls)[name]
        if isinstance(raw, (classmethod, staticmethod)):
            raw = raw.__func__
        if inspect.isroutine(raw):
            found.append((name, raw))
    return found


_BUILTIN_TYPES_HOMES = ("builtins", "types")  # where the standard library documents builtin types


def module_docs(module: ModuleType, name: str) -> list[tuple[str, str, str]]:
    """(qualified name, name, docstring) of the module's public classes, functions and their methods, sorted."""
    found = []
    for member, obj in public_members(module, name):
        owner = getattr(obj, "__module__", None) or ""
        if owner != name and (
            name.startswith(owner + ".") or (owner == "builtins" and name not in _BUILTIN_TYPES_HOMES)
        ):
            continue  # re-exported from a parent package (torch.fft.Tensor) or a builtin type (a str NewType)
        doc = own_doc(obj)
        if doc:
            found.append((f"{name}.{member}", member, doc))
        if inspect.isclass(obj):
            for method, func in methods(obj):
                doc = own_doc(func)
                if doc:
                    found.append((f"{name}.{member}.{method}", method, doc))
    return found


# Third-party markup. Sections: numpydoc (a title over a ``-----`` line) or Google style (``Args:``).
_UNDERLINE = re.compile(r"[-=~^]{3,}")
_SECTION = re.compile(
    r"(Args|Arguments|Attributes|Examples?|Inputs?|Keyword Arg(?:ument)?s|Methods|Notes|Other Parameters|Outputs?"
    r"|Param(?:eter)?s|Raises|References?|Returns?|See [Aa]lso|Shape|Warns|Yields)::?"
)
_DROPPED_SECTIONS = {"example", "examples", "notes", "reference", "references", "see also"}
_FIELD = re.compile(r":(param|parameter|arg|key|keyword|type|returns?|rtype|raises?|yields?)\b\s*([^:]*):\s*")
_DIRECTIVE = re.compile(r"\.\.\s+(?:\|[^|]+\|\s+)?([\w:-]+)\s*::\s*(.*)")  # also .. |name| unicode::
_ADMONITIONS = {"attention", "caution", "danger", "hint", "important", "note", "tip", "warning"}
_LATEX_ARGUMENT = re.compile(
    r"\\(?:text|textrm|textbf|textit|mathrm|mathbf|mathbb|mathcal|mathit|operatorname|overline|bar|hat|tilde|vec)"
    r"\s*\{([^{}]*)\}"
)
_LATEX_SYMBOLS = {
    "times": "x", "cdot": "*", "leq": "<=", "le": "<=", "geq": ">=", "ge": ">=", "neq": "!=", "ne": "!=",
    "infty": "inf", "ldots": "...", "cdots": "...", "dots": "...", "approx": "~", "sim": "~",
    "lceil": "ceil(", "rceil": ")", "lfloor": "floor(", "rfloor": ")", "left": "", "right": "",
    "mathbb": "", "mathcal": "", "mathrm": "", "mathbf": "", "displaystyle": "",
}  # fmt: skip


def _field(match: re.Match[str]) -> str:
    """``:param x:`` -> ``x:``, ``:returns:`` -> ``Returns:``, ``:raises E:`` -> ``Raises E:``."""
    kind, arg = match.group(1), match.group(2).split()
    if kind.startswith(("return", "yield")):
        return kind.rstrip("s").capitalize() + "s: "
    if kind.startswith("raise"):
        return " ".join(["Raises", *arg]) + ": "
    return f"{arg[-1]}: " if arg else ""


def plain_math(tex: str) -> str:
    """A :math: role's LaTeX as text: ``\\mathbb{K}^{n \\times k}`` -> ``K^{n x k}``, ``\\sigma`` -> ``sigma``."""
    tex = re.sub(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"(\1)/(\2)", _LATEX_ARGUMENT.sub(r"\1", tex))
    tex = _LATEX_ARGUMENT.sub(r"\1", tex)  # nested once: \text{\mathbf{x}}
    tex = re.sub(r"\\([A-Za-z]+)", lambda m: f" {_LATEX_SYMBOLS.get(m.group(1), m.group(1))} ", tex)
    tex = re.sub(r"\\([{}|_%&$#])", r"\1", tex)
    tex = re.sub(r"\\[,;:! ]?", " ", tex)
    return collapse(re.sub(r"([_^])\{(\w+)\}", r"\1\2", tex))


def _role(match: re.Match[str]) -> str:
    """:func:`~torch.nn.Conv2d` -> Conv2d, :ref:`text <target>` -> text, :math:`\\alpha` -> alpha."""
    if match.lastindex == 2:  # a role
        if match.group(1) == "math":
            return plain_math(match.group(2))
        text = match.group(2).strip().lstrip("!")
    else:
        text = match.group(1).strip().lstrip("!")
    if text.endswith(">") and "<" in text:
        text = text[: text.rindex("<")].strip()
    if text.startswith("~"):
        text = text[1:].rsplit(".", 1)[-1]
    return text


def inline_plain(text: str) -> str:
    """reStructuredText / Markdown inline markup to plain text (roles, links, literals, footnote marks)."""
    text = re.sub(r":(?:[\w-]+:)*([\w-]+):`([^`]*)`", _role, text).replace("\\ ", "")  # roles, escaped spaces
    text = re.sub(r"`([^`<]*?)\s*<[^`>]*>`__?", r"\1", text)  # `text <url>`_
    text = re.sub(r"\s*\[[\w#*.-]+\]_", "", text)  # footnote marks [1]_
    text = re.sub(r"``([^`]*)``", r"\1", text)
    text = re.sub(r"`([^`]*)`_{0,2}", _role, text)
    return re.sub(r"\*\*([^*]+)\*\*", r"\1", text)


def clean_markup(doc: str, sections: bool = True) -> str:
    """A third-party docstring as plain paragraphs.

    Dropped: examples, See Also, Notes and References sections and all after them; directive bodies
    (math, code, version notes; admonitions keep their text); literal blocks after ``::``; Markdown
    code fences; section underlines. With ``sections=False`` the text stops at the first parameter
    section (``Parameters``, ``Args:``, ``:param x:``): the prose alone.
    """
    out: list[str] = []
    lines = doc.splitlines()
    skip_deeper: int | None = None  # drop the indented body of a directive or a literal block
    fence = False
    for i, line in enumerate(lines):
        stripped, indent = line.strip(), len(line) - len(line.lstrip())
        if stripped.startswith(("```", "~~~")):
            fence = not fence
            continue
        if fence or _UNDERLINE.fullmatch(stripped):
            continue
        if skip_deeper is not None:
            if not stripped or indent > skip_deeper:
                continue
            skip_deeper = None
        following = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if (_UNDERLINE.fullmatch(following) and stripped) or _SECTION.fullmatch(stripped):
            title = stripped.rstrip(":")
            if not sections or title.casefold() in _DROPPED_SECTIONS:
                break
            out.append(title + ":")
            continue
        if stripped.startswith(".. rubric:: Example") or (not sections and re.match(r":[\w ]+:(?=\s|$)", stripped)):
            break
        directive = _DIRECTIVE.match(stripped)
        if directive or stripped.startswith(".. _"):
            if directive and directive.group(1) in _ADMONITIONS:
                out.append(directive.group(2))
            else:
                skip_deeper = indent
            continue
        if stripped.endswith("::"):
            out.append(line.rstrip()[:-1])
            skip_deeper = indent
            continue
        if stripped.startswith((":type ", ":rtype:")):
            skip_deeper = indent
            continue
        out.append(_FIELD.sub(_field, line) if stripped.startswith(":") else line)
    return inline_plain("\n".join(out))


def third_party_pair(doc: str, name: str) -> tuple[str, str] | None:
    """``make_pair`` of the cleaned docstring, when its prose before any parameter section gives a pair too."""
    doc = strip_signatures(doc)
    prose = make_pair(clean_markup(doc, sections=False), name)
    if prose is None or "\\" in prose[0]:  # no prose, or LaTeX left in the summary
        return None
    return make_pair(clean_markup(doc), name)


_LINK = re.compile(r"!?\[[^\]]*\]\([^)]*\)|`[^`<]*<[^>]*>`_{1,2}")
_RULE = re.compile(r"([-=~^*+#\"`])\1{2,}")
_BULLET = re.compile(r"(?:[-*+\u2022]|\d+[.)])\s+")


def _inline_markdown(text: str) -> str:
    text = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", text)  # images (badges)
    text = re.sub(r"\[([^\]]*)\](?:\([^)]*\)|\[[^\]]*\])", r"\1", text)  # [text](url), [text][ref]
    text = re.sub(r"<[^>]*>|https?://\S+", "", text)  # HTML tags, bare links
    text = re.sub(r"(?<![\w*])[*_]{1,2}([^*_\s](?:[^*_]*[^*_\s])?)[*_]{1,2}(?![\w*])", r"\1", text)  # emphasis
    text = re.sub(r"\|([^|\s][^|]*)\|", r"\1", text)  # reStructuredText substitutions
    text = re.sub(r"(?<=[A-Za-z])_(?=[\s,.;:)'!?]|$)", "", text)  # reStructuredText references: Trio_
    return inline_plain(text)


def _description_paragraphs(text: str) -> list[tuple[bool, str]]:
    """(starts with a list item, plain text) of the paragraphs before the first heading that follows some text."""
    text = re.sub(r"`([^`<]*?)\s*<[^`>]*>`_{1,2}", r"\1", re.sub(r"<!--.*?-->", "", text, flags=re.S))
    lines = re.sub(r"<[/!A-Za-z][^>]*>", "", text).splitlines()  # HTML tags, also those spanning lines
    paragraphs: list[list[str]] = [[]]
    skip_deeper: int | None = None
    fence = doctest = False
    for i, line in enumerate(lines):
        stripped, indent = line.strip(), len(line) - len(line.lstrip())
        if stripped.startswith(("```", "~~~")):
            fence = not fence
            continue
        if skip_deeper is not None and (not stripped or indent > skip_deeper):
            continue
        skip_deeper = None
        doctest = (doctest or stripped.startswith(">>>")) and bool(stripped)  # a doctest and its output
        stripped = re.sub(r"^(?:>\s*(?:\[!\w+\]\s*)?)+", "", stripped)  # block quotes, GitHub alerts
        following = lines[i + 1].strip() if i + 1 < len(lines) else ""
        heading = line.startswith("#") or bool(stripped and _RULE.fullmatch(following))
        if heading and any(paragraphs):
            break
        if fence or doctest or heading or _RULE.fullmatch(stripped):
            continue
        if stripped.startswith(".. ") or stripped.endswith("::"):
            skip_deeper = indent
            if not stripped.startswith(".. "):
                paragraphs[-1].append(stripped[:-1])
            continue
        if indent >= 4 and not paragraphs[-1] and (i == 0 or not lines[i - 1].strip()):  # an indented code block
            skip_deeper = indent - 1
            continue
        plain = _inline_markdown(stripped).strip()
        links = _LINK.findall(stripped) + re.findall(r"https?://", stripped)
        navigation = (len(links) >= 2 and len(_inline_markdown(_LINK.sub("", stripped)).split()) < 4) or len(
            re.findall(r" [|\u2022] ", stripped)
        ) >= 2
        label = plain.endswith(":") and (links or (len(plain.split()) < 3 and not paragraphs[-1]))  # "Docs: <url>"
        short = len(plain.split()) < 3 and _BULLET.match(stripped)  # "- Docs"
        link_target = re.match(r"\[[^\]]+\]:", stripped)  # [ref]: url, [^1]: footnote
        if navigation or label or short or link_target or not plain or stripped.startswith(("|", "$ ", "+-")):
            if paragraphs[-1]:
                paragraphs.append([])
            continue
        paragraphs[-1].append(stripped)
    return [(bool(_BULLET.match(p[0])), collapse(_inline_markdown(" ".join(p)))) for p in paragraphs if p]


def description_prose(text: str, summary: str) -> str:
    """The prose a distribution's long description (Markdown or reStructuredText) starts with, whitespace collapsed.

    Dropped: headings, badges and images, HTML, tables, link targets and URLs (a link's text stays),
    navigation lines, code (fences, literal and directive blocks, doctests) and the summary where it
    is repeated. Taken: the paragraphs of at least 6 words before the first heading that follows
    some text, when the first of them is prose, not a list.
    """
    key = summary.casefold().rstrip(". ")
    kept: list[str] = []
    for is_list, paragraph in _description_paragraphs(text):
        if key and paragraph.casefold().startswith(key):  # the summary again, maybe with more after it
            paragraph = paragraph[len(key) :].lstrip(" .:!")
        if len(paragraph.split()) >= 6 and (kept or not is_list):
            kept.append(paragraph)
    return collapse(" ".join(kept))


def is_code_like(text: str) -> bool:
    return bool(_CODE_LIKE.search(text))
