"""prefect.yaml, written from the presets: `python -m flows.deployments` (or `make prefect.yaml`).

Each distill deployment's `config` parameter is its preset's resolved config, so the Prefect UI's run form opens on
exactly what the deployment runs (the kpod deployment shows loss kpod and its epochs) and a user who changes one
field runs exactly that. The phase deployments open on the demo's config. tests/flows/test_deployment.py fails when
prefect.yaml and the presets disagree (then run this module again).
"""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

from keystep.config import load_config

ROOT = Path(__file__).resolve().parents[1]
POOL = {"name": "keystep-process", "work_queue_name": "default"}

# (name, entrypoint, preset whose resolved config is the `config` parameter, description)
DISTILL = [
    ("demo", "configs/demo.yaml", "The offline default end to end (synthetic data, reference teacher, scratch student, CPU)."),
    ("kpod", "configs/kpod.yaml", "KPOD on the offline default (token weights, step difficulty, progressive curriculum, "
                                  "weighted loss), with the settings the KPOD study found best."),
    ("kpod-paper", "configs/kpod-paper.yaml", "KPOD with the paper's settings, literally, on the offline default."),
    ("gsm8k", "configs/gsm8k.yaml", "GSM8K with the reference teacher, evaluated on GSM8K test and SVAMP."),
]
PHASES = [
    ("generate", "Phase 1 alone - ingest and teacher rationales."),
    ("prepare", "Phase 2 - student init, steps, and for KPOD token weights, difficulty and curriculum (phase 1 from cache)."),
    ("train", "Phase 3 - student training (resumes from the last whole epoch)."),
    ("evaluate", "Phase 4 - evaluation, results table and report."),
]
EXPERIMENTS = [
    ("study-synthetic", "configs/study-synthetic.yaml", "The quality study - 8 arms (Std-CoT, KPOD and ablations, "
                                                        "Mysteries formats) x 3 seeds, one table."),
    ("study-demo", "configs/study-demo.yaml", "The KPOD study, regime R1: the demo's scratch student, 20 epochs, 1,000 "
                                              "test problems (results per run in docs/studies/study-demo/)."),
    ("study-pretrained", "configs/study-pretrained.yaml", "The KPOD study, regime R2: a pretrained student distilled on "
                                                          "2-4-step problems (results in docs/studies/study-pretrained/)."),
]
HEADER = """\
# keystep deployments — written by `python -m flows.deployments` from the presets in configs/ (do not edit by hand:
# tests/flows/test_deployment.py checks that this file and the presets agree). Each distill deployment's `config`
# parameter is its preset's resolved config, so the UI's run form opens on what it runs. `make deploy` runs
# `prefect deploy --all` with KEYSTEP_ROOT set to this folder, which the pull step makes the working directory of
# every flow run (so configs/ and .keystep/ resolve there).
"""


def config_of(preset: str) -> dict:
    return load_config(ROOT / preset).model_dump(mode="json")


def prefect_yaml() -> str:
    deployments = []
    for name, preset, description in DISTILL:
        deployments.append({"name": name, "description": f"{description} Opens on {preset}; change any field.",
                            "entrypoint": "flows/distill.py:distill", "parameters": {"config": config_of(preset)},
                            "work_pool": POOL})   # each run tags itself with the preset it ran (flows/distill.py)
    for name, preset, description in EXPERIMENTS:
        deployments.append({"name": name, "description": description, "entrypoint": "flows/experiment.py:experiment",
                            "parameters": {"preset": preset}, "work_pool": POOL})
    demo = config_of("configs/demo.yaml")
    for name, description in PHASES:
        deployments.append({"name": name, "description": f"{description} Opens on configs/demo.yaml.",
                            "entrypoint": f"flows/distill.py:{name}", "parameters": {"config": demo},
                            "work_pool": POOL})
    deployments.append({"name": "export", "description": "The teacher rationales of a config's generation as a "
                        "dataset: Hugging Face datasets folders, Parquet, SFT layouts and a dataset card (export.* "
                        "settings; export.push_to_hub uploads it). Opens on configs/demo.yaml.",
                        "entrypoint": "flows/export.py:export", "parameters": {"config": demo}, "work_pool": POOL})
    deployments.append({
        "name": "rerun-new-datasets",
        "description": "Every hour: scan datasets/ for new or changed dataset files (see datasets/README.md) and run "
                       "distill on each; a scan that finds nothing new starts nothing.",
        "entrypoint": "flows/rerun.py:rerun_new_datasets",
        "parameters": {"preset": "configs/demo.yaml", "registry_dir": "datasets"},
        "schedules": [{"interval": 3600}], "work_pool": POOL})
    body = {"name": "keystep", "prefect-version": "3.8.8",
            "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $KEYSTEP_ROOT }}"}}],
            "deployments": deployments}
    return HEADER + "\n" + yaml.safe_dump(body, sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = prefect_yaml()
    if "--check" in args:
        same = (ROOT / "prefect.yaml").read_text() == text
        print("prefect.yaml is up to date" if same else "prefect.yaml differs from the presets: run python -m flows.deployments")
        return 0 if same else 1
    (ROOT / "prefect.yaml").write_text(text)
    print(f"wrote {ROOT / 'prefect.yaml'} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
