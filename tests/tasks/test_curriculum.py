import itertools
import math

import numpy as np
import pytest

from keystep.config import CurriculumConfig
from tasks.curriculum import build_schedule, diversity_objective, greedy_max, n_stages, question_clusters, curriculum_shard


def random_instance(rng: np.random.Generator, n: int):
    cost = rng.uniform(0.0, 10.0, n) * (rng.random(n) > 0.1)  # some zero-cost elements
    cluster = rng.integers(0, rng.integers(1, 6), n)
    beta = float(rng.choice([0.0, 1.0, 12.0, 40.0]))
    budget = float(rng.uniform(0.0, 1.0) * cost.sum())
    return cost, cluster, beta, budget


def brute_force(cost, cluster, beta, budget) -> float:
    best = 0.0
    for r in range(len(cost) + 1):
        for s in itertools.combinations(range(len(cost)), r):
            s = np.array(s, dtype=np.int64)
            if cost[s].sum() <= budget + 1e-9:
                best = max(best, diversity_objective(s, cost, cluster, beta))
    return best


def test_objective_is_monotone_and_submodular_on_random_instances():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(2, 10))
        cost, cluster, beta, _ = random_instance(rng, n)
        b = np.nonzero(rng.random(n) < 0.6)[0]
        a = b[rng.random(b.size) < 0.5]                      # A ⊆ B
        outside = np.setdiff1d(np.arange(n), b)
        if outside.size == 0:
            continue
        e = int(rng.choice(outside))
        f = lambda s: diversity_objective(np.array(sorted(s), dtype=np.int64), cost, cluster, beta)  # noqa: E731
        gain_a = f(set(a) | {e}) - f(set(a))
        gain_b = f(set(b) | {e}) - f(set(b))
        assert gain_a >= -1e-9 and gain_b >= -1e-9          # monotone
        assert gain_a >= gain_b - 1e-9                       # diminishing returns


def test_solver_respects_the_budget_and_reaches_half_of_the_optimum_on_every_instance():
    rng = np.random.default_rng(1)
    ratios = []
    for _ in range(250):
        cost, cluster, beta, budget = random_instance(rng, int(rng.integers(1, 12)))
        sel = greedy_max(cost, cluster, budget, beta)
        assert len(set(sel.chosen.tolist())) == len(sel.chosen)
        assert cost[sel.chosen].sum() <= budget + 1e-9
        assert sel.value == pytest.approx(diversity_objective(sel.chosen, cost, cluster, beta))
        opt = brute_force(cost, cluster, beta, budget)
        ratio = sel.value / opt if opt > 0 else 1.0
        assert ratio >= 0.5, (cost, cluster, beta, budget)
        assert sel.value >= sel.greedy_value - 1e-9          # +Max never loses to plain greedy
        ratios.append(ratio)
    print(f"Greedy+Max / brute-force optimum: mean {np.mean(ratios):.4f}, min {np.min(ratios):.4f} over {len(ratios)}")
    assert np.mean(ratios) > 0.9


def test_solver_with_a_negative_budget_selects_nothing():
    sel = greedy_max(np.array([1.0, 2.0]), np.array([0, 1]), -0.5, 12.0)
    assert sel.chosen.size == 0 and sel.value == 0.0


def schedule(n=200, epochs=8, **cfg):
    rng = np.random.default_rng(2)
    diffs = [rng.uniform(0.1, 3.0, int(rng.integers(1, 6))) for _ in range(n)]
    clusters = rng.integers(0, 5, n)
    return diffs, clusters, build_schedule(diffs, clusters, n_stages(epochs), CurriculumConfig(**cfg))


def test_schedule_starts_with_the_last_step_and_ends_with_whole_rationales():
    diffs, _, s = schedule(start="last_step")
    n_steps = np.array([len(d) for d in diffs])
    assert s.prefix.shape == (4, 200)
    assert s.start_achieved == pytest.approx(sum(d[-1] for d in diffs))   # c_i(0) = n_i − 1
    assert (s.prefix[-1] == 0).all()                                       # stage T: whole rationales
    assert (s.prefix[0] <= n_steps - 1).all()
    assert (np.diff(s.prefix, axis=0) <= 0).all()                          # steps are only ever given up
    assert (np.diff(s.prefix[:-1], axis=0) >= -1).all()                    # Δs = 1 per stage
    total = sum(d.sum() for d in diffs)
    assert s.budget[-1] == pytest.approx(total) and s.achieved[-1] == pytest.approx(total)   # D(T) = B
    c0, p, t_max = 0.3 * total, 0.5, 4
    u = (total - c0) * (p + 1) / t_max ** (p + 1)
    assert s.budget[0] == pytest.approx(u / (p + 1) + c0)
    for t in range(t_max - 1):                              # never over the stage's budget
        assert s.achieved[t] <= max(s.budget[t], s.achieved[t - 1] if t else s.start_achieved) + 1e-9


def test_budget_start_fits_c0_and_the_first_stage_selects():
    """curriculum.start 'budget': H(0) ≤ C0 = D(0), every example starts at n_i or n_i − 1 input steps, and stage 1
    has budget left to select from."""
    diffs, _, s = schedule(start="budget")
    n_steps = np.array([len(d) for d in diffs])
    total = sum(d.sum() for d in diffs)
    assert 0 < s.start_achieved <= 0.3 * total + 1e-9
    assert s.start_achieved > 0.25 * total                      # the solver fills most of C0
    assert sum(s.cluster_selected[0]) > 0
    assert (s.prefix[0] >= n_steps - 2).all() and (s.prefix[-1] == 0).all()


def test_ablation_switches():
    _, _, flat = schedule(progressive=False)
    assert (flat.prefix == 0).all()
    diffs, clusters, no_div = schedule(diversity=False)
    _, _, with_div = schedule()
    assert no_div.prefix.tolist() != with_div.prefix.tolist() or no_div.cluster_selected != with_div.cluster_selected
    assert n_stages(10) == 5 and n_stages(3) == 2 and n_stages(1) == 1


def test_diversity_term_spreads_the_selection_over_clusters():
    # budget 10: two cluster-0 items fill it exactly (ΔH = 10), one of each cluster gives ΔH = 9
    cost, cluster = np.array([5.0, 5.0, 4.0, 4.0]), np.array([0, 0, 1, 1])
    plain = greedy_max(cost, cluster, 10.0, beta=0.0)
    diverse = greedy_max(cost, cluster, 10.0, beta=12.0)
    assert sorted(cluster[plain.chosen].tolist()) == [0, 0] and plain.value == 10.0
    assert sorted(cluster[diverse.chosen].tolist()) == [0, 1]
    assert diverse.value == pytest.approx(9.0 + 2 * 12.0)


def test_question_clusters_group_similar_questions():
    qs = [f"Mia has {i} apples and buys more apples." for i in range(20)] + \
         [f"A train travels {i} miles per hour for hours." for i in range(20)]
    labels = question_clusters(qs, CurriculumConfig(clusters=2))
    assert len(set(labels[:20])) == 1 and len(set(labels[20:])) == 1 and labels[0] != labels[20]
    assert question_clusters(qs[:1], CurriculumConfig()).tolist() == [0]


def test_sentence_model_embeddings_cluster_questions(tmp_path):
    # a tiny random BERT encoder + WordPiece tokenizer built here (no downloads); mean-pooled, unit norm
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    from tasks.curriculum import sentence_embeddings

    qs = [f"Mia has {i} apples and buys more apples." for i in range(10)] + \
         [f"A train travels {i} miles per hour for hours." for i in range(10)]
    raw = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(qs, trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]")
    tok.save_pretrained(tmp_path)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path)
    x = sentence_embeddings(qs, str(tmp_path), batch_size=8)
    assert x.shape == (20, 32) and np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    labels = question_clusters(qs, CurriculumConfig(embedding="sentence-model", embedding_model=str(tmp_path), clusters=2))
    assert len(labels) == 20 and set(labels.tolist()) <= {0, 1}
    with pytest.raises(ValueError, match="curriculum.embedding_model"):
        question_clusters(qs, CurriculumConfig(embedding="sentence-model", clusters=2))


def test_stage_writes_the_table_and_one_parquet_shard_per_stage(tmp_path):
    from storage.workspace import Workspace
    from tasks.curriculum import CURRICULUM, CurriculumInputs
    from tasks.difficulty import Difficulty
    from tests.tasks.helpers import prepared

    ws = Workspace(tmp_path)
    cfg, cat, gen, st = prepared(ws, n=40, **{"train.epochs": 6})
    # step difficulties written directly: this test is about the schedule's storage
    rows = cat.query("kept_rationales", dataset_fp=gen.dataset_fp, teacher_fp=gen.teacher_fp, only_correct=True)
    with cat.transaction() as con:
        cat.insert(con, "step_difficulty", [{"difficulty_fp": "d0", "rationale_id": r["rationale_id"], "step_index": k,
                                             "difficulty": 1.0 + k, "n_tokens": 5}
                                            for i, r in enumerate(rows) for k in range(1 + i % 3)])
    d0 = Difficulty(fp="d0", n_rationales=len(rows), n_steps=0, scoring_model="", device="cpu", mean=0.0, max=0.0)
    s = CURRICULUM.run(ws, cfg, CurriculumInputs(generation=gen, difficulty=d0))
    fp = s.fp
    assert s.stages == 3 and s.n_rationales == len(rows)
    table = cat.query("curriculum_of", fp=fp)
    assert len(table) == 3 * len(rows)
    for t in (1, 2, 3):
        shard = curriculum_shard(s.shards_dir, t)
        assert shard == {r["rationale_id"]: r["prefix_steps"] for r in table if r["stage"] == t}
    assert sorted(p.name for p in ws.curriculum_dir(fp).iterdir()) == ["stage=1", "stage=2", "stage=3"]
    assert not [p for p in ws.curriculum_dir(fp).parent.iterdir() if p.name.startswith(".tmp")]   # published by rename
    assert all(curriculum_shard(s.shards_dir, 3)[r] == 0 for r in curriculum_shard(s.shards_dir, 3))
    for plot in s.plots.values():
        assert open(plot, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "budget D(t)" in s.markdown and "coverage.png" in s.markdown
    assert math.isclose(s.budget[-1], sum(1.0 + k for i in range(len(rows)) for k in range(1 + i % 3)))


def test_the_report_shows_no_stage_table_for_one_stage_and_names_whole_rationale_stages():
    from tasks.curriculum import schedule_markdown

    _, _, s = schedule(start="last_step")
    text = schedule_markdown(s, {})
    last = [x for x in text.splitlines() if x.startswith("| 4 |")][0]
    assert last.endswith("| — | whole rationales |")                  # not "selected 0, mean prefix 0.00"
    one = s.__class__(**{**s.__dict__, "budget": s.budget[:1], "achieved": s.achieved[:1],
                         "cluster_selected": s.cluster_selected[:1], "prefix": s.prefix[-1:]})
    text = schedule_markdown(one, {})
    assert "whole rationale" in text and "| stage |" not in text and "0.00" not in text
