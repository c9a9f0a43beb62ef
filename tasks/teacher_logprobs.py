"""The teacher's top-k log-probabilities captured while it generated (`teacher.logprobs: k`, issue 30).

Input: backend results carrying `TokenLogprobs` (tasks/teacher_backends.py). Output: Parquet parts under
`<workspace>/teacher-logprobs/<teacher_fp>/`, one row per rationale, indexed by the catalog's
`generation_logprobs`; the export writes them as columns. Shard workers put the captured values into their
spool part files (`spool_columns`); the flow process moves them here when it ingests the spool
(`store_captured`, inside the same transaction as the rationales), so a rationale and its log-probabilities are
stored together or not at all. Token ids (vLLM) are stored as int32 bytes, log-probabilities as float16 bytes
(4 + 2 bytes per value); token strings (an endpoint that gives no ids) as lists.
"""
from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np

from storage.catalog import sql
from storage.workspace import write_atomic
from tasks.teacher_backends import TokenLogprobs

# the columns a spool part carries for a result with captured log-probabilities (None otherwise)
SPOOL_COLUMNS = ("lp_k", "lp_ids", "lp_top_ids", "lp_top_logprobs", "lp_tokens", "lp_top_tokens", "lp_top_values")


def spool_columns(captured: TokenLogprobs | None, k: int) -> dict:
    """A result row's captured values: ids and log-probabilities as bytes when ids are known (rectangular, k per
    token), else token strings and values as lists."""
    out = dict.fromkeys(SPOOL_COLUMNS)
    if captured is None:
        return out
    out["lp_k"] = k
    if captured.ids_known and all(len(t) == k for t in captured.top):
        out |= {"lp_ids": np.asarray(captured.tokens, np.int32).tobytes(),
                "lp_top_ids": np.asarray(captured.top, np.int32).tobytes(),
                "lp_top_logprobs": np.asarray(captured.top_logprobs, np.float16).tobytes()}
    else:
        out |= {"lp_tokens": [str(t) for t in captured.tokens], "lp_top_tokens": [[str(t) for t in top] for top in captured.top],
                "lp_top_values": captured.top_logprobs}
    return out


def store_captured(con, catalog, root: Path, teacher_fp: str, rows: list[dict]) -> int:
    """Inside the ingest's transaction: the captured columns of `rows` (popped from them) into one Parquet part and
    the catalog's index. Returns how many rationales had them."""
    import pyarrow as pa

    captured = []
    for r in rows:
        values = {c: r.pop(c, None) for c in SPOOL_COLUMNS}
        if values["lp_k"] is not None:
            captured.append((r["rationale_id"], values))
    if not captured:
        return 0
    rel = Path("teacher-logprobs") / teacher_fp / f"part-{uuid.uuid4().hex[:12]}.parquet"
    n_tokens = [len(v["lp_top_logprobs"]) // (2 * v["lp_k"]) if v["lp_ids"] is not None else len(v["lp_tokens"])
                for _, v in captured]
    # an orphan part (a crash before the commit) is never indexed, so never read
    write_atomic(root / rel, pa.table({"rationale_id": [rid for rid, _ in captured], "n_tokens": n_tokens,
                      "k": [v["lp_k"] for _, v in captured],
                      **{c.removeprefix("lp_"): pa.array([v[c] for _, v in captured], type=kind) for c, kind in (
                          ("lp_ids", pa.binary()), ("lp_top_ids", pa.binary()), ("lp_top_logprobs", pa.binary()),
                          ("lp_tokens", pa.list_(pa.string())), ("lp_top_tokens", pa.list_(pa.list_(pa.string()))),
                          ("lp_top_values", pa.list_(pa.list_(pa.float32()))))}}))
    ids = [rid for rid, _ in captured]
    con.execute(sql("captured_forget"), {"ids": ids})
    catalog.insert(con, "generation_logprobs", {"rationale_id": ids, "teacher_fp": [teacher_fp] * len(ids),
                                                "part": [str(rel)] * len(ids), "n_tokens": n_tokens,
                                                "k": [v["lp_k"] for _, v in captured],
                                                "ids_known": [v["lp_ids"] is not None for _, v in captured]})
    return len(ids)


def load_captured(catalog, root: Path, rationale_ids: list[str]) -> dict[str, TokenLogprobs]:
    """rationale id -> its captured `TokenLogprobs` (ids as ints where known), for those that have them."""
    import pyarrow.parquet as pq

    index = catalog.query("captured_logprobs", ids=list(rationale_ids))
    out: dict[str, TokenLogprobs] = {}
    for part in sorted({r["part"] for r in index}):
        wanted = {r["rationale_id"] for r in index if r["part"] == part}
        for row in pq.read_table(root / part).to_pylist():
            if row["rationale_id"] not in wanted:
                continue
            if row["ids"] is not None:
                n, k = row["n_tokens"], row["k"]
                out[row["rationale_id"]] = TokenLogprobs(
                    tokens=np.frombuffer(row["ids"], np.int32).tolist(),
                    top=np.frombuffer(row["top_ids"], np.int32).reshape(n, k).tolist(),
                    top_logprobs=np.frombuffer(row["top_logprobs"], np.float16).astype(np.float32).reshape(n, k).tolist())
            else:
                out[row["rationale_id"]] = TokenLogprobs(tokens=row["tokens"], top=row["top_tokens"],
                                                         top_logprobs=row["top_values"])
    return out


def captured_summary(catalog, root: Path, teacher_fp: str) -> dict:
    """The generation output's `logprob_tokens` (tokens captured for this teacher) and `logprob_bytes_per_token`."""
    rows = catalog.query("captured_parts", teacher_fp=teacher_fp)
    tokens = sum(r["n_tokens"] for r in rows)
    size = sum((root / r["part"]).stat().st_size for r in rows if (root / r["part"]).exists())
    return {"logprob_tokens": tokens, "logprob_bytes_per_token": size / tokens if tokens else None}
