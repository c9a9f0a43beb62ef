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
