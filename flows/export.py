"""The `export` flow: the rationales of the generation a config resolves to, as a dataset folder (tasks/export.py).

It runs the generate phase (a cache hit when the teacher already ran) and reads from the catalog what the prepare
phase computed for it — steps, token weights, step difficulty — without computing what is missing; then exports,
and uploads to the Hugging Face hub when `export.push_to_hub` names a repo. `distill` runs the same stage last when
`export.enabled`.
"""
from __future__ import annotations

from typing import Any

from prefect import flow

from flows.distill import generate
from flows.phases import CatalogStages, GeneratePhase, distill_config, export_inputs, export_stages, prepare_stages
from keystep.config import DistillConfig
from tasks.export import ExportInputs, check_export
from tasks.stage import NotCached


def prepared_in_catalog(config: DistillConfig, generated: GeneratePhase) -> ExportInputs:
    """The prepare phase's outputs for this generation as far as they are in the catalog (nothing runs): the whole
    phase, else its student and steps, else only the rationales."""
    lookup = CatalogStages(config)
    for upto in (None, "steps"):
        try:
            return export_inputs(prepare_stages(config, generated, lookup, upto=upto))
        except NotCached:
            pass
    return ExportInputs(generation=generated.generation)


@flow(name="export", log_prints=True)
def export(preset: str | None = None, overrides: dict[str, Any] | None = None,
           config: DistillConfig = DistillConfig()) -> dict[str, Any]:
    """Write the teacher's rationales as a Hugging Face dataset folder, Parquet files, SFT layouts and a card.

    Args:
        preset: Optional. A YAML preset such as configs/kpod.yaml; when set it is what is exported.
        overrides: Optional. Dotted keys on top, e.g. {"export.out": "exports/mine", "export.rows": "all"}.
        config: The config whose generation is exported (its `export` section says how).
    """
    config = distill_config(config, preset, overrides)
    check_export(config)
    generated = generate(config)
    return export_stages(config, prepared_in_catalog(config, generated))
