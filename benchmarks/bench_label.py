"""Labeling throughput against calling the underlying libraries directly (run by hand, not in tests).

    python benchmarks/bench_label.py               # both parts
    python benchmarks/bench_label.py --part pep8   # PEP8 on the stdlib: pretag label (1 and 2 procs) vs pycodestyle
    python benchmarks/bench_label.py --part fortunes --limit 5000
    python benchmarks/bench_label.py --part codecs # share of PEP8-bad lines in encodings/ (not a timing)

PEP8: lines/s of ``label_corpus("stdlib", "pep8")`` (reading, segmenting, scoring, Parquet, summary) against
``pycodestyle.Checker(path).check_all()`` on the same files in one process. Fortunes: segments/s of labeling
profanity + PII + sentiment per sentence against the three libraries called directly on the same (pre-cut)
sentences; the sentence splitting (pysbd) is timed separately because the direct baseline does not include it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretag.corpus import open_corpus  # noqa: E402
from pretag.label import label_corpus  # noqa: E402
from pretag.schema import schema_from_dict  # noqa: E402
from pretag.segment import segment  # noqa: E402


def _spin(_: int = 0) -> float:
    t = time.perf_counter()
    x = 0
    for i in range(10_000_000):
        x += i
    return time.perf_counter() - t


def parallel_capacity() -> float:
    """How much faster two CPU-bound processes finish than one after the other on this machine *right now*:
    ~2.0 on two idle cores, ~1.0 when other jobs leave one core free. Read the --num-proc 2 speed-up against it."""
    import multiprocessing as mp

    one = _spin()
    with mp.get_context("spawn").Pool(2) as pool:
        pool.map(_spin, [0, 0])  # warm the workers
        t = time.perf_counter()
        pool.map(_spin, [0, 0])
        both = time.perf_counter() - t
    return 2 * one / both


def bench_pep8(limit: int | None) -> dict:
    import pycodestyle

    docs = list(open_corpus("stdlib"))[:limit]
    lines = sum(len(segment(d.text, "lines")) for d in docs)
    options = pycodestyle.StyleGuide(quiet=True).options
    t = time.perf_counter()
    errors = sum(pycodestyle.Checker(d.source, options=options).check_all() for d in docs)
    direct = time.perf_counter() - t
    res = {"files": len(docs), "lines": lines, "pycodestyle_errors": errors,
           "direct_lines_per_s": lines / direct, "direct_s": direct}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 2):
            t = time.perf_counter()
            s = label_corpus("stdlib", "pep8", Path(tmp) / f"p{n}", num_proc=n, limit=limit, progress=False)
            dt = time.perf_counter() - t
            assert s["segments"] == lines, (s["segments"], lines)
            res[f"pretag_np{n}_s"] = dt
            res[f"pretag_np{n}_lines_per_s"] = lines / dt
            res[f"bad_fraction_np{n}"] = s["attributes"]["pep8"]["tag_fraction"]["bad"]
    res["ratio_np1_vs_direct"] = res["pretag_np1_lines_per_s"] / res["direct_lines_per_s"]
    res["speedup_np2_vs_np1"] = res["pretag_np1_s"] / res["pretag_np2_s"]
    res["machine_2proc_capacity"] = parallel_capacity()
    return res


FORTUNE_SCHEMA = {"name": "fortunes3", "segmenter": "sentences", "attributes": [
    {"name": "profanity", "scorer": "profanity", "threshold": 0.5},
    {"name": "pii", "scorer": "pii", "threshold": 0},
    {"name": "sentiment", "scorer": "sentiment", "threshold": -0.3, "direction": "higher_is_better"},
]}


def bench_fortunes(limit: int | None) -> dict:
    import scrubadub
    from profanity_check import predict_prob
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    docs = list(open_corpus("fortunes"))[:limit]
    t = time.perf_counter()
    segs = [s for d in docs for s in segment(d.text, "sentences")]
    seg_s = time.perf_counter() - t
    t = time.perf_counter()
    predict_prob(segs)
    scrubber = scrubadub.Scrubber()
    [len(list(scrubber.iter_filth(s))) for s in segs]
    vader = SentimentIntensityAnalyzer()
    [vader.polarity_scores(s)["compound"] for s in segs]
    direct = time.perf_counter() - t
    res = {"documents": len(docs), "segments": len(segs), "segmentation_s": seg_s, "direct_scorers_s": direct,
           "direct_segments_per_s": len(segs) / direct,
           "direct_with_segmentation_segments_per_s": len(segs) / (direct + seg_s)}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 2):
            t = time.perf_counter()
            s = label_corpus("fortunes", schema_from_dict(FORTUNE_SCHEMA), Path(tmp) / f"f{n}", num_proc=n,
                             limit=limit, progress=False)
            dt = time.perf_counter() - t
            assert s["segments"] == len(segs)
            res[f"pretag_np{n}_s"] = dt
            res[f"pretag_np{n}_segments_per_s"] = len(segs) / dt
    res["ratio_np1_vs_direct_with_segmentation"] = (res["pretag_np1_segments_per_s"]
                                                    / res["direct_with_segmentation_segments_per_s"])
    res["ratio_np1_vs_direct_scorers_only"] = res["pretag_np1_segments_per_s"] / res["direct_segments_per_s"]
    res["speedup_np2_vs_np1"] = res["pretag_np1_s"] / res["pretag_np2_s"]
    return res


def bench_codecs() -> dict:
    """Where the stdlib's PEP8-bad lines are: encodings/ codec tables vs the default stdlib corpus."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    with tempfile.TemporaryDirectory() as tmp:
        enc = label_corpus(f"python:{root / 'encodings'}", "pep8", Path(tmp) / "enc", num_proc=2, progress=False)
        rest = label_corpus("stdlib", "pep8", Path(tmp) / "rest", num_proc=2, progress=False)
    bad = {k: s["segments"] * s["attributes"]["pep8"]["tag_fraction"]["bad"] for k, s in
           (("encodings", enc), ("stdlib_default", rest))}
    return {"encodings_lines": enc["segments"], "encodings_bad_fraction": bad["encodings"] / enc["segments"],
            "default_lines": rest["segments"], "default_bad_fraction": bad["stdlib_default"] / rest["segments"],
            "encodings_share_of_bad_lines": bad["encodings"] / (bad["encodings"] + bad["stdlib_default"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("pep8", "fortunes", "codecs", "all"), default="all")
    ap.add_argument("--limit", type=int, default=None, help="first N documents only")
    args = ap.parse_args()
    out = {"cpus": os.cpu_count(), "machine_2proc_capacity": parallel_capacity()}
    print(json.dumps(out), flush=True)
    if args.part in ("pep8", "all"):
        out["pep8_stdlib"] = bench_pep8(args.limit)
        print(json.dumps(out["pep8_stdlib"], indent=2), flush=True)
    if args.part in ("fortunes", "all"):
        out["fortunes_profanity_pii_sentiment"] = bench_fortunes(args.limit)
        print(json.dumps(out["fortunes_profanity_pii_sentiment"], indent=2), flush=True)
    if args.part == "codecs":
        print(json.dumps(bench_codecs(), indent=2))


if __name__ == "__main__":
    main()
