"""Tiny prepared pipelines for stage tests (plain functions, no Prefect)."""
from keystep.config import load_config
from tasks import ingest, student, teacher
from tests.conftest import ROOT


def prepared(ws, n=48, **overrides):
    cfg = load_config(ROOT / "configs" / "micro.yaml", {"storage.workspace": str(ws.root), "data.train.n": n, **overrides})
    cat = ws.catalog()
    dfp = ingest.dataset_fingerprint(cfg.data.train)
    ingest.ingest(cat, cfg.data.train, dfp)
    gfp = teacher.generation_fingerprint(cfg.teacher, dfp)
    gen = {**teacher.generate_rationales(cat, cfg.teacher, dfp, gfp), "fingerprint": gfp}
    corpus = [r["question"] + " " + r["text"] for r in cat.query(
        "kept_rationales", dataset_fp=dfp, teacher_fp=gen["teacher_fp"], only_correct=True)]
    sfp = student.student_fingerprint(cfg.student, gfp)
    st = student.init_student(cat, cfg.student, corpus, ws.model_dir(sfp), sfp)
    return cfg, cat, gen, st


def kpod_prepared(ws, n=32, epochs=4, **overrides):
    """`prepared` plus what KPOD training reads: steps, token weights, step difficulty and the curriculum."""
    from keystep.config import MasksConfig
    from tasks import curriculum, difficulty, keypoints, steps

    cfg, cat, gen, st = prepared(ws, n=n, **{"train.loss": "kpod", "train.epochs": epochs, "student.max_length": 256,
                                             **overrides})
    sfp = steps.steps_fingerprint(cfg.steps, gen["fingerprint"], st["student_fp"])
    steps.split_rationales(cat, cfg.steps, cfg.teacher, gen, st["model_dir"], sfp)
    mcfg = MasksConfig(epochs=1, batch_size=8, predictor_hidden=32, predictor_layers=1, mlp_hidden=16, attention_heads=2)
    wfp = keypoints.weights_fingerprint(mcfg, sfp, st["student_fp"])
    keypoints.learn_token_weights(cat, mcfg, cfg.teacher, gen, sfp, st, cfg.student.max_length, wfp)
    dfp = difficulty.difficulty_fingerprint(cfg.difficulty, wfp, st["student_fp"])
    difficulty.score_difficulty(cat, cfg.difficulty, cfg.teacher, gen, sfp, wfp, st, False,
                                cfg.student.max_length, dfp)
    cfp = curriculum.curriculum_fingerprint(cfg.curriculum, dfp, epochs)
    cur = curriculum.build_curriculum(cat, cfg.curriculum, cfg.teacher, gen, dfp, epochs, ws.curriculum_dir(cfp),
                                      ws.root / "reports", cfp)
    kpod = {"weights_fp": wfp, "steps_fp": sfp, "shards_dir": cur["shards_dir"], "stages": cur["stages"]}
    return cfg, cat, gen, st, kpod
