"""A broader English corpus from Debian packages, for the language-model bases (issue 13, item 3).

Two datasets, both offline:

- ``"english"`` (train / validation / test): a mix of
    * the King James Bible with its own split (``astra_examples.data.load_kjv``: ``bible-kjv-text``,
      public domain), kept so the KJV rows stay comparable;
    * GCIDE, the GNU Collaborative International Dictionary of English (``dict-gcide``, GPL): every
      ``GCIDE_EVERY``-th entry, pronunciation and source markup removed;
    * FOLDOC, the Free On-line Dictionary of Computing (``dict-foldoc``, GNU FDL 1.1+);
    * the Jargon File (``dict-jargon``, public domain);
    * the fortune-cookie files of ``fortunes`` (BSD licence of fortune-mod; the offensive set is a separate
      package and is not used).
  The non-KJV sources are split by entry: every 20th entry goes to test, the one before it to validation.
- ``"english-ood"`` (test only): English text from sources that no base model sees in training:
    * The Devil's Dictionary by Ambrose Bierce, 1911 (``dict-devil``, public domain);
    * Debian's constitution, social contract, manifesto and bug-tracking guides (``doc-debian``, GPL / OPL).

A machine without apt reads the same corpus from one JSON-lines file written here by
``python -m astra_examples.english export FILE.jsonl.gz`` (with examples/ on the path) and named by ``ASTRA_ENGLISH_CORPUS``; the KJV part
still comes from ``astra_examples.data`` (``ASTRA_KJV_TEXT``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys
from pathlib import Path

from datasets import Dataset, DatasetDict, Features, Value

from astra_examples.data import load_kjv

DATASETS = ("english", "english-ood")
ENGLISH_ENV = "ASTRA_ENGLISH_CORPUS"
DICT_DIR = Path("/usr/share/dictd")
FORTUNE_DIR = Path("/usr/share/games/fortunes")
DEBIAN_DOC_DIR = Path("/usr/share/doc/debian")
DEBIAN_DOCS = (  # current versions only (the folder also keeps every old version of the constitution)
    "constitution.txt.gz", "social-contract.txt.gz", "debian-manifesto.gz", "bug-reporting.txt.gz",
    "bug-log-access.txt", "bug-maint-info.txt.gz", "bug-maint-mailcontrol.txt.gz", "mailing-lists.txt.gz",
)
GCIDE_EVERY = 8
SPLIT_PERIOD = 20
PACKAGES = {
    "gcide": "dict-gcide", "foldoc": "dict-foldoc", "jargon": "dict-jargon", "fortunes": "fortunes",
    "devil": "dict-devil", "debian-docs": "doc-debian",
}
TRAINING_SOURCES = ("gcide", "foldoc", "jargon", "fortunes")
OOD_SOURCES = ("devil", "debian-docs")
LICENCES = {
    "kjv": "public domain (bible-kjv-text)",
    "gcide": "GPL (dict-gcide)",
    "foldoc": "GNU FDL 1.1 or later (dict-foldoc)",
    "jargon": "public domain (dict-jargon)",
    "fortunes": "BSD (fortunes, from fortune-mod)",
    "devil": "public domain (dict-devil)",
    "debian-docs": "GPL and Open Publication License (doc-debian)",
}
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def load_english_dataset(name: str) -> DatasetDict:
    """``"english"`` (train/validation/test) or ``"english-ood"`` (test); column ``text``, plus ``source``."""
    if name not in DATASETS:
        raise ValueError(f"english dataset must be one of {list(DATASETS)}, got {name!r}")
    rows = _corpus_rows()
    features = Features({"text": Value("string"), "source": Value("string")})
    if name == "english-ood":
        ood = [row for row in rows if row["source"] in OOD_SOURCES]
        return DatasetDict({"test": _dataset(ood, features)})
    splits = {"train": [], "validation": [], "test": []}
    kjv = load_kjv()
    for split in splits:
        splits[split] += [{"text": text, "source": "kjv"} for text in kjv[split]["text"]]
    for row in rows:
        if row["source"] in TRAINING_SOURCES:
            splits[row["split"]].append({"text": row["text"], "source": row["source"]})
    return DatasetDict({split: _dataset(values, features) for split, values in splits.items()})


def _dataset(rows: list[dict], features: Features) -> Dataset:
    return Dataset.from_dict({"text": [r["text"] for r in rows], "source": [r["source"] for r in rows]}, features=features)


def _corpus_rows() -> list[dict]:
    """Every non-KJV row: {source, split, text}, from ASTRA_ENGLISH_CORPUS or the Debian packages."""
    exported = os.environ.get(ENGLISH_ENV)
    if exported:
        path = Path(exported)
        if not path.is_file():
            raise FileNotFoundError(f"{ENGLISH_ENV}={path}: no such file (write it with `python -m astra_examples.english export`)")
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            return [json.loads(line) for line in handle]
    return debian_rows()


def debian_rows() -> list[dict]:
    readers = {
        "gcide": lambda: dict_entries("gcide", every=GCIDE_EVERY, clean=clean_gcide),
        "foldoc": lambda: dict_entries("foldoc"),
        "jargon": lambda: dict_entries("jargon"),
        "fortunes": fortune_entries,
        "devil": lambda: dict_entries("devil"),
        "debian-docs": debian_doc_paragraphs,
    }
    rows = []
    for source, read in readers.items():
        entries = read()
        if not entries:
            raise ValueError(f"no text read from {source} (package {PACKAGES[source]})")
        for index, text in enumerate(entries):
            rows.append({"source": source, "split": entry_split(index), "text": text})
    return rows


def entry_split(index: int) -> str:
    position = index % SPLIT_PERIOD
    return "test" if position == SPLIT_PERIOD - 1 else "validation" if position == SPLIT_PERIOD - 2 else "train"


def _missing(source: str, path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"{path} not found: install the Debian package `apt-get install {PACKAGES[source]}` "
        f"(all of them: `apt-get install {' '.join(PACKAGES.values())}`), or set {ENGLISH_ENV} to a file written by "
        f"`python -m astra_examples.english export`."
    )


def b64_number(text: str) -> int:
    """A dictd index number (offset or length) in its base-64 digits."""
    value = 0
    for char in text:
        value = value * 64 + B64.index(char)
    return value


def dict_entries(name: str, every: int = 1, clean=None) -> list[str]:
    """The entries of a dictd database (``name.index`` + ``name.dict.dz``) in index order, one text each.

    Entries reached by several headwords are read once; the ``00-database-*`` entries are skipped.
    """
    index_path, dict_path = DICT_DIR / f"{name}.index", DICT_DIR / f"{name}.dict.dz"
    for path in (index_path, dict_path):
        if not path.is_file():
            raise _missing(name, path)
    with gzip.open(dict_path, "rb") as handle:  # dictzip is gzip-compatible
        data = handle.read()
    seen, entries = set(), []
    for line in index_path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-") or parts[0].startswith("00database"):
            continue
        offset, length = b64_number(parts[1]), b64_number(parts[2])
        if offset in seen:
            continue
        seen.add(offset)
        entries.append((offset, length))
    entries.sort()
    texts = []
    for number, (offset, length) in enumerate(entries):
        if number % every:
            continue
        text = data[offset : offset + length].decode("utf-8", errors="replace")
        text = clean(text) if clean else reflow(text)
        if text:
            texts.append(text)
    return texts


GCIDE_MARKUP = (
    re.compile(r"\\[^\\\n]*\\"),  # pronunciation: \Ab`di*ca"tion\
    re.compile(r"\[(1913 Webster|PJC|WordNet 1\.5|Webster 1913 Suppl\.|[^\]\n]{0,40}\d{4}[^\]\n]{0,20})\]"),
)


def clean_gcide(text: str) -> str:
    for pattern in GCIDE_MARKUP:
        text = pattern.sub("", text)
    return reflow(text)


def reflow(text: str) -> str:
    """Lines joined by spaces, paragraphs by newlines, runs of blanks collapsed."""
    paragraphs = [" ".join(part.split()) for part in re.split(r"\n\s*\n", text)]
    return "\n".join(p for p in paragraphs if p)


def fortune_entries() -> list[str]:
    if not FORTUNE_DIR.is_dir():
        raise _missing("fortunes", FORTUNE_DIR)
    texts = []
    for path in sorted(FORTUNE_DIR.iterdir()):
        if not path.is_file() or path.suffix in (".dat", ".u8") or path.is_symlink():
            continue
        for entry in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            text = "\n".join(line.rstrip() for line in entry.strip("%\n").splitlines())
            if text.strip():
                texts.append(text.strip())
    return texts


def debian_doc_paragraphs() -> list[str]:
    texts = []
    for name in DEBIAN_DOCS:
        path = DEBIAN_DOC_DIR / name
        if not path.is_file():
            raise _missing("debian-docs", path)
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
            texts += [p for p in reflow(handle.read()).splitlines() if len(p) > 1]
    return texts


def export(path: str) -> dict:
    """Write every non-KJV row to a gzip JSON-lines file (for machines without apt); returns counts."""
    rows = debian_rows()
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=9) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        source = counts.setdefault(row["source"], {"rows": 0, "characters": 0})
        source["rows"] += 1
        source["characters"] += len(row["text"])
    return counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("export", help="write the Debian sources to one .jsonl.gz file")
    write.add_argument("path")
    commands.add_parser("stats", help="rows and characters per source and split")
    args = parser.parse_args(argv)
    if args.command == "export":
        counts = export(args.path)
        print(json.dumps({"file": args.path, "bytes": Path(args.path).stat().st_size, "sources": counts}, indent=1))
        return
    for name in DATASETS:
        data = load_english_dataset(name)
        for split, rows in data.items():
            by_source: dict[str, int] = {}
            for source, text in zip(rows["source"], rows["text"]):
                by_source[source] = by_source.get(source, 0) + len(text)
            print(name, split, len(rows), "rows", json.dumps(by_source))


if __name__ == "__main__":
    sys.exit(main())
