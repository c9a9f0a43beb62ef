"""A real local Prefect server and process worker: deploy from prefect.yaml, run the demo deployment with the
micro config through the worker, and check the run completed and the catalog holds its results."""
import html
import json
import re
import shutil
import subprocess
import tempfile
import urllib.request

import pytest

from keystep.config import load_config
from tests.conftest import ROOT
from tests.flows.prefect_server import PrefectServer


CHROMIUM = shutil.which("chromium")   # `make test` installs Debian's chromium when it can


def rendered(url: str, tmp_path) -> str:
    """The page as headless Chromium renders it (the Prefect UI is a single-page app), as HTML."""
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}", "--virtual-time-budget=20000",
                        "--dump-dom", url], capture_output=True, text=True, timeout=180)
    return r.stdout


def ui_pages_show_what_runs(ui: str, kpod_id: str, tmp_path) -> None:
    """In the UI: the kpod deployment's run form opens on its preset (loss kpod selected) with preset and overrides
    first; the demo run's Parameters tab shows the config it ran; its summary opens with what ran."""
    form = rendered(f"{ui}/deployments/deployment/{kpod_id}/run", tmp_path)
    loss = form[form.index("Loss (Optional)"):][:3000]
    assert re.search(r'<option[^>]*selected=""[^>]*value="kpod"', loss), loss[:1000]
    assert form.index("preset (Optional)") < form.index("overrides (Optional)") < form.index("Data (Optional)")
    # the teacher backend and the dataset source are kinds to pick, each showing only its own fields
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", form))
    assert re.search(r"Teacher \(Optional\) [^.]*\. reference openai vllm Backend", text), text[:2000]
    assert re.search(r"Train \(Optional\) [^.]*\. synthetic file Source", text)
    assert "Base Url" not in text and "Question Field" not in text     # openai's and file's fields: not shown
    # what most runs change comes first: training's loss and epochs before the KPOD-only sections
    assert text.index("Train (Optional)") < text.index("Epochs") < text.index("Token Weights (Optional)")
    assert text.index("Loss (Optional)") < text.index("Steps (Optional) Rationale step splitting") < \
        text.index("Curriculum (Optional) KPOD")
    # help text keeps what is in angle brackets (the UI renders it as markdown: <...> would be an HTML tag)
    assert "<workspace>/exports/<export fingerprint>" in html.unescape(text)
    with urllib.request.urlopen(urllib.request.Request(
            f"{ui}/api/flow_runs/filter", data=json.dumps({"flow_runs": {"parent_task_run_id": {"is_null_": True}}}).encode(),
            headers={"content-type": "application/json"})) as resp:
        run_id = next(r["id"] for r in json.loads(resp.read()) if r["name"].startswith("micro-"))
    params = rendered(f"{ui}/runs/flow-run/{run_id}?tab=Parameters", tmp_path)
    assert '"n"' in params and "64" in params and "synthetic:arith" in params      # the micro config it ran
    with urllib.request.urlopen(urllib.request.Request(
            f"{ui}/api/artifacts/filter", data=json.dumps({"artifacts": {"key": {"any_": ["distill-summary"]}}}).encode(),
            headers={"content-type": "application/json"})) as resp:
        summary_id = json.loads(resp.read())[0]["id"]
    summary = rendered(f"{ui}/artifacts/artifact/{summary_id}", tmp_path)
    assert "what ran" in summary and "Headline" in summary and "micro" in summary


def test_prefect_yaml_is_written_from_the_presets():
    """Each distill deployment's form opens on its preset's resolved config: prefect.yaml must match the presets."""
    from flows.deployments import prefect_yaml

    assert (ROOT / "prefect.yaml").read_text() == prefect_yaml(), "run `python -m flows.deployments`"


@pytest.mark.slow
def test_demo_deployment_runs_through_a_real_worker(tmp_path):
    with PrefectServer(tmp_path) as server:
        # `make deploy` before any worker: it creates the pool itself, then registers every deployment
        r = subprocess.run(["make", "deploy", f"PORT={server.port}"], cwd=ROOT, env=server.env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        kpod = server.get("deployments/name/distill/kpod")
        assert kpod["parameters"]["config"] == load_config(ROOT / "configs" / "kpod.yaml").model_dump(mode="json")
        assert kpod["parameters"]["config"]["train"]["loss"] == "kpod"      # the form opens on what it runs
        schema = kpod["parameter_openapi_schema"]["properties"]
        assert [k for k, _ in sorted(schema.items(), key=lambda kv: kv[1]["position"])] == ["preset", "overrides", "config"]
        assert "edited fields is refused" in schema["preset"]["description"]
        server.start("worker", ["worker", "start", "--pool", "keystep-process", "--type", "process"])
        ws = tmp_path / "ws"
        params = {"preset": "configs/micro.yaml", "overrides": {"storage.workspace": str(ws)}}
        r = server.run(["deployment", "run", "distill/demo", "--params", json.dumps(params), "--watch",
                        "--watch-timeout", "500"], timeout=560)
        assert "Completed" in r.stdout, r.stdout[-3000:]
        if CHROMIUM:
            ui_pages_show_what_runs(f"http://127.0.0.1:{server.port}", kpod["id"], tmp_path)

    from storage.catalog import Catalog
    cat = Catalog(ws / "catalog.duckdb")
    assert [r["status"] for r in cat.execute("select status from runs")] == ["completed"]
    results = cat.query("latest_results", eval_fp=None)
    assert {r["model_label"] for r in results} == {"student", "untrained"}
    assert cat.execute("select count(*) as n from predictions")[0]["n"] > 0
