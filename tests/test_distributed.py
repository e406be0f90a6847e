"""Distributed training on CPU: 2 processes (gloo, loopback) under torchrun and accelerate launch, against 1 process.

One launch of a small runner script trains every objective in turn (a handful of steps on the ``micro`` preset) and
records, per rank, the block indices its data loader read and a checksum of every parameter after training. The
same runner in one process is the reference. ``batch_size`` is the whole job's, so both runs take the same steps
on the same blocks; what may differ is the reduction (two half-batch means averaged by DDP instead of one mean over
the batch, which weighs a batch's padded block slightly differently) and the order of float additions.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import csv  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import psutil  # noqa: E402  (accelerate's dependency)
import pytest  # noqa: E402
import yaml  # noqa: E402

from pretag.schema import schema_from_dict  # noqa: E402
from pretag.train import last_checkpoint  # noqa: E402

TOY = {"name": "toy", "segmenter": "sentences", "attributes": [{"name": "tox", "scorer": "profanity",
                                                                  "threshold": 0.5}]}
GOOD = ["The cat sat on the mat. ", "Hello world, said the dog. ", "We like tea. ", "It rains today. "]
BAD = ["What a darn stupid thing! ", "Damn this crap. "]
# fp32, so the comparison measures the reduction and not bf16 rounding; batch 4 = 2 blocks on each of 2 ranks
SETS = {"model": "micro", "block_size": 32, "batch_size": 4, "vocab_size": 300, "logging_steps": 1,
        "eval_steps": 10, "save_steps": 4, "save_total_limit": 2, "precision": "fp32"}
MLE_STEPS = 30  # past the end of the first epoch (25 steps of 4 blocks), so the epoch boundary is covered
OTHER_STEPS = 4
REL = 1e-3  # per-step loss, 2 processes vs 1 (measured: 2.1e-4 at the step holding the padded block, else ~1e-7)

RUNNER = r'''
import json, os, sys, time
from pathlib import Path

import pretag.train as T

rank = int(os.environ.get("RANK", "0"))
seen, made, params = [], [], {}
init, getitem = T.BlockDataset.__init__, T.BlockDataset.__getitem__


def _init(self, blocks):
    init(self, blocks)
    self.role = "eval" if made else "train"  # train() builds the train set first, then the eval set
    made.append(self.role)


def _getitem(self, i):
    if self.role == "train":
        seen.append(int(i))
    return getitem(self, i)


T.BlockDataset.__init__, T.BlockDataset.__getitem__ = _init, _getitem
base = T._trainer_class


def _trainer_class():
    class Recording(base()):
        def training_step(self, *a, **k):
            time.sleep(float(os.environ.get("SLOW_STEP_S", "0")))  # lets a test kill the job mid-run
            return super().training_step(*a, **k)

        def train(self, *a, **k):
            r = super().train(*a, **k)
            m = self.accelerator.unwrap_model(self.model)
            params.update({n: p.detach().double().sum().item() for n, p in m.named_parameters()})
            return r
    return Recording


T._trainer_class = _trainer_class
for job in json.loads(sys.argv[1]):
    seen.clear(), made.clear(), params.clear()
    cfg = T.resolve_config(job["method"], sets=job["sets"], tokens=job["tokens"])
    T.train(cfg, job["data"], job["out"])
    rec = Path(job["out"], "ranks")
    rec.mkdir(exist_ok=True)
    (rec / f"{rank}.json").write_text(json.dumps({"train": seen, "params": params}))
T.end_distributed()  # as `pretag train` does: a rank left to exit with gloo's threads running can abort
'''


def make_dataset(path: Path, n_docs: int = 60, seed: int = 0) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    rows = []
    for i in range(n_docs):
        segs = [rng.choice(BAD if rng.random() < 0.3 else GOOD) for _ in range(5)]
        scores = [0.9 if s in BAD else 0.05 for s in segs]
        rows.append({"id": f"doc{i}", "source": "test", "text": "".join(segs), "segments": segs, "fields": "{}",
                     "score__tox": scores, "tag__tox": ["bad" if x > 0.5 else "good" for x in scores]})
    path.mkdir(parents=True, exist_ok=True)
    schema_from_dict(TOY).save(path / "schema.yaml")
    pq.write_table(pa.Table.from_pylist(rows), path / "part-00000.parquet")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1", **extra}


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args]


def accelerate_launch(*args: str) -> list[str]:
    # --multi_gpu picks accelerate's torchrun-based launcher; with no GPU, pretag trains on the CPU with gloo.
    # (--cpu would start ONE process whatever --num_processes says.)
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()), *args]


def _run(cmd: list[str], timeout: float = 240, **env) -> str:
    p = subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p.stdout


def _jobs(data: Path, root: Path) -> list[dict]:
    jobs = [{"method": "mle", "tokens": MLE_STEPS * 4 * 32, "sets": SETS, "data": str(data), "out": str(root / "mle")}]
    for m in ("filter", "conditional", "unlikelihood", "rwr", "awr", "conditional_ul"):
        jobs.append({"method": m, "tokens": OTHER_STEPS * 4 * 32, "sets": {**SETS, "eval_steps": 1000},
                     "data": str(data), "out": str(root / m)})
    return jobs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same jobs in 1 process and in 2 (torchrun); returns (data, one_root, two_root)."""
    tmp = tmp_path_factory.mktemp("dist")
    data = make_dataset(tmp / "toy")
    runner = tmp / "runner.py"
    runner.write_text(RUNNER)
    one, two = tmp / "one", tmp / "two"
    _run([sys.executable, str(runner), json.dumps(_jobs(data, one))])
    _run(torchrun(str(runner), json.dumps(_jobs(data, two))))
    return data, one, two


def _metric(out: Path, name: str) -> dict[int, float]:
    with (out / "metrics.csv").open() as f:
        return {int(r["step"]): float(r["value"]) for r in csv.DictReader(f) if r["name"] == name}


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / "ranks" / f"{r}.json").read_text()) for r in range(len(list((out / "ranks").iterdir())))]


def test_two_processes_follow_the_one_process_loss_curve(runs):
    _, one, two = runs
    a, b = _metric(one / "mle", "loss"), _metric(two / "mle", "loss")
    assert sorted(a) == sorted(b) == list(range(1, MLE_STEPS + 1))  # same steps: the batch is the job's
    for s in range(1, 25):  # the first epoch's full steps: the very same blocks in both runs
        assert b[s] == pytest.approx(a[s], rel=REL), s
    ea, eb = _metric(one / "mle", "eval_loss"), _metric(two / "mle", "eval_loss")
    assert eb[10] == pytest.approx(ea[10], rel=REL) and eb[20] == pytest.approx(ea[20], rel=REL)
    assert eb[MLE_STEPS] == pytest.approx(ea[MLE_STEPS], rel=5e-3)  # after the epoch end (see the sampler test)
    assert a[MLE_STEPS] < a[1] - 0.2  # it learns


def test_each_block_is_read_once_per_epoch_and_steps_hold_the_same_blocks(runs):
    _, one, two = runs
    ref = _ranks(one / "mle")[0]["train"]
    r0, r1 = (r["train"] for r in _ranks(two / "mle"))
    n = max(ref) + 1  # train blocks
    per_step = 4  # 1 process: 4 blocks a step; 2 processes: 2 each
    full = n // per_step  # full steps in an epoch; then one short step of n % 4 blocks (1 process)
    assert n % per_step
    # HF's loop reads one batch past the last step (never trained on): one more batch on each rank
    assert len(r0) == len(r1) == 2 * (MLE_STEPS + 1)
    assert len(ref) == n + (MLE_STEPS - full) * per_step
    assert sorted(ref[:n]) == list(range(n))  # 1 process: the epoch is a permutation of the blocks
    for s in range(full):  # step s: rank 0 reads blocks 4s..4s+1 of the 1-process order, rank 1 the next two
        assert r0[2 * s: 2 * s + 2] + r1[2 * s: 2 * s + 2] == ref[per_step * s: per_step * (s + 1)], s
    for s in range(full + 1, MLE_STEPS):  # the next epoch (a new permutation) is again the same in both runs
        i = n + (s - full - 1) * per_step
        assert r0[2 * s: 2 * s + 2] + r1[2 * s: 2 * s + 2] == ref[i: i + per_step], s
    # The epoch's last step: the n % 4 leftover blocks, padded by accelerate (even_batches) with blocks from the
    # epoch's start so both ranks take a full batch; 1 process takes a short batch instead. Nothing is dropped.
    epoch = [x for s in range(full + 1) for x in r0[2 * s: 2 * s + 2] + r1[2 * s: 2 * s + 2]]
    counts = Counter(epoch)
    assert set(counts) == set(range(n))
    dup = sum(c - 1 for c in counts.values())
    assert dup == (-n) % per_step and all(c <= 2 for c in counts.values())
    assert epoch[-per_step + n % per_step:] == ref[: per_step - n % per_step]  # the padding: the epoch's start


def test_logged_objective_metrics_are_the_mean_over_both_ranks(runs):
    _, _, two = runs
    loss, nll = _metric(two / "mle", "loss"), _metric(two / "mle", "obj/nll")
    # HF gathers `loss`; obj/nll is pretag's: for MLE they are the same number only if both are gathered
    for s in loss:
        assert nll[s] == pytest.approx(loss[s], rel=1e-6), s
    speed = _metric(two / "mle", "tokens_per_s")
    assert len(speed) >= MLE_STEPS - 4 and all(v > 0 for v in speed.values())
    summary = yaml.safe_load((two / "mle" / "pretag_train.yaml").read_text())
    steps = summary["result"]["steps"]
    assert summary["result"]["train_loss"] == pytest.approx(sum(loss.values()) / steps, rel=1e-5)


@pytest.mark.parametrize("method", ["filter", "conditional", "unlikelihood", "rwr", "awr", "conditional_ul"])
def test_every_objective_trains_under_ddp_with_parameters_in_sync(runs, method):
    _, one, two = runs
    ranks = _ranks(two / method)
    assert len(ranks) == 2
    p0, p1 = ranks[0]["params"], ranks[1]["params"]
    assert p0.keys() == p1.keys() and p0 == p1  # DDP kept every parameter identical on both ranks
    ref = _ranks(one / method)[0]["params"]
    assert ref.keys() == p0.keys()
    for k in ref:
        assert p0[k] == pytest.approx(ref[k], rel=1e-3, abs=1e-4), k
    a, b = _metric(one / method, "loss"), _metric(two / method, "loss")
    assert sorted(a) == sorted(b) == list(range(1, OTHER_STEPS + 1))
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=REL), s
    if method == "awr":  # the value head is a DDP parameter: trained (it starts at zero) and synced
        head = [k for k in p0 if "value_head" in k]
        assert head and any(abs(p0[k]) > 0 for k in head)
        assert _metric(two / method, "obj/value_loss")
    if method == "conditional_ul":  # the second (counterfactual) forward pass ran under DDP
        assert _metric(two / method, "obj/ul_bad_under_good")


def test_checkpoints_are_written_once_with_every_ranks_rng_state(runs):
    _, _, two = runs
    ckpts = sorted((two / "mle" / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in ckpts] == ["checkpoint-28", "checkpoint-30"]  # save_total_limit 2, no duplicates
    assert not (two / "mle" / "checkpoints" / ".staging").exists()
    for c in ckpts:
        names = {p.name for p in c.iterdir()}
        assert {"model.safetensors", "optimizer.pt", "trainer_state.json", "rng_state_0.pth",
                "rng_state_1.pth", "pretag_losses.json"} <= names
    rows = list(csv.DictReader((two / "mle" / "metrics.csv").open()))
    keys = [(r["step"], r["name"]) for r in rows if r["name"] == "loss"]
    assert len(keys) == len(set(keys)) == MLE_STEPS  # one writer: no row twice


def _weights(path: Path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.slow
def test_kill_9_of_the_whole_job_then_a_rerun_resumes(runs, tmp_path):
    """SIGKILL to torchrun and both workers once checkpoint-8 exists; the same job relaunched (with accelerate
    launch, through the CLI) resumes and ends where the uninterrupted 2-process run ended."""
    data, _, two = runs
    runner = data.parent / "runner.py"
    out = tmp_path / "mle"
    job = {**_jobs(data, tmp_path)[0]}
    p = subprocess.Popen(torchrun(str(runner), json.dumps([job])), env=_env(SLOW_STEP_S="0.2"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and p.poll() is None:
            ck = last_checkpoint(out / "checkpoints")
            if ck is not None and int(ck.name.split("-")[1]) >= 8:
                break
            time.sleep(0.02)
    finally:
        # The whole job: torchrun starts each worker in a session of its own, so killing torchrun (or its
        # process group) alone leaves the workers training on. Kill the launcher and every descendant at once.
        job_pids = [p.pid] + [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
        for pid in job_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait()

        def alive(pid: int) -> bool:
            try:
                return psutil.Process(pid).status() != "zombie"
            except psutil.NoSuchProcess:
                return False

        t_kill = time.time()  # SIGKILL is delivered at once, but a loaded kernel takes a moment to tear a worker down
        while time.time() < t_kill + 30 and any(alive(pid) for pid in job_pids):
            time.sleep(0.05)
        assert len(job_pids) >= 3 and not any(alive(pid) for pid in job_pids)
    at_kill = last_checkpoint(out / "checkpoints")
    assert at_kill is not None and 8 <= int(at_kill.name.split("-")[1]) < MLE_STEPS, "must be killed mid-way"
    assert not (out / "model.safetensors").exists()
    sets = [f"--set={k}={v}" for k, v in SETS.items() if k != "model"]
    text = _run(accelerate_launch("-m", "pretag", "train", str(data), "--method", "mle", "--model", "micro",
                                  "--tokens", str(job["tokens"]), "--out", str(out), "--json", *sets))
    summary = json.loads(text[text.index("{"):])
    assert summary["resumed_from"] == at_kill.name and summary["steps"] == MLE_STEPS
    a, b = _weights(two / "mle"), _weights(out)
    for k in a:
        assert (a[k] - b[k]).abs().max().item() < 1e-5, k
    la, lb = _metric(two / "mle", "loss"), _metric(out, "loss")
    assert sorted(lb) == list(range(1, MLE_STEPS + 1))  # every step logged once, none twice
    for s in la:
        assert lb[s] == pytest.approx(la[s], rel=1e-5), s
