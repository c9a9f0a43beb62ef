"""Where the teacher is unsure (issue 30's diagnosis for logit distillation): from a finished kd / kpod_kd run's
teacher-scores stage, the teacher's mean entropy (nats, over its renormalised top-k) and top-1 probability on the
tokens the loss reads, split into the arithmetic results (the number after each '=') and every other token (the
wording), and how often the teacher's top-1 is the token its rationale continues with. A distribution that is
one-hot where the student errs (the results) carries nothing beyond the text there.

    python bench/teacher_peakedness.py RUN_JSON [--workspace DIR] [--rows 2000]

RUN_JSON: a committed per-run file of a kd arm (e.g. docs/studies/study-teacher/kd/seed-0.json), whose resolved
config names the workspace (or --workspace: a copy of it). Reads the catalog only: nothing runs. --smoke: a micro
run made here (the untrained student scoring its own rationales; seconds, for the test suite).
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from keystep.config import DistillConfig  # noqa: E402
from storage.workspace import Workspace  # noqa: E402
from tasks.formats import NO_CUT, encode_rationale  # noqa: E402
from tasks.stage import kept_rationales  # noqa: E402
from tasks.teacher_scores import entropy_and_top1, load_scores, sequence_hash  # noqa: E402


def by_token_kind(tokenizer, config: DistillConfig, rows: list[dict], loaded: dict) -> dict:
    """Per kind ('result': the digits after '=', 'wording': the rest), over the supervised tokens: positions, mean
    entropy, mean top-1 probability, and the share where the teacher's top-1 is the token that follows."""
    sums = {kind: np.zeros(4) for kind in ("result", "wording")}
    for r in rows:
        enc = encode_rationale(tokenizer, config.teacher, r, NO_CUT)
        scored = loaded.get(sequence_hash(enc.ids))
        if scored is None:
            continue
        ids, lp = scored
        first = next(j for j, y in enumerate(enc.labels) if y >= 0)
        ent, top1 = entropy_and_top1(lp)          # row j - 1: the distribution of token j
        after_eq = False
        for j in range(first, len(enc.ids)):
            piece = tokenizer.decode([enc.ids[j]]).strip()
            kind = "result" if after_eq and piece.isdigit() else "wording"
            sums[kind] += [1, ent[j - 1], top1[j - 1], float(ids[j - 1, 0] == enc.ids[j])]
            after_eq = "=" in piece or (after_eq and (piece.isdigit() or not piece))
    return {kind: {"positions": int(s[0]), "mean_entropy": s[1] / s[0], "mean_top1_prob": s[2] / s[0],
                   "top1_is_next_token": s[3] / s[0]} for kind, s in sums.items() if s[0]}


def run_of(run_json: Path, workspace: str | None):
    """The run's config (its workspace replaced by `workspace`) and its prepare phase, read from the catalog."""
    from flows.phases import CatalogStages, generate_stages, prepare_stages

    config = DistillConfig.model_validate(json.loads(run_json.read_text())["config"])
    if workspace:
        config = config.model_copy(update={"storage": config.storage.model_copy(update={"workspace": workspace})})
    run = CatalogStages(config)
    return config, prepare_stages(config, generate_stages(config, run), run)


def smoke_run(tmp: Path):
    from tasks.teacher_scores import TEACHER_SCORES, TeacherScoresInputs
    from tests.tasks.helpers import prepared

    ws = Workspace(tmp / "ws")
    cfg, _, gen, st = prepared(ws, n=12)
    cfg = cfg.model_copy(update={"teacher_scores": cfg.teacher_scores.model_copy(update={"model": st.model_dir, "k": 5})})
    scores = TEACHER_SCORES.run(ws, cfg, TeacherScoresInputs(generation=gen, student=st))

    class Phase:
        generation, student, teacher_scores = gen, st, scores
    return cfg, Phase


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_json", nargs="?")
    ap.add_argument("--workspace")
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        config, phase = smoke_run(Path(tempfile.mkdtemp(prefix="keystep-peakedness-")))
    elif args.run_json:
        config, phase = run_of(Path(args.run_json), args.workspace)
    else:
        sys.exit("give a kd run's file, e.g. docs/studies/study-teacher/kd/seed-0.json")
    if phase.teacher_scores is None:
        sys.exit(f"{args.run_json}: the run has no teacher-scores stage (not a kd / kpod_kd arm)")
    from transformers import AutoTokenizer

    ws = Workspace(config.storage.workspace)
    tok = AutoTokenizer.from_pretrained(phase.student.model_dir)
    rows = kept_rationales(ws.catalog(), config, phase.generation)[:args.rows]
    hashes = [sequence_hash(encode_rationale(tok, config.teacher, r, NO_CUT).ids) for r in rows]
    kinds = by_token_kind(tok, config, rows, load_scores(ws, phase.teacher_scores, hashes))
    print(f"teacher {config.teacher_scores.model}, top-{phase.teacher_scores.k}, {len(rows)} kept rationales")
    print("tokens | positions | mean entropy (nats) | mean top-1 probability | top-1 is the next token")
    for kind, v in kinds.items():
        print(f"{kind} | {v['positions']} | {v['mean_entropy']:.4f} | {v['mean_top1_prob']:.4f} | "
              f"{v['top1_is_next_token']:.1%}")
    result, wording = kinds.get("result"), kinds.get("wording")
    print(json.dumps({"bench": "teacher_peakedness", "metric": "teacher's mean entropy (nats) on the arithmetic results",
                      "value": round(result["mean_entropy"], 4) if result else None,
                      "baseline": round(wording["mean_entropy"], 4) if wording else None,
                      "ratio": round(result["mean_entropy"] / wording["mean_entropy"], 4) if result and wording and
                      wording["mean_entropy"] else None,
                      "goal": "diagnosis (no goal): the baseline is the teacher's entropy on the other tokens",
                      "met": None, "details": kinds}))


if __name__ == "__main__":
    main()
