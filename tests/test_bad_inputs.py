"""A table of user mistakes, each run as a user would (`keystep run ...` in a subprocess): exit status 2 and one
line that names the config key or path, no traceback — and for all but the last, before any work starts."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

MICRO = str(ROOT / "configs" / "micro.yaml")


def files(tmp):
    """The bad files the cases point at."""
    (tmp / "notes.txt").write_text("question,answer\n")
    (tmp / "broken.json").write_text('{"question": "a?", ')
    (tmp / "object.json").write_text('{"question": "a?", "answer": 1}')
    (tmp / "wrong-columns.jsonl").write_text('{"q": "What is 2+2?", "a": 4}\n{"q": "What is 3+3?", "a": 6}\n')
    (tmp / "empty.jsonl").write_text("")
    (tmp / "header-only.csv").write_text("question,answer\n")
    (tmp / "fake.parquet").write_text("this is not parquet\n")
    (tmp / "no-rationales.jsonl").write_text('{"question": "What is 2+2?", "answer": 4}\n')
    (tmp / "svamp.json").write_text(json.dumps([{"Body": "Tom has 3 apples.", "Question": "How many?", "Answer": 3.0}]))
    (tmp / "not-a-model").mkdir()
    (tmp / "a-file").write_text("x")
    (tmp / "bad.yaml").write_text("train: {epochs: 2\n")
    (tmp / "list.yaml").write_text("- train\n- eval\n")
    (tmp / "old.yaml").write_text("masks: {uniform: true}\n")
    (tmp / "exp-no-variants.yaml").write_text(f"name: x\nbase: {MICRO}\n")
    (tmp / "exp-left-out.yaml").write_text(f"name: x\nbase: {MICRO}\nvariants: {{a: {{}}, b: {{train.device: cuda}}}}\n"
                                           "seeds: [0]\nvariant_seeds: {a: []}\n")


def file_spec(path, **kw):
    return "data.train=" + json.dumps({"name": "d", "source": "file", "path": str(path), **kw})


# (case, arguments after `keystep`, what the one line must name)
CASES = [
    ("unknown key", ["run", MICRO, "--set", "train.epochz=3"], "train.epochz"),
    ("value of the wrong type", ["run", MICRO, "--set", "train.epochs=many"], "train.epochs"),
    ("value out of range", ["run", MICRO, "--set", "train.epochs=0"], "train.epochs"),
    ("unknown choice", ["run", MICRO, "--set", "train.loss=magic"], "train.loss"),
    ("heads do not divide the width", ["run", MICRO, "--set", "student.num_heads=3"], "student"),
    ("min_steps above max_steps", ["run", MICRO, "--set", "data.train.min_steps=3"], "min_steps"),
    ("file source without a path", ["run", MICRO, "--set", 'data.train={"source": "file"}'], "path"),
    ("dataset file missing", ["run", MICRO, "--set", file_spec("{tmp}/nope.jsonl")], "nope.jsonl"),
    ("unsupported file format", ["run", MICRO, "--set", file_spec("{tmp}/notes.txt")], "notes.txt"),
    ("invalid JSON", ["run", MICRO, "--set", file_spec("{tmp}/broken.json")], "broken.json"),
    ("JSON that is no list of records", ["run", MICRO, "--set", file_spec("{tmp}/object.json")], "object.json"),
    ("every row rejected: wrong column names", ["run", MICRO, "--set", file_spec("{tmp}/wrong-columns.jsonl")],
     "columns: q, a"),
    ("empty file", ["run", MICRO, "--set", file_spec("{tmp}/empty.jsonl")], "empty.jsonl"),
    ("CSV with a header only", ["run", MICRO, "--set", file_spec("{tmp}/header-only.csv")], "header-only.csv"),
    ("a text file named .parquet", ["run", MICRO, "--set", file_spec("{tmp}/fake.parquet")], "fake.parquet"),
    ("reference teacher, no rationale column", ["run", MICRO, "--set", file_spec("{tmp}/no-rationales.jsonl")],
     "teacher.backend"),
    ("reference teacher on SVAMP (no rationales)", ["run", MICRO, "--set",
     "data.train=" + json.dumps({"name": "svamp", "source": "svamp", "path": "{tmp}/svamp.json"})], "teacher.backend"),
    ("openai teacher without base_url", ["run", MICRO, "--set", "teacher.backend=openai"], "teacher.base_url"),
    ("openai endpoint that does not answer", ["run", MICRO, "--set", "teacher.backend=openai", "--set",
     "teacher.model=m", "--set", "teacher.base_url=http://127.0.0.1:9/v1"], "teacher.base_url"),
    ("vllm teacher without a model", ["run", MICRO, "--set", "teacher.backend=vllm"], "teacher.model"),
    ("vllm python that is not there", ["run", MICRO, "--set", "teacher.backend=vllm", "--set", "teacher.model=m",
     "--set", "teacher.vllm_python=/no/such/python"], "teacher.vllm_python"),
    ("student folder missing", ["run", MICRO, "--set", "student.model=./no-such-model"], "student.model"),
    ("student folder that is no model", ["run", MICRO, "--set", "student.model={tmp}/not-a-model"], "student.model"),
    ("workspace that is a file", ["run", MICRO, "--workspace", "{tmp}/a-file"], "storage.workspace"),
    ("cuda without a GPU", ["run", MICRO, "--set", "train.device=cuda"], "train.device"),
    ("--set without =", ["run", MICRO, "--set", "train.epochs"], "section.key=value"),
    ("config file missing", ["run", "{tmp}/nope.yaml"], "nope.yaml"),
    ("config file with bad YAML", ["run", "{tmp}/bad.yaml"], "bad.yaml"),
    ("config file that is no mapping", ["run", "{tmp}/list.yaml"], "list.yaml"),
    ("the old masks section", ["run", "{tmp}/old.yaml"], "token_weights"),
    ("question template that is no format string", ["run", MICRO, "--set", file_spec(
        "{tmp}/no-rationales.jsonl", question_template="{Body")], "question_template"),
    ("choices without the choice answer type", ["run", MICRO, "--set", file_spec(
        "{tmp}/no-rationales.jsonl", choices_field="choices")], "answer_type"),
    ("KPOD loss with a label-first format", ["run", MICRO, "--set", "train.loss=kpod", "--set",
     "train.target_format=label_only"], "target_format"),
    ("vLLM evaluation with no vLLM anywhere", ["run", MICRO, "--set", "eval.backend=vllm"], "eval.vllm_python"),
    ("vLLM evaluation python that is not there", ["run", MICRO, "--set", "eval.vllm_python=/no/such/python"],
     "eval.vllm_python"),
    ("a LoRA key that does not exist", ["run", MICRO, "--set", 'student.lora={"rank": 8}'], "student.lora.rank"),
    ("QLoRA sharded by FSDP", ["run", MICRO, "--set", 'student.lora={"quantize": "4bit"}', "--set",
     "train.num_processes=2", "--set", "train.strategy=fsdp"], "train.strategy"),
    ("experiment file without variants", ["experiment", "{tmp}/exp-no-variants.yaml"], "variants"),
    ("an arm with a mistake beside one that variant_seeds leaves out", ["experiment", "{tmp}/exp-left-out.yaml"],
     "train.device"),
    ("an unknown export format", ["export", MICRO, "--set", "export.formats=[cot_and_label]"], "export.formats"),
    ("an export push without a token", ["run", MICRO, "--set", "export.enabled=true", "--set",
     "export.push_to_hub=me/data"], "export.push_to_hub"),
    ("a dataset path that is a directory", ["run", MICRO, "--set", file_spec("{tmp}/not-a-model")], "is a directory"),
    ("an evaluation set inside the training set", ["run", MICRO, "--set",
     'data.eval=[{"name": "same", "source": "synthetic:arith", "n": 64, "seed": 0, "max_steps": 2, "max_operand": 9}]'],
     "all 64 rows of evaluation set 'same/train'"),
    ("logit distillation without teacher scores", ["run", MICRO, "--set", "train.loss=kd"], "teacher_scores.model"),
    ("KPOD over the teacher without teacher scores", ["run", MICRO, "--set", "train.loss=kpod_kd"],
     "teacher_scores.model"),
    ("vLLM scoring with no vLLM to start", ["run", MICRO, "--set", "teacher_scores.model={tmp}/not-a-model", "--set",
     "teacher_scores.engine=vllm"], "teacher_scores.vllm_python"),
    ("teacher logprobs asked of a batch", ["run", MICRO, "--set", "teacher.backend=openai", "--set", "teacher.model=m",
     "--set", "teacher.base_url=http://127.0.0.1:9/v1", "--set", "teacher.api=batch", "--set", "teacher.logprobs=5"],
     "teacher.logprobs"),
    ("on-policy distillation with the reference teacher", ["run", MICRO, "--set", "train.loss=on_policy"],
     "the reference teacher (an answer key) has none"),
    ("on-policy share outside [0, 1]", ["run", MICRO, "--set", "train.loss=on_policy", "--set",
     "train.on_policy.lmbda=1.5"], "train.on_policy.lmbda"),
    ("on-policy sampling in several processes", ["run", MICRO, "--set", "train.loss=on_policy", "--set",
     "teacher_scores.model={tmp}/not-a-model", "--set", "train.num_processes=2"], "train.num_processes"),
    ("on-policy with every epoch supervised", ["run", MICRO, "--set", "train.loss=on_policy", "--set",
     "teacher_scores.model={tmp}/not-a-model", "--set", "train.on_policy.sft_epochs=2"], "train.on_policy.sft_epochs (2)"),
    ("results without a catalog", ["results", "--workspace", "{tmp}/empty-ws"], "no catalog"),
    ("a pack of a run that has not run", ["pack", MICRO, "{tmp}/pack", "--workspace", "{tmp}/ws"],
     f"run `keystep run {MICRO}` first"),
    ("an unpack of a folder that is no pack", ["unpack", MICRO, "{tmp}/not-a-model", "--workspace", "{tmp}/ws"],
     "not-a-model' is not a keystep pack"),
]


def keystep(args, tmp, **env):
    args = [a.replace("{tmp}", str(tmp)) for a in args]
    if args[0] in ("run", "export") and "--workspace" not in args:
        args += ["--workspace", str(tmp / "ws")]
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=tmp, capture_output=True, text=True,
                          timeout=300, env={**{k: v for k, v in os.environ.items() if k != "HF_TOKEN"},
                                            "PYTHONPATH": str(ROOT), **env})


@pytest.mark.parametrize("case,args,named", CASES, ids=[c[0] for c in CASES])
def test_a_user_mistake_exits_2_with_one_line_before_any_work(tmp_path, case, args, named):
    files(tmp_path)
    r = keystep(args, tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr + r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keystep: error:") and named in lines[0], r.stderr[-2000:]
    assert not (tmp_path / "ws" / "catalog.duckdb").exists()     # found before any work


@pytest.mark.slow
def test_a_mistake_found_inside_the_flow_ends_with_one_line_and_no_traceback(tmp_path):
    """Sequences longer than student.max_length are only known once the student's tokenizer exists. Prefect's
    temporary server, here made to log everything, keeps its own output in its log file, off the terminal (its
    transient errors on busy cores, e.g. SQLite's `database is locked`, once printed tracebacks among the run's lines)."""
    home = tmp_path / "prefect-home"
    r = keystep(["run", MICRO, "--set", "student.max_length=32"], tmp_path, PREFECT_HOME=str(home),
                PREFECT_SERVER_LOGGING_LEVEL="DEBUG")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr + r.stdout
    errors = [line for line in r.stderr.splitlines() if line.startswith("keystep: error:")]
    assert len(errors) == 1 and errors[0].startswith("keystep: error: config key 'student.max_length'")
    server_log = (home / "temporary-server.log").read_text()
    assert "prefect.server" in server_log and "prefect.server" not in r.stderr + r.stdout
    assert f"its log: {home / 'temporary-server.log'}" in r.stderr


@pytest.mark.slow
def test_logprobs_asked_of_an_endpoint_that_returns_none_end_with_one_line_naming_the_setting(tmp_path):
    """Found only when the endpoint answers: the run stops with one line naming teacher.logprobs, exit 2."""
    from tests.fake_openai import FakeOpenAI

    with FakeOpenAI(logprobs=False) as server:
        r = keystep(["run", MICRO, "--set", "teacher.backend=openai", "--set", "teacher.model=m", "--set",
                     f"teacher.base_url={server.base_url}", "--set", "teacher.logprobs=5", "--set",
                     "teacher.concurrency=1"], tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr + r.stdout
    errors = [line for line in r.stderr.splitlines() if line.startswith("keystep: error:")]
    assert len(errors) == 1 and "config key 'teacher.logprobs'" in errors[0], r.stderr[-2000:]
