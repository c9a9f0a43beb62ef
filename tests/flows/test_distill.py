"""End-to-end flow tests on the micro config through a real (temporary) Prefect server.

Caching is asserted from Prefect's own task-run states: a rerun of the same config executes no stage, and
a changed training setting re-executes exactly training and evaluation."""
import asyncio

import pytest

from tests.conftest import micro_config

STAGES = {"ingest", "generate", "student", "steps", "train", "evaluate"}


def stage_runs(before: set, extra: set = frozenset()) -> tuple[dict, set]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import TaskRunSort

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(limit=200, sort=TaskRunSort.EXPECTED_START_TIME_DESC)

    runs = [r for r in asyncio.run(read()) if r.id not in before]
    executed, cached = [], []
    for r in runs:
        stage = r.name.rsplit("-", 1)[0]
        if stage not in STAGES | extra or r.state.state_details.child_flow_run_id:  # skip subflow placeholders
            continue
        (cached if r.state.name == "Cached" else executed).append(stage)
    return {"executed": sorted(executed), "cached": sorted(cached)}, before | {r.id for r in runs}


def assert_lineage_is_what_was_hashed(cat, stages: set[str]) -> None:
    """Every stage output's recorded lineage hashes to its fingerprint, and every upstream it names exists."""
    import json

    from storage.fingerprint import Lineage

    rows = cat.execute("select * from stage_outputs")
    recorded = {r["fingerprint"] for r in rows}
    assert stages <= {r["stage"] for r in rows}
    for r in rows:
        lineage = Lineage(r["stage"], json.loads(r["config_json"]), tuple(json.loads(r["upstream_json"])),
                          r["code_version"], json.loads(r["extra_json"]))
        assert lineage.fp == r["fingerprint"], f"{r['stage']}: recorded lineage is not what was hashed"
        assert set(lineage.upstream) <= recorded, f"{r['stage']}: upstream {set(lineage.upstream) - recorded} missing"


def flow_run(run_id: str):
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return await client.read_flow_run(run_id)

    return asyncio.run(read())


def artifacts_of(flow_run_id=None) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read():
        async with get_client() as client:
            f = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])) if flow_run_id else None
            return await client.read_artifacts(artifact_filter=f, limit=200)

    return asyncio.run(read())


def assert_artifacts_show_no_local_paths(artifacts) -> None:
    """Every image is embedded and no link points at this machine's files: the UI runs elsewhere."""
    import re

    for a in artifacts:
        text = str(a.data)
        assert "file://" not in text, a.key
        for target in re.findall(r"\]\(([^)]+)\)", text):
            assert target.startswith(("data:image/png;base64,", "http://", "https://")), f"{a.key}: local link {target[:80]}"


@pytest.mark.slow
def test_rerun_is_cached_and_a_train_change_recomputes_only_train_and_eval(prefect_api, tmp_path):
    from flows.distill import distill
    from storage.workspace import Workspace

    _, seen = stage_runs(set())      # task runs of earlier tests on this server
    cfg = micro_config(tmp_path / "ws")
    first = distill(config=cfg)
    counts, seen = stage_runs(seen)
    assert counts["executed"] == sorted(["ingest", "ingest", "generate", "student", "steps",
                                         "train", "evaluate"]) and not counts["cached"]

    # the learning curve has an evaluation metric per epoch: each checkpoint's accuracy on the eval set's first questions
    curve = Workspace(tmp_path / "ws").catalog().stage_output(first.eval_fp)["summary"]
    assert sorted(map(int, curve["curve"])) == [1, 2] and curve["curve_set"] == "synthetic/test, first 16 questions"
    assert "- accuracy by epoch (synthetic/test, first 16 questions): 1: " in __import__("pathlib").Path(first.report).read_text()

    second = distill(config=cfg)
    counts, seen = stage_runs(seen)
    assert not counts["executed"] and len(counts["cached"]) == 7
    assert second.accuracy == first.accuracy
    # its run page: the teacher stage came from the cache, and the headline compares like with like
    summary = str({a.key: a for a in artifacts_of(second.run_id)}["distill-summary"].data)
    assert "| teacher | 64 rationales, no teacher calls (reference rationales) — cached |" in summary
    assert "previous config run with loss std_cot" in summary

    changed = distill(config=micro_config(tmp_path / "ws", **{"train.lr": 0.001}))
    counts, seen = stage_runs(seen)
    assert counts["executed"] == ["evaluate", "train"]
    assert len(counts["cached"]) == 5
    assert changed.train_fp != first.train_fp

    cat = Workspace(tmp_path / "ws").catalog()
    runs = cat.execute("select status from runs")
    assert [r["status"] for r in runs] == ["completed"] * 3
    assert cat.query("latest_results", eval_fp=changed.eval_fp)
    assert_lineage_is_what_was_hashed(cat, {"ingest", "generate", "student", "steps", "train", "evaluate"})


@pytest.mark.slow
def test_phase_flow_alone_reuses_upstream(prefect_api, tmp_path):
    from flows.distill import generate, prepare

    _, seen = stage_runs(set())      # task runs of earlier tests on this server
    cfg = micro_config(tmp_path / "ws")
    generate(config=cfg)
    _, seen = stage_runs(seen)
    prepare(config=cfg)  # runs generate again: every upstream task is a cache hit
    counts, _ = stage_runs(seen)
    assert counts["executed"] == ["steps", "student"]
    assert sorted(counts["cached"]) == ["generate", "ingest", "ingest"]


@pytest.mark.slow
def test_a_token_weights_change_recomputes_token_weights_and_difficulty_never_the_teacher(prefect_api, tmp_path):
    from flows.distill import prepare
    from storage.workspace import Workspace

    _, seen = stage_runs(set())      # task runs of earlier tests on this server
    base = {"token_weights.compute": True, "token_weights.epochs": 1, "token_weights.predictor_warmup_epochs": 1, "student.max_length": 256}
    first = prepare(config=micro_config(tmp_path / "ws", **base))
    counts, seen = stage_runs(seen, extra={"token-weights", "difficulty"})
    assert {"token-weights", "difficulty", "generate"} <= set(counts["executed"])
    assert first.token_weights.n_rationales == first.steps.n_rationales

    prepare(config=micro_config(tmp_path / "ws", **{**base, "token_weights.alpha": 0.25}))
    counts, seen = stage_runs(seen, extra={"token-weights", "difficulty"})
    assert counts["executed"] == ["difficulty", "token-weights"]
    assert "generate" in counts["cached"]
    cat = Workspace(tmp_path / "ws").catalog()
    assert cat.execute("select count(distinct token_weights_fp) as n from token_weights")[0]["n"] == 2
    assert cat.execute("select count(distinct difficulty_fp) as n from step_difficulty")[0]["n"] == 2


@pytest.mark.slow
def test_kpod_end_to_end_and_a_curriculum_change_recomputes_only_curriculum_train_and_eval(prefect_api, tmp_path):
    from pathlib import Path

    from flows.distill import distill
    from storage.workspace import Workspace

    extra = {"token-weights", "difficulty", "curriculum"}
    _, seen = stage_runs(set())      # task runs of earlier tests on this server
    base = {"train.loss": "kpod", "train.epochs": 4, "token_weights.epochs": 1, "token_weights.predictor_warmup_epochs": 1,
            "student.max_length": 256}
    first = distill(config=micro_config(tmp_path / "ws", **base))
    counts, seen = stage_runs(seen, extra=extra)
    assert {"token-weights", "difficulty", "curriculum", "train", "evaluate"} <= set(counts["executed"])
    ws = Workspace(tmp_path / "ws")
    cat = ws.catalog()
    stages = cat.execute("select stage, count(*) as n from curriculum group by stage order by stage")
    assert [s["stage"] for s in stages] == [1, 2]                      # T = ceil(4 / 2)
    ckpt = cat.execute("select metrics_json from checkpoints where train_fp = ? order by epoch", [first.train_fp])
    assert [__import__("json").loads(c["metrics_json"])["stage"] for c in ckpt] == [1, 2, 2, 2]
    report = Path(first.report).read_text()
    assert "## Curriculum" in report and "budget vs achieved" in report
    for line in report.splitlines():                                   # plots resolve relative to the report
        if line.startswith("!["):
            assert (Path(first.report).parent / line.split("(")[1].rstrip(")")).is_file()

    again = distill(config=micro_config(tmp_path / "ws", **{**base, "curriculum.beta": 3.0}))
    counts, seen = stage_runs(seen, extra=extra)
    assert counts["executed"] == ["curriculum", "evaluate", "train"]
    assert "token-weights" in counts["cached"] and "generate" in counts["cached"]
    assert again.train_fp != first.train_fp
    # the UI: the run the user started carries the results and the report; plots embedded; named and tagged
    assert_artifacts_show_no_local_paths(artifacts_of())
    own = {a.key: a for a in artifacts_of(first.run_id)}
    assert {"distill-results", "distill-summary"} <= set(own)
    from prefect.client.orchestration import get_client
    with get_client(sync_client=True) as client:    # published once per run: by distill, not by its evaluate phase too
        publishers = {client.read_flow(client.read_flow_run(a.flow_run_id).flow_id).name
                      for a in artifacts_of() if a.key == "distill-results"}
        parent = client.read_flow_run(first.run_id)
        phases = client.read_flow_runs(flow_run_filter=__import__("prefect.client.schemas.filters", fromlist=["x"])
                                       .FlowRunFilter(parent_flow_run_id={"any_": [parent.id]}))
    assert publishers == {"distill"}
    assert parent.name.startswith("config-kpod-synthetic-") and "loss:kpod" in parent.tags
    assert parent.parameters["config"]["train"]["loss"] == "kpod"          # the Parameters tab shows what ran
    assert sorted(p.name.rsplit("-", 1)[1] for p in phases) == ["evaluate", "generate", "prepare", "train"]
    assert all(p.name.startswith(parent.name) and "loss:kpod" in p.tags for p in phases)
    assert "data:image/png;base64," in str(own["distill-summary"].data) and "%" in str(own["distill-results"].data)
    assert any(a.key == "curriculum" and "data:image/png;base64," in str(a.data) for a in artifacts_of())
    run = flow_run(first.run_id)
    assert run.name.startswith("config-kpod-synthetic-") and {"loss:kpod", "dataset:synthetic"} <= set(run.tags)
    assert_lineage_is_what_was_hashed(cat, {"ingest", "generate", "student", "steps", "student-warmup", "token-weights",
                                            "difficulty", "curriculum", "train", "evaluate"})
    # the same DAG, resolved from the catalog alone, finds exactly what the flow computed
    from flows.phases import from_catalog_run
    read = from_catalog_run(micro_config(tmp_path / "ws", **base))
    assert read.evaluation.fp == first.eval_fp and read.trained.fp == first.train_fp and read.curriculum
    assert from_catalog_run(micro_config(tmp_path / "ws", **{**base, "curriculum.beta": 5.0})) is None   # not run yet


def test_a_preset_with_edited_config_fields_is_refused_not_silently_ignored():
    from flows.phases import resolve_config
    from keystep.config import ConfigError, DistillConfig
    from tests.conftest import ROOT

    micro = str(ROOT / "configs" / "micro.yaml")
    assert resolve_config(DistillConfig(), micro, {"train.epochs": 3}).train.epochs == 3      # preset + overrides
    edited = DistillConfig().model_copy(update={"train": DistillConfig().train.model_copy(update={"epochs": 7})})
    assert resolve_config(edited, None, {"train.lr": 0.01}).train.epochs == 7                 # fields + overrides
    with pytest.raises(ConfigError, match="preset .* and edited config fields"):
        resolve_config(edited, micro, None)
    resolved = resolve_config(DistillConfig(), micro, {"train.epochs": 3})
    assert resolve_config(resolved, micro, {"train.epochs": 3}) == resolved     # a rerun of a run shows its config
    assert resolve_config(edited, micro, None, deployed=edited).train.epochs == 2   # fields as the deployment set them


def test_two_training_processes_run_inside_the_train_task(prefect_api, tmp_path):
    """train.num_processes: 2 — the train task launches torchrun and its log carries the ranks' output
    and the epoch lines (one task run: the `gpu` tag's concurrency limit counts it once)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

    from flows.distill import distill

    _, seen = stage_runs(set())      # task runs of earlier tests on this server
    out = distill(config=micro_config(tmp_path / "ws", **{"train.num_processes": 2}))
    assert out.accuracy

    async def train_logs():
        async with get_client() as client:
            runs = [r for r in await client.read_task_runs(limit=200) if r.id not in seen
                    and r.name.startswith("train-") and not r.state.state_details.child_flow_run_id]   # not the subflow
            assert len(runs) == 1 and "gpu" in runs[0].tags
            logs = await client.read_logs(LogFilter(task_run_id=LogFilterTaskRunId(any_=[runs[0].id])))
            return [log.message for log in logs]

    messages = asyncio.run(train_logs())
    assert any("epoch 2/2" in m for m in messages)
    text = "\n".join(messages)   # the two ranks write to one pipe: their lines may interleave
    assert "rank 0 of 2 joined (gloo)" in text and "rank 1 of 2 joined (gloo)" in text


@pytest.mark.slow
def test_the_next_run_marks_a_killed_run_killed_in_the_catalog_and_crashed_in_prefect(prefect_api, tmp_path):
    """A run killed without warning leaves its row 'running' and its Prefect flow run Running: the next run on the
    workspace finds its process gone and says so in both places."""
    import subprocess
    import sys

    from prefect.client.orchestration import get_client
    from prefect.states import Running

    from flows.distill import distill
    from storage.runs import start_run
    from storage.workspace import Workspace

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with get_client(sync_client=True) as client:     # a flow run the server believes is running
        run = client.create_flow_run(flow=distill, parameters={}, state=Running())
    cat = Workspace(tmp_path / "ws").catalog()
    start_run(cat, str(run.id), str(run.id), "{}").stop()
    cat.execute("update runs set pid = ? where run_id = ?", [gone.pid, str(run.id)])
    distill(config=micro_config(tmp_path / "ws", **{"train.epochs": 1}))
    statuses = {r["run_id"]: r["status"] for r in cat.execute("select run_id, status from runs")}
    assert statuses[str(run.id)] == "killed" and sorted(statuses.values()) == ["completed", "killed"]
    assert flow_run(str(run.id)).state.type.value == "CRASHED"



def test_teacher_scores_run_in_the_prepare_phase_as_a_cached_task(prefect_api, tmp_path):
    """With `teacher_scores.model` set, the prepare phase scores the training sequences (a task of its own); its
    rerun is a cache hit, as every stage's."""
    from flows.distill import prepare
    from storage.workspace import Workspace
    from tasks import ingest, student, teacher

    ws = Workspace(tmp_path / "ws")
    cfg = micro_config(ws.root)
    gen = teacher.generate_rationales(ws, cfg, ingest.ingest(ws, cfg.data.train))
    folder = student.STUDENT.run(ws, cfg, student.StudentInputs(generation=gen)).model_dir   # shares the tokenizer
    scored = micro_config(ws.root, **{"teacher_scores.model": folder, "teacher_scores.k": 8})
    _, seen = stage_runs(set())
    first = prepare(config=scored)
    counts, seen = stage_runs(seen, {"teacher-scores"})
    assert "teacher-scores" in counts["executed"]
    assert first.teacher_scores.n_sequences == first.teacher_scores.n_scored == 64
    second = prepare(config=scored)
    counts, seen = stage_runs(seen, {"teacher-scores"})
    assert "teacher-scores" in counts["cached"] and not counts["executed"]
    assert second.teacher_scores == first.teacher_scores


def test_on_policy_runs_through_the_distill_flow_with_its_per_epoch_table_and_plot_in_the_ui(prefect_api, tmp_path):
    """train.loss on_policy end to end: the prepare phase scores the teacher's text, training samples and scores the
    student's own, and the run's artifacts hold the per-epoch table (share, sample accuracy, reverse KL, time split)
    and its plot, embedded."""
    from flows.distill import distill
    from storage.workspace import Workspace
    from tasks import ingest, student, teacher

    ws = Workspace(tmp_path / "ws")
    cfg = micro_config(ws.root)
    gen = teacher.generate_rationales(ws, cfg, ingest.ingest(ws, cfg.data.train))
    folder = student.STUDENT.run(ws, cfg, student.StudentInputs(generation=gen)).model_dir   # shares the tokenizer
    op = micro_config(ws.root, **{"teacher_scores.model": folder, "teacher_scores.k": 8, "train.loss": "on_policy",
                                  "train.on_policy.lmbda": 1.0, "train.on_policy.max_new_tokens": 8, "train.epochs": 1})
    import json

    out = distill(config=op)
    assert out.loss == "on_policy"
    own = {a.key: a for a in artifacts_of()}      # only on_policy runs make these two keys
    table = own["on-policy"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert [r["epoch"] for r in rows] == [1] and all(r["on_policy_share"] == 1.0 and r["samples"] == 64 for r in rows)
    assert all(0 <= r["sample_accuracy"] <= 1 and r["reverse_kl"] >= 0 and r["sample_s"] > 0 for r in rows)
    assert "data:image/png;base64," in str(own["on-policy-report"].data)
    assert_artifacts_show_no_local_paths([own["on-policy"], own["on-policy-report"]])
    summary = {a.key: a for a in artifacts_of(out.run_id)}["distill-summary"]     # this run's (others share the server)
    assert "on-policy share λ 1.0, JSD β 1.0" in str(summary.data)
