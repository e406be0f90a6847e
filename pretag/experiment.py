"""The paper's experiment in one command: all six objectives on the same data and token budget, side by side.

Korbak et al. (2023) compare MLE, filtering, conditional training, unlikelihood, RWR and AWR by where each lands
on the misalignment/capability plane (their Fig. 2: misalignment score against KL from GPT-3). ``run_experiment``
does the same at a scale a laptop can run: label (or reuse) the data once, train every objective on identical
data with an identical token budget and seed, evaluate each with an identical sample budget, then write

    results.md / results.csv / results.json    one row per objective (and the finetune comparison)
    pareto.png, curves.png, temptation.png     the plots
    report.html                                everything above in one file (PNG embedded as base64)

The tables, plots and report are drawn by ``pretag.report`` from typed results (``pretag.results``); this module
validates the config, plans and trains the runs, and evaluates each. An experiment config is a small YAML file (see ``pretag/configs/experiments``); ``quick:`` is an overlay used by
``--quick`` so the same config documents both its full budget and a few-minute smoke run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from pretag.modeldir import TRAIN_FILE, ModelDir, ModelDirError
from pretag.objectives import OBJECTIVES, PAPER_OBJECTIVES
from pretag.problems import Problems
from pretag.report import (  # noqa: F401  (tables and plots moved to pretag.report; these names stay importable)
    markdown_table,
    plot_pareto,
    plot_temptation,
    plot_training_curves,
    ratio_columns,
    read_training_log,
    result_row,
    temptations,
    write_csv,
    write_report,
)
from pretag.results import EvalResult, ResultError

log = logging.getLogger(__name__)

EXPERIMENT_DIR = Path(__file__).parent / "configs" / "experiments"
METHODS = PAPER_OBJECTIVES  # the default set: the paper's six, in its order (any of OBJECTIVES may be named)


# ---- config -----------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    source: str | None = None
    """Corpus to label (anything ``pretag label`` accepts: ``stdlib``, ``fortunes``, a path)."""
    labeled: str | None = None
    """An existing labeled dataset directory to reuse instead of labeling ``source``."""
    schema: str = "pep8"
    """Shipped schema name or YAML path."""
    max_docs: int | None = None
    """Cap on documents labeled (None = all)."""
    label_options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``pretag.label.label_corpus`` (e.g. exclude patterns)."""
    inline_word_threshold: float | None = None
    """Train on an inline-tagged copy (``pretag.inline``): the bad tag before each word scoring worse than this
    on its own, written to ``OUT/data-inline`` (e.g. 0.1 for profanity)."""


@dataclass
class EvalConfig:
    samples: int = 256
    """Unconditional samples per model (the paper used 4,096)."""
    max_new_tokens: int = 128
    """Length limit of a sample; a final segment it cuts is not scored."""
    heldout_docs: int = 64
    """Held-out documents for loss, self-tagging and red-team prompts."""
    redteam_prompts: int = 16
    """Prefixes of the worst-scored held-out documents used as prompts."""
    reference: str | None = None
    """Reference model dir for KL; None = this experiment's MLE model (KL from MLE, as in the paper's §4)."""
    reference_samples: int = 128
    """Reference samples for the KL estimate (cached in the experiment dir)."""
    temperature: float = 1.0
    batch_size: int = 16


@dataclass
class FinetuneConfig:
    enabled: bool = False
    """Run the paper's §5 comparison: MLE then conditional fine-tuning vs conditional from the start."""
    pretrain_fraction: float = 0.5
    """Fraction of the token budget spent on MLE before switching to the conditional objective."""
    method: str = "conditional"


@dataclass
class ExperimentConfig:
    name: str
    data: DataConfig
    model: str = "micro"
    """Model preset of ``pretag.train`` (the same for every objective)."""
    tokens: int = 1_000_000
    """Training token budget, identical for every objective."""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    pretrained: dict[str, str] = field(default_factory=dict)
    """Runs evaluated from an existing model dir instead of being trained: ``{run name: model dir}`` (e.g. the
    demo's shipped checkpoints). They are listed before the trained runs; relative paths are from the config."""
    train: dict[str, Any] = field(default_factory=dict)
    """Training config overrides shared by all objectives (``--set`` keys of ``pretag train``)."""
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-objective overrides, e.g. ``{awr: {alpha: 0.5}}``."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    policy: dict[str, Any] = field(default_factory=dict)
    """Tag policy for conditional models' samples (default: force each attribute's good tag, ban the bad ones)."""
    seed: int = 0
    heldout_fraction: float = 0.05
    description: str = ""
    expected: dict[str, Any] = field(default_factory=dict)
    """Documentation only: the full run's budget and measured wall time."""


def _known(cls) -> set[str]:
    return {f.name for f in fields(cls)}


def _deep_update(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(d: dict[str, Any], *, quick: bool = False, where: str = "<dict>") -> ExperimentConfig:
    """Validate an experiment config; every problem is collected and reported at once (ValueError)."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: an experiment config must be a mapping")
    d = dict(d)
    q = d.pop("quick", None) or {}
    if quick:
        d = _deep_update(d, q)
    problems = Problems()
    top = _known(ExperimentConfig)
    problems += [f"unknown key {k!r} (known: {', '.join(sorted(top | {'quick'}))})" for k in d if k not in top]
    sections = {}
    for key, cls in (("data", DataConfig), ("eval", EvalConfig), ("finetune", FinetuneConfig)):
        raw = d.get(key) or {}
        if not isinstance(raw, dict):
            problems.append(f"{key}: must be a mapping")
            raw = {}
        problems += [f"{key}.{k}: unknown key (known: {', '.join(sorted(_known(cls)))})" for k in raw if k not in _known(cls)]
        sections[key] = cls(**{k: v for k, v in raw.items() if k in _known(cls)})
    data = sections["data"]
    if not data.source and not data.labeled:
        problems.append("data: set 'source' (a corpus to label) or 'labeled' (a labeled dataset dir)")
    iw = data.inline_word_threshold
    if iw is not None and (isinstance(iw, bool) or not isinstance(iw, int | float) or not math.isfinite(iw)):
        problems.append(f"data.inline_word_threshold: a number is required, got {iw!r}")
    pre = d.get("pretrained") or {}
    if not isinstance(pre, dict):
        problems.append("pretrained: must map run names to model dirs")
    elif where != "<dict>":
        base = Path(where).parent
        d["pretrained"] = {r: str(p if Path(p).is_absolute() or Path(p).exists() else base / p) for r, p in pre.items()}
    methods = d.get("methods", list(METHODS))
    if not isinstance(methods, list) or (not methods and not pre):
        problems.append("methods: a non-empty list is required")
        methods = []
    problems += [f"methods: unknown objective {m!r} (known: {', '.join(OBJECTIVES)})" for m in methods if m not in OBJECTIVES]
    tokens = d.get("tokens", 1_000_000)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
        problems.append(f"tokens: a positive integer is required, got {tokens!r}")
    ev = sections["eval"]
    for k in ("samples", "max_new_tokens", "heldout_docs", "reference_samples", "batch_size"):
        v = getattr(ev, k)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            problems.append(f"eval.{k}: a positive integer is required, got {v!r}")
    ft = sections["finetune"]
    if not 0 < ft.pretrain_fraction < 1:
        problems.append(f"finetune.pretrain_fraction must be in (0, 1), got {ft.pretrain_fraction!r}")
    if ft.method not in OBJECTIVES:
        problems.append(f"finetune.method: unknown objective {ft.method!r}")
    hf = d.get("heldout_fraction", 0.05)
    if not isinstance(hf, int | float) or not 0 < hf < 1:
        problems.append(f"heldout_fraction must be in (0, 1), got {hf!r}")
    mo = d.get("method_overrides") or {}
    problems += [f"method_overrides: unknown objective {m!r}" for m in mo if m not in OBJECTIVES]
    problems += _train_key_problems(d.get("train"), mo)
    problems.check(ValueError, where, of="the experiment config")
    rest = {k: v for k, v in d.items() if k in top and k not in sections}
    return ExperimentConfig(**{**rest, "name": str(d.get("name") or "experiment"), **sections})


def _train_key_problems(train: Any, overrides: Any) -> list[str]:
    """Unknown keys of ``train:`` and ``method_overrides.<m>:``, named where they are (not as ``--set``)."""
    from pretag.train import TrainConfig

    known = {f.name for f in fields(TrainConfig)} - {"sources", "method"}
    problems = []
    sections = [("train", train)]
    if isinstance(overrides, dict):
        sections += [(f"method_overrides.{m}", o) for m, o in overrides.items()]
    else:
        problems.append("method_overrides: must map objectives to training settings")
    for where, d in sections:
        if d is None:
            continue
        if not isinstance(d, dict):
            problems.append(f"{where}: must be a mapping of training settings")
            continue
        problems += [f"{where}.{k}: unknown training key (known: {', '.join(sorted(known))})"
                     for k in d if k not in known]
    return problems


def shipped_experiments() -> list[str]:
    return sorted(p.stem for p in EXPERIMENT_DIR.glob("*.yaml"))


def load_config(name_or_path: str | Path, *, quick: bool = False) -> ExperimentConfig:
    """A shipped experiment by name (``pep8``, ``toxicity``, ...) or a YAML file."""
    p = Path(name_or_path)
    if not p.exists():
        p = EXPERIMENT_DIR / f"{name_or_path}.yaml"
        if not p.exists():
            raise FileNotFoundError(f"experiment config {str(name_or_path)!r} is neither a file nor shipped "
                                    f"({', '.join(shipped_experiments())})")
    if p.is_dir():
        raise ValueError(f"experiment config {str(p)!r} is a directory, not a YAML file")
    try:
        d = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: not a valid YAML experiment config: {str(e).splitlines()[0]}") from e
    return config_from_dict(d, quick=quick, where=str(p))


# ---- orchestration ----------------------------------------------------------------------------------------
def _pretrained_info(run: str, model_dir: Path) -> dict[str, Any]:
    """Train info of a run that was trained elsewhere, read from its ``pretag_train.yaml``."""
    md = ModelDir(model_dir)
    if not md.is_pretag:
        raise FileNotFoundError(f"pretrained run {run!r}: {model_dir} is not a pretag model dir (no {TRAIN_FILE})")
    conf, res = md.config, md.result
    return {"run": run, "method": conf.get("method"), "tokens": conf.get("tokens"), "model": conf.get("model"),
            "wall_s": res.get("wall_s"), "steps": res.get("steps"), "train_loss": res.get("train_loss"),
            "eval_loss": res.get("eval_loss"), "params": res.get("params"), "pretrained": str(model_dir)}


@dataclass
class PlannedRun:
    """One model the experiment trains: its run name, objective, folder, budget (and, fine-tuning, its start)."""

    run: str
    method: str
    dir: Path
    tokens: int
    model: str | None = None
    extra: dict[str, Any] | None = None


def plan_runs(cfg: ExperimentConfig, out: Path) -> list[PlannedRun]:
    """Every run to train, in order: MLE first (the KL reference and the baseline), then the other objectives,
    then the paper's §5 comparison (MLE, then the conditional objective, on the same total budget)."""
    runs = [PlannedRun(m, m, out / "models" / m, cfg.tokens) for m in sorted(cfg.methods, key=lambda m: m != "mle")]
    if cfg.finetune.enabled:
        ft = cfg.finetune
        first = round(cfg.tokens * ft.pretrain_fraction)
        stage = out / "models" / "finetune-mle-stage"
        from pretag.train import PRESET_LR

        lr = cfg.train.get("lr", PRESET_LR)  # a fresh preset's default: the fine-tune must not silently slow down
        runs += [PlannedRun("finetune-mle-stage", "mle", stage, first),
                 PlannedRun(f"mle→{ft.method}", ft.method, out / "models" / f"finetune-{ft.method}",
                            cfg.tokens - first, model=str(stage), extra={"lr": lr})]
        if ft.method not in cfg.methods:
            runs.append(PlannedRun(ft.method, ft.method, out / "models" / ft.method, cfg.tokens))
    return runs


def train_config(p: PlannedRun, cfg: ExperimentConfig, schema_name: str):
    """The resolved ``TrainConfig`` of a planned run (ValueError names the experiment's sections, not --set)."""
    from pretag.train import resolve_config

    sets = {**cfg.train, **cfg.method_overrides.get(p.method, {}), "eval_fraction": cfg.heldout_fraction,
            **(p.extra or {})}
    return resolve_config(p.method, schema_name=schema_name, sets=sets, sets_name="the experiment's train:/"
                          f"method_overrides.{p.method}", tokens=p.tokens, model=p.model or cfg.model, seed=cfg.seed)


def _saved_config(model_dir: Path) -> dict[str, Any] | None:
    """The training config a run in ``model_dir`` was trained with (None: no run there; {}: unreadable)."""
    md = ModelDir(model_dir)
    if not md.is_pretag:
        return None
    try:
        return md.config
    except ModelDirError:
        return {}


def config_diff(saved: dict[str, Any], tcfg, p: PlannedRun) -> list[str]:
    """``key old -> new`` for each training setting where a saved run differs from the planned one. A fine-tune's
    start model is this experiment's own stage folder: compared by name, so a moved experiment still matches. A
    setting an older pretag did not write yet counts as its default (a new knob defaults to the old behaviour), so
    adding one does not orphan every trained run."""
    now = {k: v for k, v in tcfg.to_dict().items() if k != "sources"}
    defaults = {f.name: f.default for f in fields(tcfg) if f.default is not MISSING}
    old = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    if p.model is not None and old.get("model") is not None:
        old["model"], now["model"] = Path(str(old["model"])).name, Path(str(now["model"])).name
    return [f"{k} {old.get(k)!r} -> {now[k]!r}" for k in now if old.get(k) != now[k]]


def reuse_problems(cfg: ExperimentConfig, out: Path, schema_name: str) -> list[str]:
    """Why this experiment cannot run in ``out`` as it stands, found before any work: a config that does not
    resolve, a model trained there under another config, data labeled there with other settings. A trained
    run is reused only when its resolved training config is the one this experiment would use."""
    from pretag import folders

    problems = []
    old_path = out / "config.yaml"
    if not cfg.data.labeled and (out / "data").exists() and old_path.exists():
        try:
            old = (yaml.safe_load(old_path.read_text()) or {}).get("data") or {}
        except (yaml.YAMLError, UnicodeDecodeError, AttributeError):
            old = {}
        new = asdict(cfg.data)
        diff = [f"{k} {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k]]
        if diff:
            problems.append(f"data: {out / 'data'} was labeled with other settings ({', '.join(diff)}), and every "
                            "model here was trained on it")
    made = out / "data-inline" / "inline.json"
    if made.exists() and (out / "models").exists():  # models here were trained on this inline copy
        was = json.loads(made.read_text()).get("word_threshold")
        if was != cfg.data.inline_word_threshold:
            problems.append(f"data: the models in {out / 'models'} were trained on inline tags at word threshold "
                            f"{was!r}, this config asks for {cfg.data.inline_word_threshold!r}")
    for p in plan_runs(cfg, out):
        try:
            tcfg = train_config(p, cfg, schema_name)
        except ValueError as e:
            problems.append(f"run {p.run}: {e}")
            continue
        saved = _saved_config(p.dir)
        if saved is None:
            kind = folders.holds(p.dir)
            if kind is not None:
                problems.append(f"run {p.run}: {p.dir} already holds {kind}")
            continue
        diff = config_diff(saved, tcfg, p)
        if diff:
            problems.append(f"run {p.run}: {p.dir} was trained with another config ({', '.join(diff)})")
    return problems


def _inline_copy(src: Path, dest: Path, word_threshold: float) -> Path:
    """``dest``: the inline-tagged copy of ``src`` (reused when it was made from ``src`` with this threshold)."""
    from pretag.inline import INFO_FILE, inline_dataset

    info = dest / INFO_FILE
    made = json.loads(info.read_text()) if info.exists() else {}
    if made.get("word_threshold") != word_threshold or Path(made.get("source", "")).resolve() != src.resolve():
        inline_dataset(src, dest, word_threshold=word_threshold, overwrite=True)
    return dest


def _train(p: PlannedRun, data: Path, cfg: ExperimentConfig, schema_name: str) -> dict[str, Any]:
    """Train one run (or reuse a finished one with the same config: the experiment resumes where it stopped)."""
    from pretag.train import train

    run, method, out, tokens = p.run, p.method, p.dir, p.tokens
    tcfg = train_config(p, cfg, schema_name)
    info_path = out / "experiment_run.json"
    saved = _saved_config(out)
    if ModelDir(out).done and info_path.exists() and saved is not None and not config_diff(saved, tcfg, p):
        log.info("%s: reusing the finished model in %s", run, out)
        return json.loads(info_path.read_text())
    t0 = time.perf_counter()
    res = train(tcfg, data, out)
    info = {"run": run, "method": method, "tokens": tokens, "model": tcfg.model, "wall_s": time.perf_counter() - t0,
            "steps": res.steps, "train_loss": res.train_loss, "eval_loss": res.eval_loss,
            "tokens_per_step": tcfg.batch_size * tcfg.grad_accum * tcfg.block_size, "params": res.params,
            "stats": res.stats}
    info_path.write_text(json.dumps(info, indent=2, default=str))
    return info


def run_experiment(cfg: ExperimentConfig, out: str | Path) -> dict[str, Any]:
    """Label (or reuse) → train every objective → evaluate each → tables, plots, report. Resumable: finished
    labeling shards, trained models and evaluations are reused when the same command runs again."""
    from pretag import folders
    from pretag.label import label_corpus
    from pretag.schema import load_schema

    out = Path(out)
    t0 = time.perf_counter()
    # 0. before any work (and before config.yaml is rewritten): can we write there, may we reuse what is there
    folders.check_dir(out)
    folders.refuse_foreign(out, "experiment")
    if cfg.data.labeled:
        if not (Path(cfg.data.labeled) / "schema.yaml").exists():
            raise folders.FolderError(f"data.labeled {cfg.data.labeled!r} is not a labeled dataset (no schema.yaml)")
        schema = load_schema(Path(cfg.data.labeled) / "schema.yaml")
    else:
        schema = load_schema(cfg.data.schema)
    if cfg.policy:  # a wrong policy must fail here, not after hours of training when the first model is evaluated
        from pretag.policy import PolicyError, load_policy

        try:
            load_policy(cfg.policy, schema)
        except PolicyError as e:
            raise ValueError(f"experiment {cfg.name}: its policy does not fit schema {schema.name!r}: {e}") from e
    problems = reuse_problems(cfg, out, schema.name)
    if problems:
        raise ValueError(f"experiment {cfg.name} cannot run in {out}:\n  - " + "\n  - ".join(problems) +
                         "\nuse another --out, or delete the folders named above to redo them")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))

    # 1. data: label once, every objective trains on exactly these rows
    if cfg.data.labeled:
        data = Path(cfg.data.labeled)
    else:
        data = out / "data"
        label_corpus(cfg.data.source, cfg.data.schema, data, limit=cfg.data.max_docs, progress=False,
                     **cfg.data.label_options)
    if cfg.data.inline_word_threshold is not None:
        data = _inline_copy(data, out / "data-inline", cfg.data.inline_word_threshold)
    schema = load_schema(data / "schema.yaml")
    label_s = time.perf_counter() - t0

    # 2. train every objective on the same data, token budget, seed and model size, and 3. evaluate each with the
    # same samples budget, reference samples (cached) and held-out documents *as soon as it is trained*, rewriting
    # the tables and report after every evaluation: a long experiment that stops early still leaves its results.
    e = cfg.eval
    runs: dict[str, dict[str, Any]] = {}
    model_dirs: dict[str, Path] = {}
    results: dict[str, EvalResult] = {}
    pending: list[str] = []
    mle_dir = Path(cfg.pretrained["mle"]) if "mle" in cfg.pretrained else out / "models" / "mle"
    has_mle = "mle" in cfg.pretrained or "mle" in cfg.methods
    reference = e.reference or (str(mle_dir) if has_mle else None)
    # what an evaluation depends on (_evaluate adds the model, the reference and the schema, by content); the policy
    # too, or a run sampled under `guide: {bad: 3}` would keep its evaluation when the config asks for another policy
    settings = {**asdict(e), "seed": cfg.seed, "policy": cfg.policy or None}

    def evaluate_ready() -> None:
        if reference is not None and not e.reference and "mle" not in runs:
            return  # the KL reference (this experiment's MLE model) is not trained yet
        while pending:
            run = pending.pop(0)
            results[run] = _evaluate(run, model_dirs[run], data, out, cfg, reference, settings)
            _write_tables(cfg, schema, out, runs, results, model_dirs, reference)

    def add(run: str, info: dict[str, Any], model_dir: Path) -> None:
        runs[run], model_dirs[run] = info, model_dir
        pending.append(run)
        evaluate_ready()

    for run, md in cfg.pretrained.items():
        add(run, _pretrained_info(run, Path(md)), Path(md))
    stage_info: dict[str, Any] = {}
    for p in plan_runs(cfg, out):  # MLE first: it is the KL reference and the baseline
        log.info("experiment %s: training %s", cfg.name, p.run)
        info = _train(p, data, cfg, schema.name)
        if p.run == "finetune-mle-stage":  # the paper's §5: its first stage is no row of its own
            stage_info = info
            continue
        if p.model is not None:  # the fine-tune: one budget over both stages
            info = {**info, "tokens": cfg.tokens, "wall_s": stage_info["wall_s"] + info["wall_s"],
                    "stages": [stage_info["tokens"], p.tokens]}
        add(p.run, info, p.dir)
    evaluate_ready()
    if pending:
        raise RuntimeError(f"experiment {cfg.name}: no KL reference for {pending}")
    return _write_tables(cfg, schema, out, runs, results, model_dirs, reference, t0=t0, label_s=label_s, final=True)


def _evaluate(run: str, model_dir: Path, data: Path, out: Path, cfg: ExperimentConfig, reference: str | None,
              settings: dict[str, Any]) -> EvalResult:
    """Evaluate one run, or reuse its cached evaluation when the settings are unchanged."""
    from pretag.evaluate import EVAL_PROTOCOL, evaluate_model, model_identity
    from pretag.schema import load_schema

    e = cfg.eval
    path = out / "evals" / f"{run.replace('→', '-then-')}.json"
    path.parent.mkdir(exist_ok=True)
    # the model too, not only the settings: a model retrained in place must not keep its predecessor's evaluation;
    # and the schema its samples are scored with: one MLE model may serve two tasks (evaluate_model's
    # schema=), and an evaluation under one task's classifier must not stand in for another's
    # models by content, not path (evaluate.model_identity): a moved or copied experiment folder keeps its evaluations
    settings = {**settings, "model": model_identity(model_dir),
                "reference": model_identity(reference) if reference else None,
                "schema": hashlib.sha1((data / "schema.yaml").read_bytes()).hexdigest()[:16],
                "protocol": EVAL_PROTOCOL}  # what the metrics mean: a redefined one is measured again
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("experiment_settings") == settings:
            try:
                return EvalResult.from_dict(cached, where=str(path))
            except ResultError as err:  # written by another version of pretag: evaluate again
                log.warning("%s: not reused (%s)", path, err)
    log.info("experiment %s: evaluating %s", cfg.name, run)
    try:
        r = evaluate_model(model_dir, data=data, samples=e.samples, max_new_tokens=e.max_new_tokens,
                           temperature=e.temperature, reference=reference, reference_samples_n=e.reference_samples,
                           cache_dir=out / "cache", heldout_docs=e.heldout_docs, redteam_n=e.redteam_prompts,
                           policy=cfg.policy or None, batch_size=e.batch_size, seed=cfg.seed,
                           schema=load_schema(data / "schema.yaml"))
    except ResultError as err:  # measured, but not in the shape this version reads: keep it, never reuse it
        if getattr(err, "raw", None) is not None:
            kept = path.with_name(f"{path.stem}.invalid.json")
            kept.write_text(json.dumps({**err.raw, "experiment_settings": settings}, indent=2, default=str))
            err.add_note(f"the measurements are kept in {kept}")
            log.error("experiment %s: %s's evaluation does not validate (%s); the measurements are kept in %s",
                      cfg.name, run, err, kept)
        raise
    r["experiment_settings"] = settings
    path.write_text(json.dumps(r, indent=2, default=str))
    return EvalResult.from_dict(r, where=str(path))


def _write_tables(cfg: ExperimentConfig, schema, out: Path, runs: dict[str, dict], results: dict[str, EvalResult],
                  model_dirs: dict[str, Path], reference: str | None, *, t0: float | None = None, label_s: float | None = None,
                  final: bool = False) -> dict[str, Any]:
    """Tables, plots and the HTML report of every run evaluated so far (``final`` marks the complete set)."""
    from pretag.metrics import json_safe

    e = cfg.eval
    done = [r for r in runs if r in results]
    rows = [result_row(run, results[run], runs[run]) for run in done]
    if "mle" in results:
        for row in rows:
            row.update(ratio_columns(results["mle"], results[row["run"]]))
    (out / "results.md").write_text(markdown_table(rows))
    write_csv(rows, out / "results.csv")
    primary = next((a.name for a in schema.attributes if a.level == "segment" and a.bands is None),
                   schema.attributes[0].name)
    plots = [plot_pareto(rows, primary, out / "pareto.png")]
    logs = {run: model_dirs[run] / "metrics.csv" for run in done if (model_dirs[run] / "metrics.csv").exists()}
    plots.append(plot_training_curves(logs, out / "curves.png", {r: runs[r].get("tokens_per_step", 1) for r in done}))
    plots.append(plot_temptation(temptations(results, primary), out / "temptation.png"))
    summary = {
        "experiment": cfg.name, "description": cfg.description, "schema": schema.name,
        "data": str(cfg.data.labeled or out / "data"), "complete": final,
        "model": cfg.model, "tokens_per_objective": cfg.tokens, "samples_per_model": e.samples,
        "max_new_tokens": e.max_new_tokens, "reference": reference, "seed": cfg.seed,
        "primary_attribute": primary, "label_wall_s": label_s,
        "wall_s": None if t0 is None else time.perf_counter() - t0,
        "train_wall_s": {r: runs[r]["wall_s"] for r in done},
        "eval_wall_s": {r: results[r].wall_s for r in done},
    }
    title = f"pretag experiment: {cfg.name}" + ("" if final else f" (partial: {len(done)} runs evaluated so far)")
    write_report(out / "report.html", title=title, summary=summary, rows=rows,
                 plots=plots, samples={r: results[r].examples[:3] for r in done})
    full = {"summary": summary, "rows": rows,
            "artifacts": {k: str(out / k) for k in ("results.md", "results.csv", "results.json", "pareto.png",
                                                     "curves.png", "temptation.png", "report.html")}}
    full = json_safe(full)
    (out / "results.json").write_text(json.dumps(full, indent=2, default=str))
    return full
