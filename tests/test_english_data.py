"""examples/astra_examples/english.py on tiny stand-ins of the Debian files: dictd parsing, splits, export round trip."""

import gzip
from pathlib import Path

import pytest
from test_data import kjv_text

from astra_examples import data

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def b64_digits(number: int) -> str:
    digits = ""
    while True:
        number, rest = divmod(number, 64)
        digits = B64[rest] + digits
        if number == 0:
            return digits


def write_dictd(folder: Path, name: str, entries: list[tuple[str, str]]) -> None:
    """A dictd database: ``name.dict.dz`` (gzip) and ``name.index`` (headword, offset, length in dictd base 64)."""
    body, index, offsets = b"", [], {}
    for headword, text in [("00-database-info", "about this database\n"), *entries]:
        encoded = (text + "\n").encode()
        offsets[headword] = len(body)
        index.append(f"{headword}\t{b64_digits(len(body))}\t{b64_digits(len(encoded))}")
        body += encoded
    first = entries[0][0]  # a second headword for the first entry: read once
    index.append(f"{first}-alias\t{b64_digits(offsets[first])}\t{b64_digits(5)}")
    with gzip.open(folder / f"{name}.dict.dz", "wb") as handle:
        handle.write(body)
    (folder / f"{name}.index").write_text("\n".join(sorted(index)) + "\n")


@pytest.fixture
def english(tmp_path, monkeypatch):
    from astra_examples import english as english_data

    dicts, fortunes, docs = tmp_path / "dictd", tmp_path / "fortunes", tmp_path / "doc"
    for folder in (dicts, fortunes, docs):
        folder.mkdir()
    entries = [(f"word{i}", f"Word{i} \\Word{i}\\, n.\n   Meaning number {i}.\n   [1913 Webster]") for i in range(40)]
    write_dictd(dicts, "gcide", entries)
    for name in ("foldoc", "jargon", "devil"):
        write_dictd(dicts, name, [(f"{name}{i}", f"{name} entry {i}\n  continued") for i in range(20)])
    (fortunes / "wisdom").write_text("A fortune.\n%\nAnother\n  fortune.\n%\n")
    (fortunes / "wisdom.dat").write_bytes(b"\x00\x01binary")
    (docs / "constitution.txt.gz").write_bytes(gzip.compress(b"Article one.\n\nArticle two\ncontinues.\n"))
    monkeypatch.setattr(english_data, "DICT_DIR", dicts)
    monkeypatch.setattr(english_data, "FORTUNE_DIR", fortunes)
    monkeypatch.setattr(english_data, "DEBIAN_DOC_DIR", docs)
    monkeypatch.setattr(english_data, "DEBIAN_DOCS", ("constitution.txt.gz",))
    monkeypatch.setattr(english_data, "GCIDE_EVERY", 2)
    kjv = tmp_path / "kjv.txt"
    kjv.write_text(kjv_text(40))
    monkeypatch.setenv(data.KJV_TEXT_ENV, str(kjv))
    monkeypatch.delenv(english_data.ENGLISH_ENV, raising=False)
    return english_data


def test_dictd_entries_are_read_once_in_order_with_markup_removed(english):
    texts = english.dict_entries("gcide", clean=english.clean_gcide)
    assert len(texts) == 40  # the alias and the 00-database entry are not extra rows
    assert texts[3] == "Word3 , n. Meaning number 3."
    assert english.dict_entries("gcide", every=2, clean=english.clean_gcide)[1] == texts[2]


def test_english_mix_and_out_of_domain_sets(english):
    mix = english.load_english_dataset("english")
    ood = english.load_english_dataset("english-ood")
    assert set(mix) == {"train", "validation", "test"} and set(ood) == {"test"}
    sources = set(mix["train"]["source"])
    assert sources == {"kjv", "gcide", "foldoc", "jargon", "fortunes"}
    assert set(ood["test"]["source"]) == {"devil", "debian-docs"}
    assert not set(mix["train"]["text"]) & set(ood["test"]["text"])
    assert {"A fortune.", "Another\n  fortune."} <= set(mix["train"]["text"])
    # every 20th entry of a source is test, the one before it validation
    foldoc_test = [t for t, s in zip(mix["test"]["text"], mix["test"]["source"]) if s == "foldoc"]
    foldoc_validation = [t for t, s in zip(mix["validation"]["text"], mix["validation"]["source"]) if s == "foldoc"]
    assert foldoc_test == ["foldoc entry 19 continued"] and foldoc_validation == ["foldoc entry 18 continued"]
    kjv = data.load_kjv()
    assert [t for t, s in zip(mix["test"]["text"], mix["test"]["source"]) if s == "kjv"] == kjv["test"]["text"]


def test_export_round_trip(english, tmp_path, monkeypatch):
    direct = english.load_english_dataset("english")
    counts = english.export(str(tmp_path / "english.jsonl.gz"))
    assert counts["gcide"]["rows"] == 20 and counts["fortunes"]["rows"] == 2
    monkeypatch.setattr(english, "DICT_DIR", tmp_path / "nowhere")  # the export alone must be enough
    monkeypatch.setenv(english.ENGLISH_ENV, str(tmp_path / "english.jsonl.gz"))
    exported = english.load_english_dataset("english")
    for split in direct:
        assert exported[split]["text"] == direct[split]["text"]


def test_missing_package_is_named(english, tmp_path, monkeypatch):
    monkeypatch.setattr(english, "DICT_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="apt-get install dict-gcide"):
        english.load_english_dataset("english")
    with pytest.raises(ValueError, match="english dataset must be one of"):
        english.load_english_dataset("wikipedia")
