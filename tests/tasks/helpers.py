"""Tiny prepared pipelines for stage tests (plain functions, no Prefect)."""
from keystep.config import load_config
from tasks import ingest, student, teacher
from tests.conftest import ROOT

# a token-weighting module small enough for a test
MICRO_MASKS = {"token_weights.epochs": 1, "token_weights.batch_size": 8, "token_weights.predictor_hidden": 32,
               "token_weights.predictor_layers": 1, "token_weights.mlp_hidden": 16, "token_weights.attention_heads": 2}


def prepared(ws, n=48, **overrides):
    """(config, catalog, generation, untrained student) of the micro config with `n` training problems."""
    cfg = load_config(ROOT / "configs" / "micro.yaml", {"storage.workspace": str(ws.root), "data.train.n": n, **overrides})
    dataset = ingest.ingest(ws, cfg.data.train)
    gen = teacher.generate_rationales(ws, cfg, dataset)
    st = student.STUDENT.run(ws, cfg, student.StudentInputs(generation=gen))
    return cfg, ws.catalog(), gen, st


def predictor_of(ws, cfg, gen, st):
    """The student the token weights read for `predictor: student`: warmed up as the prepare flow does."""
    from tasks.warmup import warm_up_student
    return warm_up_student(ws, cfg, gen, st, cfg.predictor_warmup_epochs)


def kpod_prepared(ws, n=32, epochs=4, **overrides):
    """`prepared` plus what KPOD training reads: steps, token weights, step difficulty and the curriculum."""
    from tasks import curriculum, difficulty, steps, token_weights

    cfg, cat, gen, st = prepared(ws, n=n, **{"train.loss": "kpod", "train.epochs": epochs, "student.max_length": 256,
                                             **MICRO_MASKS, **overrides})
    stp = steps.STEPS.run(ws, cfg, steps.StepsInputs(generation=gen, student=st))
    tw = token_weights.TOKEN_WEIGHTS.run(ws, cfg, token_weights.TokenWeightsInputs(
        generation=gen, steps=stp, predictor=predictor_of(ws, cfg, gen, st)))
    dif = difficulty.DIFFICULTY.run(ws, cfg, difficulty.DifficultyInputs(
        generation=gen, steps=stp, token_weights=tw, scorer=st))
    cur = curriculum.CURRICULUM.run(ws, cfg, curriculum.CurriculumInputs(generation=gen, difficulty=dif))
    return cfg, cat, gen, st, {"steps": stp, "token_weights": tw, "curriculum": cur}


def ingest_spec(catalog, spec):
    """Ingest one dataset spec into the workspace that holds `catalog`."""
    from storage.workspace import Workspace
    return ingest.ingest(Workspace(catalog.path.parent), spec)


def generate_with(catalog, teacher_cfg, dataset, **kwargs):
    """Teacher rationales for `dataset` with only the teacher section set (the rest: defaults)."""
    from keystep.config import DistillConfig, StorageConfig
    from storage.workspace import Workspace
    ws = Workspace(catalog.path.parent)
    config = DistillConfig(teacher=teacher_cfg, storage=StorageConfig(workspace=str(ws.root)))
    return teacher.generate_rationales(ws, config, dataset, **kwargs)
