"""Curriculum stage (KPOD §4.3): a progressive schedule of how much of each rationale the student generates.

Input: kept rationales (their questions), step difficulties (§4.2), the number of training epochs.
Output: table `curriculum(fp, stage, example_id, rationale_id, prefix_steps)` — at stage t the first
`prefix_steps` rationale steps are given as input and the student generates the rest — and its Parquet shards
`<workspace>/curricula/<fp>/stage=N/*.parquet`, written by DuckDB's COPY … PARTITION_BY and published by
rename. Plus per-stage plots (budget vs achieved difficulty, cluster coverage, prefix lengths).

Schedule (§4.3): T = ceil(epochs / 2) stages. c_i(0), which the paper leaves open (`curriculum.start`): 'budget'
starts from every step as input and lets the stage objective pick the examples that generate their last step
within D(0) = C0, so H(0) ≤ C0 as eq. 8 has it; 'last_step' gives every example c_i(0) = n_i − 1. The budget
D(t) = u·t^{p+1}/(p+1) + C0 with C0 = 0.3·B, B = Σ_ij d_ij, u = (B − C0)(p+1)/T^{p+1}, so D(T) = B (eq. 8).
At stage t < T choose S(t) maximising F(S) = −(ΔD(t) − ΔH(S)) + β·Σ_k sqrt(|C_k ∩ S|) subject to
ΔH(S) ≤ ΔD(t) (eq. 9-10), where ΔD(t) = D(t) − H(t−1) is what the budget still allows and ΔH(S) the
difficulty of the steps that examples in S stop receiving as input; then c_i ← c_i − Δs for i in S. At stage
T every c_i = 0 (whole rationales).

Solver: F(S) + ΔD = ΔH(S) + β·Σ_k sqrt(|C_k ∩ S|) is normalised, monotone and submodular (a modular part plus
concave functions of cluster counts), with a knapsack constraint (cost of i = its ΔH_i). We use Greedy+Max:
density greedy, and at every greedy prefix G_i also the best single element that still fits; return the best
G_i + a_i. It is a 1/2-approximation for monotone submodular maximisation under a knapsack constraint
(Yaroslavtsev, Zhou & Avdiukhin, "Bring Your Own Greedy+Max: Near-Optimal 1/2-Approximations for Submodular
Knapsack", AISTATS 2020; also Feldman, Nutov & Shoham, "Practical Budgeted Submodular Maximization",
Algorithmica 2023). The paper's FTGP has (1/2 − ε); Greedy+Max has no ε. Because the diversity gain depends
only on the cluster count, the greedy is a K-way merge of per-cluster cost-sorted lists and the "+Max" step a
binary search per cluster, so a stage costs O(n log n).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from keystep.config import CurriculumConfig, DistillConfig
from storage.fingerprint import Lineage
from storage.workspace import Workspace, publish_dir, temp_dir_for
from tasks.difficulty import Difficulty
from tasks.stage import (Made, Stage, StageInputs, StageOutput, artifact_markdown, kept_rationales, pyplot, save_figure,
                         workspace_of)
from tasks.teacher import Generation

CODE_VERSION = "2"   # 2: curriculum.start


# ---- objective and solver ---------------------------------------------------------------------------
def diversity_objective(selected: np.ndarray, cost: np.ndarray, cluster: np.ndarray, beta: float) -> float:
    """G(S) = ΔH(S) + β·Σ_k sqrt(|C_k ∩ S|) = F(S) + ΔD (the §4.3 objective shifted to G(∅) = 0)."""
    selected = np.asarray(selected, dtype=np.int64)
    if selected.size == 0:
        return 0.0
    counts = np.bincount(cluster[selected])
    return float(cost[selected].sum() + beta * np.sqrt(counts).sum())


@dataclass
class Selection:
    chosen: np.ndarray         # indices into the candidates
    value: float               # G(chosen)
    greedy_value: float        # G of the plain density-greedy solution (the baseline)


def greedy_max(cost: np.ndarray, cluster: np.ndarray, budget: float, beta: float) -> Selection:
    """Greedy+Max for max G(S) s.t. Σ_{i∈S} cost_i ≤ budget (1/2-approximation; see the module docstring)."""
    cost = np.asarray(cost, dtype=np.float64)
    cluster = np.asarray(cluster, dtype=np.int64)
    n = cost.size
    empty = Selection(np.zeros(0, dtype=np.int64), 0.0, 0.0)
    if n == 0 or budget < 0:
        return empty
    tol = 1e-9 * max(1.0, abs(budget))
    n_clusters = int(cluster.max()) + 1
    # Within a cluster every element has the same diversity gain, so the highest density (gain/cost) is the
    # cheapest one: each cluster is taken in ascending cost, and its density key only decreases along it.
    by_cluster = np.argsort(cluster * (cost.max() + 1.0) + cost, kind="stable")   # by cluster, then cost
    starts = np.searchsorted(cluster[by_cluster], np.arange(n_clusters))
    pos = np.arange(n) - starts[cluster[by_cluster]]
    gain = beta * (np.sqrt(pos + 1.0) - np.sqrt(pos))
    c_sorted = cost[by_cluster]
    with np.errstate(divide="ignore"):
        density = np.where(c_sorted > 0, 1.0 + gain / np.where(c_sorted > 0, c_sorted, 1.0), np.inf)
    merge = np.argsort(-density, kind="stable")  # the greedy's order: a K-way merge by density (stable keeps
                                                 # each cluster's cost order among equal densities)
    seq = by_cluster[merge]
    seq_cost, seq_cluster = cost[seq], cluster[seq]
    # Scan in that order; an element that does not fit ends its cluster (the rest of it is costlier and the
    # remaining budget only shrinks), so at most K+1 vectorised passes.
    taken = np.zeros(n, dtype=bool)
    active = np.ones(n_clusters, dtype=bool)
    used, start = 0.0, 0
    while start < n:
        idx = start + np.nonzero(active[seq_cluster[start:]])[0]
        if idx.size == 0:
            break
        cum = used + np.cumsum(seq_cost[idx])
        over = np.nonzero(cum > budget + tol)[0]
        if over.size == 0:
            taken[idx] = True
            break
        j = over[0]
        taken[idx[:j]] = True
        used = cum[j - 1] if j else used
        active[seq_cluster[idx[j]]] = False
        start = idx[j] + 1
    greedy = seq[taken]                           # G_m in greedy order; G_i = greedy[:i]
    g_cost, g_cluster = cost[greedy], cluster[greedy]
    m = greedy.size
    cum_cost = np.concatenate([[0.0], np.cumsum(g_cost)])
    counts = np.zeros((m + 1, n_clusters), dtype=np.int64)
    if m:
        counts[1:] = np.cumsum(np.eye(n_clusters, dtype=np.int64)[g_cluster], axis=0)
    value = cum_cost + beta * np.sqrt(counts).sum(axis=1)   # G(G_i), i = 0..m
    remaining = budget - cum_cost
    # +Max: for each G_i the best single element outside it that fits. Cluster k's elements outside G_i are
    # its cost-sorted list from position counts[i, k] on; the best is the costliest one that fits.
    best_gain = np.zeros(m + 1)
    best_elem = np.full(m + 1, -1, dtype=np.int64)
    for k in range(n_clusters):
        lo, hi = starts[k], (starts[k + 1] if k + 1 < n_clusters else n)
        if hi == lo:
            continue
        ck = c_sorted[lo:hi]
        at = np.searchsorted(ck, remaining + tol, side="right") - 1
        ok = at >= counts[:, k]
        g = np.where(ok, ck[np.clip(at, 0, None)] + beta * (np.sqrt(counts[:, k] + 1.0) - np.sqrt(counts[:, k])), -np.inf)
        better = g > best_gain
        best_gain = np.where(better, g, best_gain)
        best_elem = np.where(better, by_cluster[lo + np.clip(at, 0, None)], best_elem)
    total = value + best_gain
    i = int(np.argmax(total))
    chosen = greedy[:i] if best_elem[i] < 0 else np.concatenate([greedy[:i], [best_elem[i]]])
    return Selection(chosen.astype(np.int64), float(total[i]), float(value[m]))


# ---- clusters -----------------------------------------------------------------------------------------
def sentence_embeddings(texts: list[str], model_path: str, batch_size: int = 64) -> np.ndarray:
    """Unit-norm sentence embeddings: through sentence-transformers when it is installed, else the model's
    encoder with attention-masked mean pooling (what sentence-transformers does for e.g. all-MiniLM-L6-v2)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        SentenceTransformer = None
    if SentenceTransformer is not None:
        return np.asarray(SentenceTransformer(model_path).encode(texts, normalize_embeddings=True))
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(model_path), AutoModel.from_pretrained(model_path).eval()
    out = []
    with torch.no_grad():
        for b in range(0, len(texts), batch_size):
            enc = tok(texts[b:b + batch_size], padding=True, truncation=True, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy())
    return np.concatenate(out)


def question_clusters(questions: list[str], cfg: CurriculumConfig) -> np.ndarray:
    """K-means (scikit-learn) over question embeddings: TF-IDF + truncated SVD, or a sentence-embedding model."""
    from sklearn.cluster import KMeans

    n = len(questions)
    k = min(cfg.clusters, n)
    if k <= 1:
        return np.zeros(n, dtype=np.int64)
    if cfg.embedding == "sentence-model":
        if not cfg.embedding_model:
            raise ValueError("config key 'curriculum.embedding_model': set a sentence-embedding model folder or hub id")
        x = sentence_embeddings(questions, cfg.embedding_model)
    else:
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.preprocessing import normalize

        tfidf = TfidfVectorizer(sublinear_tf=True).fit_transform(questions)
        dim = min(cfg.svd_dim, tfidf.shape[1] - 1, n - 1)
        x = normalize(TruncatedSVD(dim, random_state=cfg.seed).fit_transform(tfidf)) if dim >= 2 else tfidf.toarray()
    return KMeans(k, n_init=4, random_state=cfg.seed).fit_predict(x).astype(np.int64)


# ---- schedule -----------------------------------------------------------------------------------------
@dataclass
class Schedule:
    prefix: np.ndarray                      # (T, n): c_i at stages 1..T
    budget: list[float]                     # D(t)
    achieved: list[float]                   # H(t) = Σ_i Σ_{j > c_i(t)} d_ij
    cluster_selected: list[list[int]]       # per stage: |C_k ∩ S(t)| for each k
    greedy_values: list[float] = field(default_factory=list)   # plain density greedy G per stage
    solver_values: list[float] = field(default_factory=list)   # Greedy+Max G per stage
    start_achieved: float = 0.0             # H(0)


def n_stages(epochs: int) -> int:
    return math.ceil(epochs / 2)


def build_schedule(difficulties: list[np.ndarray], clusters: np.ndarray, stages: int, cfg: CurriculumConfig) -> Schedule:
    """§4.3 for n examples; `difficulties[i]` holds d_ij for the steps of example i (in order)."""
    n_steps = np.array([len(d) for d in difficulties], dtype=np.int64)
    flat = np.concatenate(difficulties).astype(np.float64) if len(difficulties) else np.zeros(0)
    offsets = np.concatenate([[0], np.cumsum(n_steps)[:-1]]).astype(np.int64) if len(difficulties) else np.zeros(0, np.int64)
    csum = np.concatenate([[0.0], np.cumsum(flat)])
    n_clusters = int(clusters.max()) + 1 if clusters.size else 1

    def generated(c: np.ndarray) -> float:  # H = Σ_i Σ_{j > c_i} d_ij
        return float((csum[offsets + n_steps] - csum[offsets + c]).sum())

    total = float(flat.sum())                                   # B
    c0 = cfg.start_fraction * total                             # C0 = 0.3·B
    p = cfg.pace
    u = (total - c0) * (p + 1) / stages ** (p + 1)
    beta = cfg.beta if cfg.diversity else 0.0
    def select(c: np.ndarray, budget: float, step_size: int) -> tuple[np.ndarray, np.ndarray, Selection]:
        """S maximising eq. 9 within `budget` (eq. 10); each chosen example gives up `step_size` input steps."""
        cand = np.nonzero(c > 0)[0]
        step = np.minimum(step_size, c[cand])
        cost = csum[offsets[cand] + c[cand]] - csum[offsets[cand] + c[cand] - step]   # ΔH_i
        sel = greedy_max(cost, clusters[cand], budget, beta)
        c = c.copy()
        c[cand[sel.chosen]] -= step[sel.chosen]
        return c, np.bincount(clusters[cand[sel.chosen]], minlength=n_clusters), sel

    if cfg.start == "last_step":
        c = np.maximum(n_steps - 1, 0)                          # c_i(0) = n_i − 1
    else:   # every step as input, then the last steps that fit D(0) = C0 (eq. 8 at t = 0)
        c, _, _ = select(n_steps.copy(), c0, 1)
    h_prev = generated(c)
    sched = Schedule(np.zeros((stages, len(difficulties)), dtype=np.int64), [], [], [], start_achieved=h_prev)
    for t in range(1, stages + 1):
        d_t = u * t ** (p + 1) / (p + 1) + c0                   # D(t), eq. 8
        picked = np.zeros(n_clusters, dtype=np.int64)
        if t == stages or not cfg.progressive:
            c = np.zeros_like(c)                                # from stage T on: whole rationales
            sched.greedy_values.append(0.0)
            sched.solver_values.append(0.0)
        else:
            c, picked, sel = select(c, d_t - h_prev, cfg.step_size)   # ΔD(t) = D(t) − H(t−1)
            sched.greedy_values.append(sel.greedy_value)
            sched.solver_values.append(sel.value)
        h_prev = generated(c)
        sched.prefix[t - 1] = c
        sched.budget.append(d_t)
        sched.achieved.append(h_prev)
        sched.cluster_selected.append(picked.tolist())
    return sched


class Curriculum(StageOutput):
    """The schedule: rows of `curriculum` under `fp` and one Parquet shard per stage under `shards_dir`."""
    stages: int
    shards_dir: str
    n_rationales: int
    n_unscored: int
    budget: list[float]
    achieved: list[float]
    start_achieved: float
    cluster_selected: list[list[int]]
    cluster_sizes: list[int]
    mean_prefix: list[float]
    plots: dict[str, str]
    markdown: str


class CurriculumInputs(StageInputs):
    """The kept rationales and their steps' difficulties."""
    generation: Generation
    difficulty: Difficulty


def curriculum_lineage(config: DistillConfig, inputs: CurriculumInputs) -> Lineage:
    return Lineage("curriculum", {"curriculum": config.curriculum, "stages": n_stages(config.train.epochs)},
                   (inputs.generation.fp, inputs.difficulty.fp), CODE_VERSION)


# ---- report -------------------------------------------------------------------------------------------
def plot_schedule(sched: Schedule, out_dir: Path) -> dict[str, str]:
    """PNG plots per stage: budget D(t) vs achieved H(t), cluster coverage of S(t), prefix-length histogram."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = np.arange(1, len(sched.budget) + 1)
    paths: dict[str, str] = {}
    if len(stages) < 2:      # one stage: whole rationales from the start, nothing to plot
        return paths
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(stages, sched.budget, "o-", label="budget D(t)")
    ax.plot(stages, sched.achieved, "s--", label="achieved H(t)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("stage")
    ax.set_ylabel("difficulty generated")
    ax.legend()
    paths["budget"] = save_figure(fig, out_dir / "budget.png")

    cov = np.array(sched.cluster_selected)
    if cov.sum():
        fig, ax = plt.subplots(figsize=(5, 3.2))
        bottom = np.zeros(len(stages))
        for k in range(cov.shape[1]):
            ax.bar(stages, cov[:, k], bottom=bottom, label=f"cluster {k}")
            bottom += cov[:, k]
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("stage")
        ax.set_ylabel("examples selected in S(t)")
        ax.legend(fontsize=7)
        paths["coverage"] = save_figure(fig, out_dir / "coverage.png")

    top = int(sched.prefix.max()) if sched.prefix.size else 0
    fig, axes = plt.subplots(1, len(stages), figsize=(2.2 * len(stages), 2.6), sharey=True, squeeze=False)
    for t, ax in zip(stages, axes[0]):
        ax.hist(sched.prefix[t - 1], bins=np.arange(top + 2) - 0.5)
        ax.set_title(f"stage {t}", fontsize=8)
        ax.set_xlabel("prefix steps", fontsize=8)
    paths["prefix"] = save_figure(fig, out_dir / "prefix_lengths.png")
    return paths


def schedule_markdown(sched: Schedule, plots: dict[str, str], relative_to: Path | None = None) -> str:
    def link(p: str) -> str:
        return str(Path(p).relative_to(relative_to)) if relative_to else p

    lines = ["## Curriculum (KPOD §4.3)", ""]
    titles = {"budget": "budget vs achieved", "coverage": "cluster coverage", "prefix": "prefix lengths"}
    if len(sched.budget) < 2:      # no schedule to show: a table of zeros would read as a stage that selected nothing
        lines.append("One stage (T = ceil(epochs / 2) = 1): every example trains on its whole rationale from the start.")
        return "\n".join(lines + [""])
    lines += ["| stage | budget D(t) | achieved H(t) | selected | mean prefix steps |", "|---:|---:|---:|---:|---:|"]
    for t, (d, h, sel) in enumerate(zip(sched.budget, sched.achieved, sched.cluster_selected), start=1):
        prefix = sched.prefix[t - 1].mean()
        lines.append(f"| {t} | {d:.1f} | {h:.1f} | {sum(sel)} | {prefix:.2f} |" if prefix or sum(sel) else
                     f"| {t} | {d:.1f} | {h:.1f} | — | whole rationales |")
    lines.append("")
    if "coverage" not in plots:
        lines.append("No stage selected an example: the budget never exceeded the starting state.")
    lines += [f"![{titles[k]}]({link(v)})" for k, v in plots.items()] + [""]
    return "\n".join(lines)


# ---- stage --------------------------------------------------------------------------------------------
def build_curriculum(ws: Workspace, config: DistillConfig, inputs: CurriculumInputs, lineage: Lineage) -> Made:
    catalog, cfg = ws.catalog(), config.curriculum
    fp, shards_dir, report_dir = lineage.fp, ws.curriculum_dir(lineage.fp), ws.root / "reports"
    rows = kept_rationales(catalog, config, inputs.generation)
    by_rationale: dict[str, list[float]] = {}
    for r in catalog.query("difficulty_of", difficulty_fp=inputs.difficulty.fp):
        by_rationale.setdefault(r["rationale_id"], []).append(r["difficulty"])
    scored = [r for r in rows if r["rationale_id"] in by_rationale]
    if not scored:
        raise ValueError("no step difficulties to build a curriculum from; check the difficulty stage's summary")
    # one cluster per question (several samples of one question share it)
    questions = sorted({r["example_id"]: r["question"] for r in scored}.items())
    labels = dict(zip([q for q, _ in questions], question_clusters([t for _, t in questions], cfg)))
    clusters = np.array([labels[r["example_id"]] for r in scored], dtype=np.int64)
    stages = n_stages(config.train.epochs)
    sched = build_schedule([np.array(by_rationale[r["rationale_id"]]) for r in scored], clusters, stages, cfg)
    table = {"fp": [fp] * (stages * len(scored)), "stage": [t for t in range(1, stages + 1) for _ in scored],
             "example_id": [r["example_id"] for _ in range(stages) for r in scored],
             "rationale_id": [r["rationale_id"] for _ in range(stages) for r in scored],
             "prefix_steps": sched.prefix.ravel().tolist()}       # stage by stage, as `scored`
    plots = plot_schedule(sched, report_dir / f"curriculum-{fp}")
    out = Curriculum(fp=fp, stages=stages, shards_dir=str(shards_dir), n_rationales=len(scored),
                     n_unscored=len(rows) - len(scored), budget=sched.budget, achieved=sched.achieved,
                     start_achieved=sched.start_achieved, cluster_selected=sched.cluster_selected,
                     cluster_sizes=np.bincount(clusters).tolist(), mean_prefix=sched.prefix.mean(axis=1).tolist(),
                     plots=plots, markdown=schedule_markdown(sched, plots, report_dir))
    tmp = temp_dir_for(shards_dir)

    def shards(con) -> None:   # stage=N/ folders, by DuckDB, published by rename inside the transaction
        catalog.copy_to(con, "curriculum_shards", tmp / "shards", fp=fp)
        publish_dir(tmp / "shards", shards_dir)
        tmp.rmdir()

    return Made(out, {"curriculum": table}, within=shards)


def curriculum_shard(shards_dir: str | Path, stage: int) -> dict[str, int]:
    """rationale_id -> prefix_steps for one curriculum stage, read from its Parquet shard."""
    import pyarrow.parquet as pq

    tbl = pq.read_table(Path(shards_dir) / f"stage={stage}", columns=["rationale_id", "prefix_steps"])
    return dict(zip(tbl.column("rationale_id").to_pylist(), tbl.column("prefix_steps").to_pylist()))


CURRICULUM = Stage("curriculum", CurriculumInputs, Curriculum, curriculum_lineage, build_curriculum,
                   still_valid=lambda config, done: Path(done.shards_dir).exists())


@CURRICULUM.in_prefect
def _curriculum_in_prefect(run, config: DistillConfig, inputs: CurriculumInputs, lineage: Lineage) -> Curriculum:
    from prefect.artifacts import create_markdown_artifact

    out = run()
    create_markdown_artifact(key="curriculum", markdown=artifact_markdown(out.markdown, workspace_of(config).root / "reports"),
                             description=f"curriculum {out.fp}; Parquet shards per stage: {out.shards_dir}")
    return out
