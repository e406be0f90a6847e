"""Labeling: label_document, the Parquet format, label_corpus (sharding, resume after SIGKILL, processes, Ray)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from pretag.label import label_corpus, label_document, load_labeled, selected  # noqa: E402
from pretag.schema import load_schema, schema_from_dict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KW_SCHEMA = {"name": "kw", "segmenter": "lines", "attributes": [
    {"name": "rude", "scorer": {"type": "keywords", "words": ["damn", "heck"]}, "threshold": 0},
    {"name": "long", "scorer": {"type": "regex", "patterns": [r"\w{8,}"]}, "bands": [1, 3]},
]}


def test_label_document_pep8_line_by_line():
    doc = label_document("pep8", "import os,sys\nx = 1\n")
    assert doc.segments == ["import os,sys\n", "x = 1\n"]
    assert doc.scores["pep8"] == [pytest.approx(2 / 14), 0.0]  # E401 + E231 over 14 characters
    assert doc.tags["pep8"] == ["bad", "good"]


def test_label_document_several_attributes_and_document_level():
    schema = schema_from_dict({"name": "t", "segmenter": "sentences", "attributes": [
        {"name": "off", "level": "document", "scorer": {"type": "field", "field": "offensive"}, "threshold": 0.5},
        *KW_SCHEMA["attributes"],
    ]})
    doc = label_document(schema, "Oh damn it. Extraordinarily complicated sentence here.", {"offensive": True})
    assert doc.segments == ["Oh damn it. ", "Extraordinarily complicated sentence here."]
    assert doc.scores["off"] == [1.0] and doc.tags["off"] == ["off:bad"]
    assert doc.tags["rude"] == ["rude:bad", "rude:good"]
    assert doc.scores["long"] == [0.0, 3.0] and doc.tags["long"] == ["long:0-1", "long:3+"]
    pieces = schema.render_pieces(doc.segments, doc.tags)
    assert "".join(p.text for p in pieces if p.tag is None) == doc.text  # tags are separate pieces, text intact


def test_tag_lookalike_text_is_just_text():
    doc = label_document("pep8", "x = '<|good|>'\n")
    assert doc.tags["pep8"] == ["good"] and doc.segments == ["x = '<|good|>'\n"]


def test_partial_labeling_is_deterministic_and_near_fraction():
    picks = [selected("doc", i, 0.3) for i in range(4000)]
    assert 0.27 < sum(picks) / len(picks) < 0.33
    assert picks == [selected("doc", i, 0.3) for i in range(4000)]
    schema = schema_from_dict({**KW_SCHEMA, "label_fraction": 0.5})
    doc = label_document(schema, "".join(f"line {i} damn\n" for i in range(200)))
    tagged = [t is not None for t in doc.tags["rude"]]
    assert 60 < sum(tagged) < 140
    assert tagged == [s is not None for s in doc.scores["rude"]]  # unscored = untagged
    assert tagged == [t is not None for t in doc.tags["long"]]  # the same segments for every attribute


def _write_corpus(d: Path, n: int = 6) -> Path:
    d.mkdir()
    for i in range(n):
        (d / f"f{i}.txt").write_text(f"hello {i}\ndamn line {i}\nextraordinary words {i}\n")
    (d / "empty.txt").write_text("")
    (d / "bin.dat").write_bytes(b"\x00\x01\x02binary")
    (d / "latin.txt").write_bytes("caf\xe9 damn\n".encode("latin-1"))
    return d


def _schema_file(tmp: Path, d: dict) -> Path:
    p = tmp / "schema.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def test_shard_columns_and_reads_equal_the_pyarrow_calls_they_replace(tmp_path):
    # arrow_column / read_shard stand in for pa.array / pq.read_table (which import pandas); pyarrow is the oracle
    import math

    import pyarrow as pa

    from pretag.label import arrow_column, arrow_schema, read_shard

    schema = schema_from_dict(KW_SCHEMA)
    rows = [
        {"id": "a", "source": "s/é.py", "text": "x\ny  ", "segments": ["x\n", "y  "], "fields": "{}",
         "score__rude": [0.0, None], "tag__rude": ["good", None], "score__long": [1.5, -2.0], "tag__long": [None, "x"]},
        {"id": "", "source": "", "text": "", "segments": [], "fields": '{"k": 1}',
         "score__rude": [], "tag__rude": [], "score__long": [], "tag__long": []},
        {"id": "c" * 9, "source": "\u2603\U0001f600", "text": "z", "segments": ["z"], "fields": "{}",
         "score__rude": [1e-300], "tag__rude": ["bad"], "score__long": [None], "tag__long": [None]},
    ] * 3  # 9 rows: validity bitmaps cross a byte
    aschema = arrow_schema(schema)
    oracle = pa.Table.from_pylist(rows, schema=aschema)
    built = pa.Table.from_arrays([arrow_column([r[f.name] for r in rows], f.type) for f in aschema], schema=aschema)
    built.validate(full=True)
    assert built.equals(oracle) and built.to_pylist() == rows
    nan = arrow_column([[math.nan, None]], pa.list_(pa.float64())).to_pylist()[0]
    assert math.isnan(nan[0]) and nan[1] is None
    pq.write_table(built, tmp_path / "s.parquet")
    assert read_shard(tmp_path / "s.parquet").equals(pq.read_table(tmp_path / "s.parquet"))
    assert read_shard(tmp_path / "s.parquet", ["tag__long"]).equals(pq.read_table(tmp_path / "s.parquet",
                                                                                    columns=["tag__long"]))


def test_label_corpus_round_trip_and_format(tmp_path):
    src = _write_corpus(tmp_path / "c")
    out = tmp_path / "out"
    summary = label_corpus(str(src), _schema_file(tmp_path, KW_SCHEMA), out, shard_size=4, progress=False)
    assert summary["documents"] == 6 and summary["segments"] == 18
    assert summary["corpus"]["skipped"] == {"binary": 1, "empty": 1, "not_utf8": 1}
    # "rude" is the schema's only binary attribute, so its tags are plain good/bad
    assert summary["attributes"]["rude"]["tag_fraction"] == {"good": pytest.approx(2 / 3), "bad": pytest.approx(1 / 3)}
    assert json.loads((out / "summary.json").read_text())["documents"] == 6
    assert sorted(p.name for p in out.glob("part-*.parquet")) == ["part-00000.parquet", "part-00001.parquet"]
    table = pq.read_table(out / "part-00000.parquet")
    assert table.column_names == ["id", "source", "text", "segments", "fields", "score__rude", "tag__rude",
                                  "score__long", "tag__long"]
    assert str(table.schema.field("score__rude").type) == "list<element: double>"
    schema, rows = load_labeled(out)
    assert schema.name == "kw" and [r["id"] for r in rows] == [f"f{i}.txt" for i in range(6)]
    for r in rows:
        assert "".join(r["segments"]) == r["text"] == (src / r["id"]).read_text()
        assert r["tag__rude"] == ["good", "bad", "good"] and r["fields"] == {}
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("parquet", data_files=sorted(map(str, out.glob("part-*.parquet"))), split="train")
    assert ds.num_rows == 6 and ds[0]["tag__rude"] == rows[0]["tag__rude"]


def test_fallback_encoding_and_limit_and_exclude(tmp_path):
    src = _write_corpus(tmp_path / "c")
    s = label_corpus(str(src), _schema_file(tmp_path, KW_SCHEMA), tmp_path / "o", fallback_encoding="latin-1",
                     exclude=["f1.*", "f2*"], limit=3, progress=False)
    _, rows = load_labeled(tmp_path / "o")
    assert [r["id"] for r in rows] == ["f0.txt", "f3.txt", "f4.txt"]
    s = label_corpus(str(src), _schema_file(tmp_path, KW_SCHEMA), tmp_path / "o2", fallback_encoding="latin-1",
                     progress=False)
    assert s["corpus"]["decoded_with_fallback"] == 1 and s["documents"] == 7


def test_restart_with_other_options_is_refused(tmp_path):
    src = _write_corpus(tmp_path / "c")
    schema = _schema_file(tmp_path, KW_SCHEMA)
    label_corpus(str(src), schema, tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="holds a different run"):
        label_corpus(str(src), schema, tmp_path / "o", shard_size=2, progress=False)
    s = label_corpus(str(src), schema, tmp_path / "o", shard_size=2, overwrite=True, progress=False)
    assert s["shards"]["total"] == 3


def test_bad_scorer_options_are_all_reported_before_work(tmp_path):
    bad = {"name": "b", "attributes": [
        {"name": "a", "scorer": {"type": "regex", "patern": "x"}, "threshold": 0},
        {"name": "b", "scorer": {"type": "nope"}, "threshold": 0},
    ]}
    with pytest.raises(ValueError) as e:
        label_corpus("stdlib", schema_from_dict(bad), tmp_path / "o", progress=False)
    msg = str(e.value)
    assert "no option 'patern'" in msg and "needs option 'patterns'" in msg and "unknown scorer type 'nope'" in msg
    assert not (tmp_path / "o").exists()


def test_num_proc_2_equals_1(tmp_path):
    src = _write_corpus(tmp_path / "c")
    schema = _schema_file(tmp_path, KW_SCHEMA)
    label_corpus(str(src), schema, tmp_path / "a", shard_size=2, progress=False)
    label_corpus(str(src), schema, tmp_path / "b", shard_size=2, num_proc=2, progress=False)
    assert load_labeled(tmp_path / "a")[1] == load_labeled(tmp_path / "b")[1]


SLOW_SCORER = '''
import os, time
def score(texts):
    with open(os.environ["PRETAG_TEST_LOG"], "a") as f:
        f.write("".join(t.strip() + "\\n" for t in texts))
    time.sleep(0.25)
    return [float("damn" in t) for t in texts]
'''


def _cmd(src, schema, out):
    return [sys.executable, "-m", "pretag", "label", str(src), "--schema", str(schema), "--out", str(out),
            "--shard-size", "1", "--no-progress"]


def test_sigkill_and_resume_equals_uninterrupted_run(tmp_path):
    src = _write_corpus(tmp_path / "c", n=10)
    (tmp_path / "slow.py").write_text(textwrap.dedent(SLOW_SCORER))
    schema = _schema_file(tmp_path, {"name": "slow", "segmenter": "lines", "attributes": [
        {"name": "rude", "scorer": {"type": "python", "function": f"{tmp_path / 'slow.py'}:score"}, "threshold": 0},
    ]})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    proc = subprocess.Popen(_cmd(src, schema, out), env={**env, "PRETAG_TEST_LOG": str(tmp_path / "log1")},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while len(list(out.glob("part-*.parquet"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(out.glob("part-*.parquet"))
    assert 3 <= len(finished) < 10, "killed mid-run"
    first_texts = {t.strip() for p in finished for t in pq.read_table(p).column("segments").to_pylist()[0]}
    r = subprocess.run(_cmd(src, schema, out), env={**env, "PRETAG_TEST_LOG": str(tmp_path / "log2")},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rescored = set((tmp_path / "log2").read_text().split("\n")) & first_texts
    assert rescored == set(), "finished shards were scored again"
    subprocess.run(_cmd(src, schema, tmp_path / "ref"), env={**env, "PRETAG_TEST_LOG": str(tmp_path / "log3")},
                   check=True, capture_output=True)
    assert load_labeled(out)[1] == load_labeled(tmp_path / "ref")[1]
    assert not list(out.glob(".*tmp*")), "no temporary files left behind"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards"]["resumed"] == len(finished) and summary["documents"] == 10


@pytest.mark.slow
def test_ray_engine_matches_local(tmp_path):
    pytest.importorskip("ray")
    src = _write_corpus(tmp_path / "c")
    schema = _schema_file(tmp_path, KW_SCHEMA)
    label_corpus(str(src), schema, tmp_path / "a", shard_size=2, progress=False)
    s = label_corpus(str(src), schema, tmp_path / "b", shard_size=2, engine="ray", num_proc=2, progress=False)
    import ray

    ray.shutdown()
    assert s["engine"] == "ray" and s["shards"]["written"] == 3
    assert load_labeled(tmp_path / "a")[1] == load_labeled(tmp_path / "b")[1]


def test_shipped_schemas_have_valid_scorers():
    from pretag.label import schema_scorer_problems
    from pretag.schema import shipped_schemas

    for name in shipped_schemas():
        assert schema_scorer_problems(load_schema(name)) == [], name


def test_relabeling_an_edited_source_relabels_the_changed_shards(tmp_path, caplog):
    """Re-running the same command after editing a file kept the old shard's labels without a word."""
    src = _write_corpus(tmp_path / "c")
    schema = _schema_file(tmp_path, KW_SCHEMA)
    out = tmp_path / "o"
    label_corpus(str(src), schema, out, shard_size=2, progress=False)
    s = label_corpus(str(src), schema, out, shard_size=2, progress=False)
    assert s["shards"] == {"total": 3, "written": 0, "resumed": 3, "relabeled": 0, "removed": 0}
    (src / "f3.txt").write_text("heck heck\n")  # shard 1 holds f2, f3
    with caplog.at_level("WARNING", logger="pretag.label"):
        s = label_corpus(str(src), schema, out, shard_size=2, progress=False)
    assert s["shards"]["relabeled"] == 1 and s["shards"]["resumed"] == 2
    assert any("source changed" in n for n in s["corpus"]["notes"]) and "relabeled 1 shard" in caplog.text
    _, rows = load_labeled(out)
    f3 = next(r for r in rows if r["id"] == "f3.txt")
    assert f3["text"] == "heck heck\n" and f3["tag__rude"] == ["bad"]
    for i in (4, 5):
        (src / f"f{i}.txt").unlink()  # the source shrinks: the last shard's documents are gone
    s = label_corpus(str(src), schema, out, shard_size=2, progress=False)
    assert s["shards"]["removed"] == 1 and s["documents"] == 4
    assert sorted(r["id"] for r in load_labeled(out)[1]) == ["f0.txt", "f1.txt", "f2.txt", "f3.txt"]


def test_label_refuses_a_model_dir_and_a_file_as_out(tmp_path):
    src = _write_corpus(tmp_path / "c")
    schema = _schema_file(tmp_path, KW_SCHEMA)
    model = tmp_path / "model"
    model.mkdir()
    (model / "pretag_train.yaml").write_text("config: {}\n")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="already holds a pretag model"):
            label_corpus(str(src), schema, model, overwrite=overwrite, progress=False)
    assert sorted(p.name for p in model.iterdir()) == ["pretag_train.yaml"]
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        p = subprocess.run([sys.executable, "-m", "pretag", "label", str(src), "--schema", str(schema), "--out",
                            str(out)], capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert "is a file" in p.stderr and len(p.stderr.strip().splitlines()) == 1


# ---- thresholds at a fraction of the corpus (the paper's risk-averse "safest 5 % are good") ---------------------
FRACTION_SCHEMA = {"name": "frac", "segmenter": "lines", "attributes": [
    {"name": "long", "scorer": {"type": "regex", "patterns": [r"\w{6,}"]}, "threshold": 2, "good_fraction": 0.3},
]}


def _fraction_corpus(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for f in range(4):  # line i of file f holds (f + i) % 5 long words: scores 0..4, each a fifth of the lines
        lines = [" ".join(["abcdefgh"] * ((f + i) % 5) + ["ok"]) + "\n" for i in range(25)]
        (src / f"f{f}.txt").write_text("".join(lines))
    return src


def test_good_fraction_resolves_at_labeling_into_tags_schema_and_summary(tmp_path):
    src = _fraction_corpus(tmp_path)
    out = tmp_path / "out"
    summary = label_corpus(str(src), schema_from_dict(FRACTION_SCHEMA), out, shard_size=1, progress=False)
    # scores 0..4 in equal parts: the safest 30 % needs the cut at score 1 (0 and 1 are 40 % >= 30 %)
    assert summary["resolved_thresholds"] == {"long": {"good_fraction": 0.3, "tag_threshold": 1.0}}
    schema, rows = load_labeled(out)
    a = schema.attribute("long")
    assert a.tag_threshold == 1.0 and a.threshold == 2 and a.good_fraction == 0.3
    for r in rows:  # every shard was tagged with the corpus-wide cut, not a per-shard one
        assert r["tag__long"] == ["bad" if s > 1 else "good" for s in r["score__long"]]
    assert summary["attributes"]["long"]["tag_fraction"] == {"good": 0.4, "bad": 0.6}
    # evaluation keeps the natural threshold: a score of 2 is tagged bad for training but is not bad output
    assert a.tagged_bad(2.0) and not a.is_bad(2.0) and a.is_bad(3.0)
    # a rerun (resume) recomputes the same cut and keeps the same tags
    again = label_corpus(str(src), schema_from_dict(FRACTION_SCHEMA), out, shard_size=1, progress=False)
    assert again["resolved_thresholds"] == summary["resolved_thresholds"]
    assert load_labeled(out)[1] == rows


def test_bad_fraction_and_higher_is_better():
    a = schema_from_dict({"attributes": [{"name": "s", "scorer": "sentiment", "direction": "higher_is_better",
                                          "bad_fraction": 0.25}]}).attributes[0]
    assert a.unresolved and a.value_of(0.3) is None  # not tagged before the corpus is seen
    a.tag_threshold = a.resolve_fraction([float(i) for i in range(100)])
    assert a.tag_threshold == 24.0  # bad iff below the cut: 0..23, at most the worst 25 %
    assert [a.value_of(x) for x in (23.0, 24.0, 25.0)] == ["bad", "good", "good"]
    assert a.is_bad(23.0) and not a.is_bad(24.0)  # no natural threshold given: evaluation uses the resolved cut


@pytest.mark.parametrize("attr, message", [
    ({"good_fraction": 1.5, "threshold": 0.5}, "good_fraction must be a number strictly between 0 and 1"),
    ({"good_fraction": 0.1, "bad_fraction": 0.1}, "at most one of good_fraction or bad_fraction"),
    ({"bands": [1, 2], "good_fraction": 0.1}, "for binary attributes, not bands"),
    ({"threshold": float("nan")}, "threshold must be a finite number"),
])
def test_fraction_thresholds_are_validated(attr, message):
    with pytest.raises(ValueError, match=message):
        schema_from_dict({"attributes": [{"name": "t", "scorer": "profanity", **attr}]})


# ---- a real Ray cluster: a head and a worker node on loopback ------------------------------------------------------
NODE_SCORER = '''
import time
LOG = "{log}"
def score(texts):
    import ray
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    with open(LOG, "a") as f:  # which node scored (actors do not get the driver's environment)
        f.write(node + "\\n")
    time.sleep(0.3)
    return [float("damn" in t) for t in texts]
'''
WAIT_NODES = '''
import sys, time
import ray
ray.init(address="auto", log_to_driver=False, configure_logging=False)
deadline = time.time() + 120
while time.time() < deadline and sum(n["Alive"] for n in ray.nodes()) < int(sys.argv[1]):
    time.sleep(0.5)
sys.exit(0 if sum(n["Alive"] for n in ray.nodes()) >= int(sys.argv[1]) else 1)
'''


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayCluster:
    """``ray start --block`` nodes of 1 CPU each on 127.0.0.1, with a token of their own (not ~/.ray's).

    ``--block`` keeps each node's processes (GCS, raylet, workers) in one session led by the ``ray start`` process
    we started, so the cluster is ended by those ids — never ``ray stop --force``, which ends every Ray process on
    the machine, other users' clusters included."""

    def __init__(self, tmp: Path):
        import secrets
        import tempfile

        self.tmp, self.port, self.nodes = tmp, _free_port(), []
        self.temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's Unix socket paths must stay short
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                    "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": self.address, "HF_HUB_OFFLINE": "1"}

    def start_node(self, *args: str) -> subprocess.Popen:
        ray = Path(sys.executable).with_name("ray")
        log = open(self.tmp / f"node{len(self.nodes)}.log", "w")
        p = subprocess.Popen([str(ray), "start", "--block", "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
                              "--disable-usage-stats", *args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.nodes.append(p)
        return p

    def wait_nodes(self, n: int) -> None:
        r = subprocess.run([sys.executable, "-c", WAIT_NODES, str(n)], env=self.env, capture_output=True, text=True,
                           timeout=180)
        assert r.returncode == 0, f"the cluster has fewer than {n} live nodes:\n{r.stderr[-2000:]}"

    def __enter__(self) -> "RayCluster":
        self.start_node("--head", "--port", str(self.port), "--temp-dir", self.temp_dir,
                        "--include-dashboard", "false", "--ray-client-server-port", str(_free_port()))
        self.wait_nodes(1)
        self.start_node("--address", self.address)
        self.wait_nodes(2)
        return self

    def __exit__(self, *exc) -> None:
        import shutil

        for p in self.nodes:
            if p.poll() is None:
                p.terminate()  # `ray start --block` stops its node's processes on SIGTERM
        for p in self.nodes:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)  # whatever is left of that node's session
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _kill_worker_mid_job(cluster: RayCluster, cmd: list[str], out: Path, also_the_driver: bool) -> dict:
    """Run ``cmd`` on the cluster; once a shard is written, SIGKILL the newest worker node's raylet (and the driver,
    if asked: the whole job dies). Returns what happened."""
    import psutil

    t0 = time.time()
    job = subprocess.Popen(cmd, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while time.time() < t0 + 180 and job.poll() is None and not list(out.glob("part-*.parquet")):
            time.sleep(0.05)
        assert job.poll() is None, "the job ended before the kill: " + job.stdout.read()[-2000:]
        raylet = [c for c in psutil.Process(cluster.nodes[-1].pid).children(recursive=True) if c.name() == "raylet"]
        assert raylet, "no raylet under the worker node"
        written = len(list(out.glob("part-*.parquet")))
        raylet[0].kill()  # SIGKILL: the worker node and the actor on it are gone mid-job
        if also_the_driver:
            job.kill()
        try:
            code = job.wait(timeout=90)  # Ray may carry the job on with the head's CPU, or fail it
        except subprocess.TimeoutExpired:
            job.kill()
            code = "hung, killed"
    finally:
        if job.poll() is None:
            job.kill()
    return {"exit": code, "shards_at_kill": written, "shards_after": len(list(out.glob("part-*.parquet"))),
            "output": job.stdout.read()[-600:], "s": round(time.time() - t0, 1)}


@pytest.mark.slow
def test_ray_cluster_worker_killed_mid_job_then_rerun_equals_uninterrupted(tmp_path):
    """`pretag label --engine ray` on a real 2-node cluster (head + worker, 1 CPU each, loopback, RAY_ADDRESS set).
    A: the worker's raylet is SIGKILLed once the first shards are written; B: the worker and the driver are. After
    a replacement worker joins, the same command finishes (resumes) the job; both datasets equal an uninterrupted
    local run's."""
    pytest.importorskip("ray")
    pytest.importorskip("psutil")
    src = _write_corpus(tmp_path / "c", n=20)
    (tmp_path / "node.py").write_text(NODE_SCORER.format(log=tmp_path / "nodes"))
    schema = _schema_file(tmp_path, {"name": "slow", "segmenter": "lines", "attributes": [
        {"name": "rude", "scorer": {"type": "python", "function": f"{tmp_path / 'node.py'}:score"}, "threshold": 0},
    ]})
    ref = tmp_path / "ref"
    subprocess.run(_cmd(src, schema, ref), check=True, capture_output=True)  # uninterrupted, local engine
    report = {}
    with RayCluster(tmp_path) as cluster:
        for case, also_the_driver in (("A worker killed", False), ("B worker and driver killed", True)):
            out = tmp_path / case[0]
            cmd = [*_cmd(src, schema, out), "--engine", "ray", "--num-proc", "2"]
            first = _kill_worker_mid_job(cluster, cmd, out, also_the_driver)
            cluster.start_node("--address", cluster.address)  # a replacement worker joins
            cluster.wait_nodes(2)
            t = time.time()
            again = subprocess.run([*cmd, "--json"], env=cluster.env, capture_output=True, text=True, timeout=300)
            assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
            # the summary's JSON, then whatever Ray itself prints to stdout (e.g. a lagging-heartbeat notice)
            summary, _ = json.JSONDecoder().raw_decode(again.stdout, again.stdout.index("{"))
            assert summary["shards"]["resumed"] >= first["shards_at_kill"] >= 1
            assert summary["shards"]["resumed"] + summary["shards"]["written"] == summary["shards"]["total"]
            assert first["shards_at_kill"] < summary["shards"]["total"], "the kill must come mid-job"
            if also_the_driver:
                assert first["exit"] == -signal.SIGKILL and summary["shards"]["written"] >= 1
            assert load_labeled(out) == load_labeled(ref), case
            report[case] = {**{k: v for k, v in first.items() if k != "output"}, "rerun": summary["shards"],
                            "rerun_s": round(time.time() - t, 1)}
    # over the whole test (a kill can come before the worker's actor has scored anything, on a loaded machine, so
    # not per run): the scorer ran on more than one node of the cluster
    nodes = set((tmp_path / "nodes").read_text().split()) - {"local"}  # Ray node ids of the scorer calls
    assert len(nodes) >= 2, f"the cluster's nodes must have labeled shards: {nodes}"
    print("\nray cluster:", json.dumps(report, indent=1))
