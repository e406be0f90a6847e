"""Corpus readers: files, globs, Python trees, tabular files, HF datasets, and the built-in stdlib and fortunes."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import codecs  # noqa: E402
import json  # noqa: E402

import pytest  # noqa: E402

from pretag.corpus import open_corpus, parse_fortunes  # noqa: E402


def _files(tmp_path):
    d = tmp_path / "src"
    (d / "pkg" / "tests").mkdir(parents=True)
    (d / "a.py").write_text("x = 1\n")
    (d / "pkg" / "b.py").write_text("y = 2\n")
    (d / "pkg" / "tests" / "test_b.py").write_text("assert True\n")
    (d / "notes.md").write_text("# notes\n")
    (d / "empty.py").write_text("")
    (d / "blank.txt").write_text("  \n\n")
    (d / "bin.py").write_bytes(b"\x00\xff\x00")
    (d / "latin.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    (d / ".hidden").mkdir()
    (d / ".hidden" / "h.py").write_text("z = 3\n")
    return d


def test_directory_reads_text_files_and_counts_bad_ones(tmp_path):
    d = _files(tmp_path)
    c = open_corpus(str(d))
    docs = list(c)
    assert [x.id for x in docs] == ["a.py", "notes.md", "pkg/b.py", "pkg/tests/test_b.py"]
    assert docs[0].text == "x = 1\n" and docs[0].source == str(d / "a.py")
    r = c.report()
    assert r["skipped"] == {"binary": 1, "empty": 2, "not_utf8": 1} and r["skipped_total"] == 4
    assert "latin.py" in r["skipped_examples"]["not_utf8"]
    list(c)  # iterating again does not double the counts
    assert c.report()["skipped_total"] == 4


def test_fallback_encoding_decodes_instead_of_skipping(tmp_path):
    c = open_corpus(str(_files(tmp_path)), fallback_encoding="latin-1")
    docs = {x.id: x.text for x in c}
    assert docs["latin.py"] == "s = 'café'\n" and c.stats["decoded_with_fallback"] == 1
    with pytest.raises(ValueError, match="unknown fallback encoding"):
        open_corpus(str(tmp_path), fallback_encoding="klingon")


def test_python_tree_glob_and_exclude(tmp_path):
    d = _files(tmp_path)
    ids = [x.id for x in open_corpus(f"python:{d}", exclude=["*/tests/*"])]
    assert ids == ["a.py", "pkg/b.py"]
    ids = [x.id for x in open_corpus(f"python:{d}", exclude=["b.py"])]  # a bare name matches the file name
    assert ids == ["a.py", "pkg/tests/test_b.py"]
    globbed = [x.id for x in open_corpus(str(d / "**" / "b*.py"))]
    assert globbed == [str(d / "pkg" / "b.py")]


def test_tabular_sources_use_the_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": "r1", "body": "first doc", "lang": "en"}, {"id": "r2", "body": "", "lang": "en"},
            {"id": "r3", "body": "third", "lang": "fr"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.csv").write_text("id,body,lang\n" + "".join(f"{r['id']},{r['body']},{r['lang']}\n" for r in rows))
    for name in ("d.jsonl", "d.parquet", "d.csv"):
        c = open_corpus(str(tmp_path / name), text_column="body")
        docs = list(c)
        assert [(x.id, x.text, x.fields) for x in docs] == [("r1", "first doc", {"lang": "en"}),
                                                         ("r3", "third", {"lang": "fr"})], name
        assert c.report()["skipped"] == {"empty": 1}
    with pytest.raises(ValueError, match=r"no text column 'text'; columns: \['body', 'id', 'lang'\]"):
        list(open_corpus(str(tmp_path / "d.jsonl")))


def test_hf_dataset_on_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["one", "two"], "label": [0, 1]}).save_to_disk(str(tmp_path / "ds"))
    docs = list(open_corpus(str(tmp_path / "ds")))
    assert [(x.id, x.text, x.fields) for x in docs] == [("ds#0", "one", {"label": 0}), ("ds#1", "two", {"label": 1})]


def test_unknown_source_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="corpus 'nowhere/x' not found.*built-in corpus"):
        open_corpus("nowhere/x")


def test_stdlib_leaves_out_tests_and_codec_tables_by_default():
    c = open_corpus("stdlib")
    ids = [x.id for x in c]
    assert "os.py" in ids and "asyncio/events.py" in ids
    assert not any(i.startswith(("test/", "encodings/")) or "/tests/" in i or "site-packages" in i for i in ids)
    assert "left out" in c.report()["notes"][0] and "encodings/" in c.report()["notes"][0]
    every = [x.id for x in open_corpus("stdlib", include_all=True)]
    assert "encodings/cp1252.py" in every and any(i.startswith("test/") for i in every)
    assert not any("site-packages" in i for i in every)


def test_parse_fortunes():
    text = "%% $FreeBSD$\nfirst\nline\n%\nsecond\n%\n\n%\nthird"
    assert parse_fortunes(text) == ["first\nline\n", "second\n", "third"]


def test_fortunes_are_decoded_labeled_and_deduplicated():
    c = open_corpus("fortunes")
    docs = list(c)
    r = c.report()
    assert r["files"] >= 30 and r["items"] == len(docs) + r["duplicates"] and r["duplicates"] > 0
    keys = [" ".join(d.text.split()) for d in docs]
    assert len(set(keys)) == len(keys)
    offensive = [d for d in docs if d.fields["offensive"] == 1]
    assert 0 < len(offensive) < len(docs)
    # ROT13 decoded: offensive fortunes read as English ("the" is common), their encoded form does not
    the = sum(" the " in d.text for d in offensive) / len(offensive)
    assert the > 0.2 and sum(" the " in codecs.decode(d.text, "rot13") for d in offensive) / len(offensive) < 0.05
    assert all(d.id.split("#")[0].endswith("-o") or d.fields["offensive"] for d in offensive)


def test_site_packages_corpus_leaves_out_tests_generated_files_and_duplicates(tmp_path, monkeypatch):
    import sysconfig

    from pretag import corpus as corpus_mod

    site = tmp_path / "site-packages"
    (site / "pkg" / "tests").mkdir(parents=True)
    (site / "vendored" / "pkg").mkdir(parents=True)
    (site / "pkg" / "core.py").write_text("def f(x):\n    return x\n")
    (site / "pkg" / "tests" / "test_core.py").write_text("def test_f():\n    pass\n")
    (site / "pkg" / "conftest.py").write_text("import pytest\n")
    (site / "pkg" / "msg_pb2.py").write_text("X = 1\n")
    (site / "pkg" / "_version.py").write_text("# file generated by setuptools-scm\n__version__ = '1'\n")
    (site / "pkg" / "doc.py").write_text('"""Reads files generated by older versions."""\nY = 2\n')  # prose: kept
    (site / "vendored" / "pkg" / "core.py").write_text("def f(x):\n    return x\n")  # exact duplicate
    real = sysconfig.get_paths
    monkeypatch.setattr(corpus_mod.sysconfig, "get_paths", lambda: {**real(), "purelib": str(site),
                                                                       "platlib": str(site)})
    c = corpus_mod.open_corpus("site-packages")
    assert sorted(d.id for d in c) == ["pkg/core.py", "pkg/doc.py"]
    r = c.report()
    assert r["skipped"] == {"duplicate": 1, "generated": 1} and r["excluded"] == 3
    assert sorted(d.id for d in c) == ["pkg/core.py", "pkg/doc.py"]  # a second pass reads the same (not "duplicates")
