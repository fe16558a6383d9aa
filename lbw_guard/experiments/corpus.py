"""Text corpora for the stress suite, split into training and held-out documents.

The default corpus is the running Python's own standard library source: it is always on disk,
needs no network, and is large enough to train a small language model. Documents (files) are
assigned to a split by a hash of their relative path, so no document is ever in both splits and
the split does not depend on the order the filesystem lists files in.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Directories that are not representative source text (vendored packages, test fixtures with
# deliberately odd encodings and very long generated strings).
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
# Very large files (generated tables, pydoc topics) would dominate a byte budget.
_MAX_FILE_BYTES = 150_000


@dataclass(frozen=True)
class Corpus:
    """Training and held-out text, plus a fingerprint that keys every cache built from it."""

    name: str
    train: list[str]
    heldout: list[str]
    fingerprint: str

    @property
    def train_chars(self) -> int:
        return sum(len(d) for d in self.train)

    @property
    def heldout_chars(self) -> int:
        return sum(len(d) for d in self.heldout)


def _hash_key(name: str) -> int:
    return int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big")


def _fingerprint(name: str, train: list[str], heldout: list[str]) -> str:
    h = hashlib.sha1(name.encode("utf-8"))
    for split in (train, heldout):
        h.update(b"\x00split")
        for doc in split:
            h.update(hashlib.sha1(doc.encode("utf-8")).digest())
    return h.hexdigest()[:16]


def _assign_splits(names: list[str], heldout_percent: int) -> dict[str, str]:
    """Each document name's split, by its hash. A small corpus (a short text file) can hash every
    document into one split; then the document whose hash is nearest the other side moves there,
    so any corpus of two or more documents splits."""
    rank = {name: _hash_key("split:" + name) % 100 for name in names}
    split_of = {name: "heldout" if r < heldout_percent else "train" for name, r in rank.items()}
    if len(names) >= 2 and len(set(split_of.values())) == 1:
        nearest = min(names, key=lambda n: (rank[n], n)) if "train" in split_of.values() \
            else max(names, key=lambda n: (rank[n], n))
        split_of[nearest] = "heldout" if split_of[nearest] == "train" else "train"
    return split_of


def split_documents(
    named_docs: list[tuple[str, str]],
    heldout_percent: int,
    train_chars: int,
    heldout_chars: int,
) -> tuple[list[str], list[str]]:
    """Hash-split (name, text) documents and fill each split up to its character budget.

    Documents are visited in hash order, which is a fixed pseudo-random order: the budget picks a
    deterministic, unbiased subset rather than, say, only the alphabetically first modules.
    """
    if not 0 < heldout_percent < 100:
        raise ValueError(f"heldout_percent must be in (0, 100), got {heldout_percent}")
    train: list[str] = []
    heldout: list[str] = []
    used = {"train": 0, "heldout": 0}
    budget = {"train": train_chars, "heldout": heldout_chars}
    split_of = _assign_splits([name for name, text in named_docs if text.strip()], heldout_percent)
    for name, text in sorted(named_docs, key=lambda nd: (_hash_key(nd[0]), nd[0])):
        split = split_of.get(name)
        if split is None or used[split] >= budget[split]:
            continue
        (heldout if split == "heldout" else train).append(text)
        used[split] += len(text)
    if not train or not heldout:
        raise ValueError(
            f"corpus too small to split: {len(train)} training and {len(heldout)} held-out "
            f"documents from {len(named_docs)} documents"
        )
    return train, heldout


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_documents(root: Path | None = None) -> list[tuple[str, str]]:
    """Every readable ``.py`` file of the standard library as (relative path, text), sorted."""
    root = stdlib_root() if root is None else root
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS for part in rel.parts[:-1]):
            continue
        try:
            if path.stat().st_size > _MAX_FILE_BYTES:
                continue
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        docs.append((rel.as_posix(), text))
    return docs


def _blocks(name: str, text: str, size_chars: int = 4096) -> list[tuple[str, str]]:
    """``text`` cut into documents at blank-line-separated blocks of about ``size_chars``."""
    docs: list[tuple[str, str]] = []
    block: list[str] = []
    size = 0
    for para in text.split("\n\n"):
        block.append(para)
        size += len(para) + 2
        if size >= size_chars:
            docs.append((f"{name}#{len(docs)}", "\n\n".join(block)))
            block, size = [], 0
    if block:
        docs.append((f"{name}#{len(docs)}", "\n\n".join(block)))
    return docs


def text_file_documents(path: Path) -> list[tuple[str, str]]:
    """A local text file cut into documents at blank-line-separated blocks of ~4K characters."""
    # Named by the file's name, not its full path: the same file splits the same way wherever it lies.
    return _blocks(Path(path).name, Path(path).read_text(encoding="utf-8", errors="replace"))


def pydoc_topics_documents() -> list[tuple[str, str]]:
    """English prose that ships with Python: the documentation topics of ``pydoc_data.topics``
    (the text ``help()`` shows for keywords and syntax), cut into ~2K-character documents."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip pydoc_data
        raise RuntimeError("the prose corpus needs the standard library's pydoc_data package, "
                           "which this Python does not have") from exc
    docs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name in sorted(topics):
        for doc_name, text in _blocks(f"pydoc:{name}", topics[name], size_chars=2048):
            if text not in seen:  # a few topics repeat a block: keep it once, in one split
                seen.add(text)
                docs.append((doc_name, text))
    return docs


def load_prose_corpus(train_chars: int = 10**9, heldout_chars: int = 10**9, heldout_percent: int = 10) -> Corpus:
    """The pydoc topics prose, hash-split into training and held-out documents."""
    name = f"pydoc-topics-{sysconfig.get_python_version()}"
    train, heldout = split_documents(pydoc_topics_documents(), heldout_percent, train_chars, heldout_chars)
    return Corpus(name, train, heldout, _fingerprint(name, train, heldout))


def wikitext_documents(name: str) -> tuple[list[str], list[str]]:
    """WikiText's own train/validation splits through the optional ``datasets`` package."""
    try:
        import datasets  # optional: only needed for real data with network access
    except ImportError as exc:
        raise RuntimeError(
            "--dataset needs the optional 'datasets' package (pip install datasets) and network "
            "access; use the default stdlib corpus or --text-file PATH offline"
        ) from exc
    configs = {"wikitext-103": "wikitext-103-raw-v1", "wikitext-2": "wikitext-2-raw-v1"}
    if name not in configs:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(configs)}")
    ds = datasets.load_dataset("wikitext", configs[name])

    def articles(split: str) -> list[str]:
        # WikiText lines: an article starts at a " = Title = " heading.
        docs: list[str] = []
        for line in ds[split]["text"]:
            if line.startswith(" = ") and not line.startswith(" = = ") and docs:
                docs.append("")
            if not docs:
                docs.append("")
            docs[-1] += line
        return [d for d in docs if d.strip()]

    return articles("train"), articles("validation")


def load_corpus(
    source: str = "stdlib",
    *,
    text_file: Path | None = None,
    train_chars: int = 3_000_000,
    heldout_chars: int = 300_000,
    heldout_percent: int = 10,
) -> Corpus:
    """Load ``source`` ("stdlib", "text-file" or a WikiText name) within the character budgets."""
    if source == "stdlib":
        name = f"stdlib-{sysconfig.get_python_version()}"
        train, heldout = split_documents(
            stdlib_documents(), heldout_percent, train_chars, heldout_chars
        )
    elif source == "text-file":
        if text_file is None:
            raise ValueError("source 'text-file' needs text_file")
        name = f"file-{Path(text_file).name}"
        train, heldout = split_documents(
            text_file_documents(Path(text_file)), heldout_percent, train_chars, heldout_chars
        )
    else:
        name = source
        all_train, all_heldout = wikitext_documents(source)
        train = _take(all_train, train_chars)
        heldout = _take(all_heldout, heldout_chars)
    return Corpus(name, train, heldout, _fingerprint(name, train, heldout))


def _take(docs: list[str], budget: int) -> list[str]:
    out, used = [], 0
    for d in docs:
        if used >= budget:
            break
        out.append(d)
        used += len(d)
    return out
