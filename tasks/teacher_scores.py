"""Teacher-scores stage (issue 30): a model teacher's top-k next-token log-probabilities at every position of the
student's training sequences — the distribution logit distillation trains toward, bought once.

Input: the kept rationales (`Generation`) and the `Student`, whose tokenizer makes the sequences exactly as training
encodes them (`<bos> prompt " " rationale-then-answer <eos>`, tasks/formats.py), and `teacher_scores.model`, a
teacher folder with the same tokenizer. Output: `TeacherScores`; the scores themselves are Parquet parts under
`<workspace>/teacher-scores/<scorer fp>/`, one row per sequence (its hash, its positions, the top-k token ids as
uint16 — int32 past 65,536 tokens — and their log-probabilities as float16), indexed in the catalog's
`teacher_scores` by (scorer fingerprint, sequence hash). So a sequence is scored once per teacher and k whatever
dataset version or run asks for it (+10% data scores 10%), and a killed run loses at most the part in flight.
`score_missing` does the same for any token sequences (the student's own samples, for on-policy distillation).
Never paid twice: a sequence whose rationale the same teacher folder generated through vLLM with `teacher.logprobs`
≥ k takes the top-k vLLM returned while it sampled (raw log-probabilities of the same weights, at the same positions:
the generated ids are the sequence's tokens after its prompt), indexed under its own fingerprint (engine
`captured`); only the others are scored.

Engine `local`: the teacher folder's forward pass on train.device — prefill only, no token generated — sequences
length-bucketed as the difficulty stage's are, log_softmax in float32, then the top k per position.
Engine `vllm`: the same numbers from a vLLM server's `prompt_logprobs` (a vLLM extension of the completions API:
the prompt sent as token ids, one token generated and discarded), `concurrency` requests in flight, transport
faults retried by the `openai` client; the server keystep starts serves the folder with `--max-logprobs k`.
"""
from __future__ import annotations

import functools
import os
import uuid
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from keystep.config import DistillConfig, TeacherScoresConfig
from storage.fingerprint import Lineage, content_hash, file_hash, fingerprint
from storage.workspace import Workspace, write_atomic
from tasks.formats import IGNORE, NO_CUT, encode_rationale, format_prompt
from tasks.stage import Stage, StageInputs, StageOutput, kept_rationales
from tasks.student import Student, pick_device
from tasks.teacher import Generation

CODE_VERSION = "1"


class TeacherScores(StageOutput):
    """The teacher's top-k distributions over every training sequence of a generation (rows of `teacher_scores`
    under `scorer_fp`; Parquet parts in `scores_dir`)."""
    scorer_fp: str
    k: int
    scores_dir: str
    n_sequences: int
    n_scored: int              # scored by the run that made this output; the others were scored before
    n_positions: int
    bytes_per_position: float  # on disk, Parquet included
    # how sure the teacher is where the loss reads it (rationale, answer sentence, <eos>): the mean entropy (nats) of
    # its renormalised top-k and the mean probability of its likeliest token (None: outputs made before they existed)
    mean_entropy: float | None = None
    mean_top1_prob: float | None = None
    # sequences whose distributions came from the generation's captured log-probabilities (teacher.logprobs >= k),
    # indexed under `captured_fp`: not scored again
    n_reused: int = 0
    captured_fp: str | None = None


class TeacherScoresInputs(StageInputs):
    """The kept rationales, and the student whose tokenizer makes the sequences scored."""
    generation: Generation
    student: Student


@functools.lru_cache(maxsize=8)
def _folder_hash(folder: str, newest: float) -> str:   # hashed once per process while no file in it changes
    return file_hash(folder)


def folder_fingerprint(model: str) -> str:
    folder = Path(model).expanduser().resolve()
    newest = max((p.stat().st_mtime for p in folder.rglob("*")), default=0.0)
    return _folder_hash(str(folder), newest)


def scorer_fingerprint(cfg: TeacherScoresConfig, engine: str | None = None) -> str:
    """What a score depends on: the teacher folder's content, k, the engine (`captured`: the log-probabilities vLLM
    returned while generating) and this code."""
    return fingerprint("scorer", {"k": cfg.k, "engine": engine or cfg.engine}, (), CODE_VERSION,
                       {"model": folder_fingerprint(cfg.model)})


def teacher_scores_lineage(config: DistillConfig, inputs: TeacherScoresInputs) -> Lineage:
    return Lineage("teacher-scores", {"scorer": scorer_fingerprint(config.teacher_scores),
                                      "device": config.train.device},
                   (inputs.generation.fp, inputs.student.fp), CODE_VERSION)


def sequence_hash(ids: list[int]) -> str:
    return content_hash(",".join(map(str, ids)))


def check_same_tokenizer(student_dir: str, teacher_dir: str) -> None:
    """Logit distillation compares distributions token by token: one vocabulary, or a clear error naming both."""
    from transformers import AutoTokenizer

    s, t = AutoTokenizer.from_pretrained(student_dir), AutoTokenizer.from_pretrained(teacher_dir)
    if s.get_vocab() != t.get_vocab():
        raise ValueError(f"config key 'teacher_scores.model': the teacher's tokenizer ({teacher_dir}, {len(t)} tokens) "
                         f"is not the student's ({student_dir}, {len(s)} tokens); teacher and student must share one "
                         "(cross-tokenizer distillation is out of scope): e.g. build the teacher with student.tokenizer")


def top_k_scores(model, seqs: list[list[int]], k: int, batch_tokens: int, device: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per sequence, (ids, logprobs), each (len − 1, k): the teacher's k likeliest next tokens at every position
    but the last, and their log-probabilities (float32 log_softmax)."""
    import torch

    from tasks.difficulty import buckets
    from tasks.packing import pad_stack

    model.eval()
    out: list = [None] * len(seqs)
    with torch.no_grad():
        for batch in buckets([SimpleNamespace(ids=s) for s in seqs], batch_tokens):
            ids, mask = pad_stack([seqs[i] for i in batch], 0, dtype=torch.long)
            logits = model(input_ids=ids.to(device), attention_mask=mask.long().to(device)).logits.float()
            top = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
            for r, i in enumerate(batch):
                n = len(seqs[i]) - 1
                out[i] = (top.indices[r, :n].cpu().numpy(), top.values[r, :n].cpu().numpy())
    return out


def parse_prompt_logprobs(entries: list, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """vLLM's `prompt_logprobs` for a prompt of n tokens (entry i: {token id: {logprob, rank, ...}} for token i, the
    first None) -> (ids, logprobs), each (n − 1, k): row j the top k for token j + 1. An entry holds the top k plus
    the prompt's own token when that one ranks lower, so the k likeliest are kept."""
    if not isinstance(entries, list) or len(entries) != n or any(e is None for e in entries[1:]):
        raise ValueError(f"malformed response: prompt_logprobs for {n} tokens expected")
    ids, lps = np.zeros((n - 1, k), np.int64), np.zeros((n - 1, k), np.float32)
    for j, entry in enumerate(entries[1:]):
        top = sorted(((e["logprob"], int(t)) for t, e in entry.items()), key=lambda x: -x[0])[:k]
        if len(top) < k:
            raise ValueError(f"malformed response: {len(top)} log-probabilities at position {j + 1}, {k} asked")
        lps[j], ids[j] = zip(*top)
    return ids, lps


def vllm_top_k_scores(cfg: TeacherScoresConfig, base_url: str, served: str,
                      seqs: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per sequence, what `top_k_scores` returns, from a vLLM server's prompt_logprobs."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    client = openai.OpenAI(base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"),
                           max_retries=cfg.max_retries, timeout=120)

    def one(ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        try:
            r = client.completions.create(model=served, prompt=ids, max_tokens=1, temperature=0.0,
                                          extra_body={"prompt_logprobs": cfg.k})
        except openai.BadRequestError as err:
            if "max allowed" in str(err):
                raise ValueError(f"config key 'teacher_scores.k': {cfg.k} log-probabilities per position is above the "
                                 f"vLLM server's cap at {base_url}; start it with --max-logprobs {cfg.k} or more "
                                 "(teacher_scores.vllm_args), or lower teacher_scores.k") from None
            raise
        entries = getattr(r.choices[0], "prompt_logprobs", None) if r.choices else None
        if entries is None:
            raise ValueError(f"config key 'teacher_scores.server_url': the endpoint at {base_url} returned no "
                             "prompt_logprobs (a vLLM extension of the completions API): point it at a vLLM server, "
                             "or use teacher_scores.engine: local with the teacher's folder")
        return parse_prompt_logprobs(entries, len(ids), cfg.k)

    with ThreadPoolExecutor(cfg.concurrency) as pool:
        return list(pool.map(one, seqs))


def write_part(ws: Workspace, scorer_fp: str, hashes: list[str], scores: list[tuple[np.ndarray, np.ndarray]],
               vocab_size: int, first_rows: list[int] | None = None) -> None:
    """One Parquet part (temp name, then rename) and its index rows, so a part is scored, stored and indexed, or
    not at all. `first_rows`: where each sequence's stored rows start (captured ones start at the prompt's end)."""
    import pyarrow as pa

    id_type = np.uint16 if vocab_size <= 1 << 16 else np.int32
    rel = Path("teacher-scores") / scorer_fp / f"part-{uuid.uuid4().hex[:12]}.parquet"
    write_atomic(ws.root / rel, pa.table({"sequence_hash": hashes, "n_positions": [len(i) for i, _ in scores],
                      "first_row": first_rows or [0] * len(hashes),
                      "id_bytes": [np.dtype(id_type).itemsize] * len(hashes),
                      "ids": [i.astype(id_type).tobytes() for i, _ in scores],
                      "logprobs": [lp.astype(np.float16).tobytes() for _, lp in scores]}))
    catalog = ws.catalog()
    with catalog.transaction() as con:
        catalog.insert(con, "teacher_scores", {"scorer_fp": [scorer_fp] * len(hashes), "sequence_hash": hashes,
                                               "part": [str(rel)] * len(hashes),
                                               "n_positions": [len(i) for i, _ in scores]})


def scorer_fps(scores: TeacherScores) -> list[str]:
    """The fingerprints `scores` reads under: its scorer's, then the captured one's (the scorer's own first)."""
    return [scores.scorer_fp] + ([scores.captured_fp] if scores.captured_fp else [])


def load_scores(ws: Workspace, scores: TeacherScores, hashes: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """sequence hash -> (ids, logprobs as float32), each (positions, k), for those of `hashes` that were scored. Rows a
    part does not hold (a captured sequence's prompt, which the loss never reads) are zeros, as row 0 is in training."""
    import pyarrow.parquet as pq

    wanted: dict[str, str] = {}
    for fp in scorer_fps(scores):
        for r in ws.catalog().query("scored_sequences", scorer_fp=fp, hashes=list(hashes)):
            wanted.setdefault(r["sequence_hash"], r["part"])
    out = {}
    for part in sorted(set(wanted.values())):
        for row in pq.read_table(ws.root / part).to_pylist():
            if wanted.get(row["sequence_hash"]) == part:
                id_type = np.uint16 if row["id_bytes"] == 2 else np.int32
                ids = np.frombuffer(row["ids"], dtype=id_type).reshape(row["n_positions"], scores.k)
                lp = np.frombuffer(row["logprobs"], dtype=np.float16).reshape(row["n_positions"], scores.k)
                pad = ((row.get("first_row") or 0, 0), (0, 0))
                out[row["sequence_hash"]] = (np.pad(ids.astype(np.int64), pad), np.pad(lp.astype(np.float32), pad))
    return out


def sequences_by_hash(tokenizer, config: DistillConfig, rows: list[dict]) -> dict[str, tuple[list[int], list[str]]]:
    """The rows' training sequences, uncut, by hash: (token ids, the rationale ids that encode to them)."""
    out: dict[str, tuple[list[int], list[str]]] = {}
    for r in rows:
        ids = encode_rationale(tokenizer, config.teacher, r, NO_CUT).ids
        out.setdefault(sequence_hash(ids), (ids, []))[1].append(r["rationale_id"])
    return out


def scores_by_rationale(ws: Workspace, config: DistillConfig, tokenizer, rows: list[dict],
                        scores: TeacherScores) -> dict[str, tuple[list[int], np.ndarray, np.ndarray]]:
    """rationale id -> (its training sequence's token ids, the teacher's top-k ids and log-probabilities of the
    token after each position, each (len − 1, k)), for the rows whose sequence `scores` holds."""
    seqs = sequences_by_hash(tokenizer, config, rows)
    loaded = load_scores(ws, scores, list(seqs))
    return {rid: (ids, *loaded[h]) for h, (ids, rids) in seqs.items() if h in loaded for rid in rids}


def entropy_and_top1(lp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of top-k log-probabilities (likeliest first): the entropy in nats of the renormalised top-k, and the
    top-1 probability."""
    p = np.exp(lp - np.logaddexp.reduce(lp, axis=-1, keepdims=True))
    return -(p * np.log(np.clip(p, 1e-30, None))).sum(-1), np.exp(lp[..., 0])


def peakedness(tokenizer, config: DistillConfig, rows: list[dict], loaded: dict) -> tuple[float, float] | None:
    """(mean entropy in nats of the teacher's renormalised top-k, mean probability of its top-1) over the positions that
    predict a supervised token (the rationale on: what Std-CoT and kd train on) of the scored sequences — the
    diagnosis of how much a distribution says beyond its sampled token."""
    entropy = top1 = n = 0.0
    for r in rows:
        enc = encode_rationale(tokenizer, config.teacher, r, NO_CUT)
        scored = loaded.get(sequence_hash(enc.ids))
        if scored is None:
            continue
        first = next(j for j, y in enumerate(enc.labels) if y != IGNORE)    # the first supervised token
        ent, top = entropy_and_top1(scored[1][max(first - 1, 0):])
        entropy, top1, n = entropy + float(ent.sum()), top1 + float(top.sum()), n + len(ent)
    return (entropy / n, top1 / n) if n else None


def teacher_topk(ws: Workspace, config: DistillConfig, tokenizer, rows: list[dict],
                 scores: TeacherScores) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """rationale id -> the teacher's (ids, logprobs) aligned with its training sequence (`Sequence.teacher_topk`):
    row j is the distribution of token j; row 0, which nothing predicts, is zeros."""
    found = scores_by_rationale(ws, config, tokenizer, rows, scores)
    missing = len(rows) - len(found)
    if missing:
        raise ValueError(f"{missing} of {len(rows)} training sequences have no teacher scores (stage {scores.fp}): "
                         "train.loss 'kd' needs the prepare phase's teacher-scores stage for this student and data")
    return {rid: aligned_with_tokens(ids, lp) for rid, (_, ids, lp) in found.items()}


def aligned_with_tokens(ids: np.ndarray, lp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stored rows (row i: the distribution of token i + 1) as `Sequence.teacher_topk` reads them (row j: token j's),
    row 0, which nothing predicts, zeros."""
    return tuple(np.concatenate([np.zeros((1, a.shape[1]), a.dtype), a]) for a in (ids, lp))


def teacher_is_the_scorer(config: DistillConfig) -> bool:
    """Whether what the generation's teacher captured is what the scorer would compute: vLLM serving a folder with
    the scorer's content, prompted through completions (so its prompt tokens are the training sequence's), with vLLM's
    raw log-probabilities (its default `--logprobs-mode`: before temperature and other processing)."""
    t, cfg = config.teacher, config.teacher_scores
    return (t.backend == "vllm" and t.request_api == "completions" and Path(t.model).expanduser().is_dir()
            and not any("processed" in a for a in t.vllm_args)
            and folder_fingerprint(t.model) == folder_fingerprint(cfg.model))


def captured_scores(ws: Workspace, config: DistillConfig, tokenizer, rows: list[dict],
                    todo: set[str]) -> dict[str, tuple[int, np.ndarray, np.ndarray]]:
    """sequence hash -> (first row, top-k ids, log-probabilities) from the log-probabilities the teacher returned
    while generating (teacher.logprobs ≥ k), for the sequences of `todo` whose generated ids are exactly their tokens
    after the prompt vLLM was sent — so row j + first row is the distribution of token j + first row + 1, as scoring
    would give. Sequences that do not line up (a rationale the answer sentence was appended to, tokens sampled in a
    form the tokenizer would not write) are left to the scorer."""
    from transformers import AutoTokenizer

    from tasks.teacher_logprobs import load_captured

    k = config.teacher_scores.k
    # the prompt ids vLLM generated after: the text, tokenized by the teacher folder's tokenizer with its special
    # tokens (completions' default); a folder that does not add <bos> itself gave other distributions than keystep's
    # `<bos> prompt` sequences get, so none of its sequences line up
    served = AutoTokenizer.from_pretrained(config.teacher.model)
    captured = load_captured(ws.catalog(), ws.root, [r["rationale_id"] for r in rows])
    out: dict[str, tuple[int, np.ndarray, np.ndarray]] = {}
    for r in rows:
        lp = captured.get(r["rationale_id"])
        if lp is None or not lp.ids_known or not lp.tokens or len(lp.top[0]) < k:
            continue
        enc = encode_rationale(tokenizer, config.teacher, r, NO_CUT)
        h, start = sequence_hash(enc.ids), len(enc.ids) - len(lp.tokens)
        prompt = served(format_prompt(config.teacher, r["question"])).input_ids
        if h in todo and h not in out and enc.ids[start:] == lp.tokens and enc.ids[:start] == prompt:
            top, lps = np.asarray(lp.top), np.asarray(lp.top_logprobs, np.float32)
            order = np.argsort(-lps, axis=-1, kind="stable")[:, :k]          # the k likeliest, likeliest first
            out[h] = (start - 1, np.take_along_axis(top, order, -1), np.take_along_axis(lps, order, -1))
    return out


@contextmanager
def scorer(ws: Workspace, cfg: TeacherScoresConfig, device: str, scorer_fp: str):
    """The engine as one function: token sequences -> their (ids, logprobs); a vLLM server keystep starts lives
    as long as the stage's scoring does."""
    from tasks.student import load_student
    from tasks.teacher_backends import vllm_server

    if cfg.engine == "local":
        device = pick_device(device)
        model, _ = load_student(cfg.model, device=device)
        yield lambda seqs: top_k_scores(model, seqs, cfg.k, cfg.batch_tokens, device)
    elif cfg.server_url:
        yield lambda seqs: vllm_top_k_scores(cfg, cfg.server_url, cfg.model, seqs)
    else:
        args = list(cfg.vllm_args)
        if "--max-logprobs" not in args:
            args += ["--max-logprobs", str(cfg.k)]
        with vllm_server(cfg.vllm_python, cfg.model, ws.root / "logs" / f"vllm-scorer-{scorer_fp}.log", "teacher", 0,
                         args, 600, "teacher_scores.vllm_python") as url:
            yield lambda seqs: vllm_top_k_scores(cfg, url, "teacher", seqs)


def score_missing(ws: Workspace, cfg: TeacherScoresConfig, device: str, seqs: dict[str, list[int]], vocab_size: int,
                  skip: set[str] = frozenset(), score=None) -> list[str]:
    """Any token sequences (hash -> ids) through the scorer, each once: those it has not scored yet (and not in
    `skip`) are scored and stored, `commit_every` to a part; returns the hashes scored now. The stage runs it on the
    student's training sequences; on-policy distillation (tasks/on_policy.py) on the student's own samples, step by
    step, with the `scorer` it keeps open (`score`)."""
    scorer_fp = scorer_fingerprint(cfg)
    done = {r["sequence_hash"] for r in ws.catalog().query("scored_sequences", scorer_fp=scorer_fp, hashes=list(seqs))}
    todo = [h for h in seqs if h not in done and h not in skip]
    if todo:
        with nullcontext(score) if score else scorer(ws, cfg, device, scorer_fp) as score:
            for start in range(0, len(todo), cfg.commit_every):
                chunk = todo[start:start + cfg.commit_every]
                write_part(ws, scorer_fp, chunk, score([seqs[h] for h in chunk]), vocab_size)
    return todo


def score_sequences(ws: Workspace, config: DistillConfig, inputs: TeacherScoresInputs, lineage: Lineage) -> TeacherScores:
    from transformers import AutoTokenizer

    cfg, catalog = config.teacher_scores, ws.catalog()
    check_same_tokenizer(inputs.student.model_dir, cfg.model)
    tok = AutoTokenizer.from_pretrained(inputs.student.model_dir)
    rows = kept_rationales(catalog, config, inputs.generation)
    seqs = {h: ids for h, (ids, _) in sequences_by_hash(tok, config, rows).items()}
    scorer_fp = scorer_fingerprint(cfg)
    captured_fp = scorer_fingerprint(cfg, "captured") if teacher_is_the_scorer(config) else None
    from_generation: set[str] = set()
    if captured_fp:    # what the teacher gave while generating, taken first (parts as scoring writes them)
        done = {r["sequence_hash"] for fp in (scorer_fp, captured_fp)
                for r in catalog.query("scored_sequences", scorer_fp=fp, hashes=list(seqs))}
        reused = captured_scores(ws, config, tok, rows, set(seqs) - done)
        for start in range(0, len(reused), cfg.commit_every):
            chunk = list(reused)[start:start + cfg.commit_every]
            write_part(ws, captured_fp, chunk, [reused[h][1:] for h in chunk], len(tok), [reused[h][0] for h in chunk])
        from_generation = {r["sequence_hash"] for r in catalog.query("scored_sequences", scorer_fp=captured_fp,
                                                                      hashes=list(seqs))}
    todo = score_missing(ws, cfg, config.train.device, seqs, len(tok), skip=from_generation)
    (ws.root / "teacher-scores" / scorer_fp).mkdir(parents=True, exist_ok=True)
    index = {r["sequence_hash"]: r for fp in filter(None, (captured_fp, scorer_fp))        # the scorer's own last: kept
             for r in catalog.query("scored_sequences", scorer_fp=fp, hashes=list(seqs))}
    parts = {r["part"] for r in index.values()}
    positions_in_parts = sum(r["n_positions"] for fp in filter(None, (scorer_fp, captured_fp))
                             for r in catalog.query("scorer_parts", scorer_fp=fp) if r["part"] in parts)
    size = sum((ws.root / p).stat().st_size for p in parts)
    n_captured = sum(captured_fp is not None and f"/{captured_fp}/" in r["part"] for r in index.values())
    out = TeacherScores(fp=lineage.fp, scorer_fp=scorer_fp, k=cfg.k, scores_dir=str(ws.root / "teacher-scores" / scorer_fp),
                        n_sequences=len(seqs), n_scored=len(todo), n_positions=sum(r["n_positions"] for r in index.values()),
                        bytes_per_position=size / max(positions_in_parts, 1), n_reused=n_captured,
                        captured_fp=captured_fp if n_captured else None)
    sure = peakedness(tok, config, rows, load_scores(ws, out, list(seqs)))
    return out.model_copy(update=dict(zip(("mean_entropy", "mean_top1_prob"), sure))) if sure else out


def scores_still_there(config: DistillConfig, done: TeacherScores) -> bool:
    return all((Path(done.scores_dir).parent / fp).exists() for fp in scorer_fps(done))


TEACHER_SCORES = Stage("teacher-scores", TeacherScoresInputs, TeacherScores, teacher_scores_lineage, score_sequences,
                       still_valid=scores_still_there, tags=["gpu"])


# ---- in Prefect: what it cost -----------------------------------------------------------------------------------
@TEACHER_SCORES.in_prefect
def _teacher_scores_in_prefect(run, config: DistillConfig, inputs: TeacherScoresInputs, lineage: Lineage) -> TeacherScores:
    from prefect import get_run_logger

    out = run()
    get_run_logger().info("teacher scores (top-%d): %d sequences, %d scored now, %d from the log-probabilities captured "
                          "while generating (the rest stored before), %d positions, %.0f bytes per position; on the "
                          "supervised tokens mean entropy %.3f nats, top-1 probability %.3f", out.k, out.n_sequences,
                          out.n_scored, out.n_reused, out.n_positions, out.bytes_per_position, out.mean_entropy or 0.0,
                          out.mean_top1_prob or 0.0)
    return out
