"""The `keystep` command.

    keystep run CONFIG [--set section.key=value]... [--workspace DIR]
    keystep results [--workspace DIR] [--format table|json]
    keystep config [CONFIG] [--set ...]        print the resolved config as YAML
    keystep experiment FILE [--set key=value]  run an experiment grid (e.g. configs/study-synthetic.yaml)
    keystep report FILE [--set key=value]      rebuild its report from the study files alone
    keystep export CONFIG --out DIR [--all] [--push-to-hub REPO]   the rationales as a dataset folder
    keystep pack CONFIG DEST / keystep unpack CONFIG SRC   carry a trained student to another machine

`run` calls the distill flow in this process: against the Prefect server in PREFECT_API_URL if set, else an
ephemeral one. User mistakes (bad config, unknown key, missing file) exit 2 with one line, no traceback.
The CLI sits above the flows: it imports them, nothing imports it (`python -m flows.cli` works without the
console script).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import uuid
from pathlib import Path

# Before anything imports Prefect (it reads its settings once): no telemetry offline, and a temporary server that
# may take minutes to start — on its first start it creates and migrates its database, which on two busy cores
# often takes longer than Prefect's default 20 s.
STARTUP_TIMEOUT_S = "600"
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", STARTUP_TIMEOUT_S)

from flows.preflight import preflight  # noqa: E402
from keystep.config import ConfigError, load_config, parse_value  # noqa: E402
from tasks.teacher_backends import TeacherUnavailable  # noqa: E402


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set '{pair}': expected section.key=value, e.g. --set train.epochs=3")
        out[key.strip()] = parse_value(value)
    return out


def _run_overrides(args) -> dict:
    overrides = _overrides(args.set or [])
    if getattr(args, "workspace", None):
        overrides["storage.workspace"] = args.workspace
    return overrides


def _config(args):
    return load_config(args.config, _run_overrides(args))


def quiet_console_tracebacks() -> None:
    """A user mistake found inside a flow ends with one line on the terminal: Prefect's console handlers print the
    log records without their traceback, which its API handler still sends to the run's log in the Prefect UI."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    class WithoutTraceback(logging.Formatter):
        def __init__(self, inner: logging.Formatter | None):
            super().__init__()
            self.inner = inner or logging.Formatter()

        def format(self, record: logging.LogRecord) -> str:
            saved = record.exc_info, record.exc_text, record.stack_info
            record.exc_info = record.exc_text = record.stack_info = None
            try:
                return self.inner.format(record)
            finally:
                record.exc_info, record.exc_text, record.stack_info = saved

    loggers = [logging.getLogger(), *(x for x in logging.Logger.manager.loggerDict.values() if isinstance(x, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, WithoutTraceback):
                handler.setFormatter(WithoutTraceback(handler.formatter))


class PrefectUnavailable(RuntimeError):
    """Prefect's server could not be reached or started: one line that says what to do."""


def start_prefect() -> None:
    import prefect.main  # noqa: F401 - configures Prefect's logging (`import prefect` alone is lazy), which
    #                      quiet_console_tracebacks then adjusts

    quiet_console_tracebacks()
    check_server()


def start_temporary_server() -> None:
    """With no PREFECT_API_URL: start Prefect's temporary server here — the one its client would start on first use
    (`SubprocessASGIServer()` is a singleton) — with the server's own output in PREFECT_HOME/temporary-server.log
    instead of on the terminal. Its error log (SQLite's transient `database is locked` on busy cores, a pooled
    connection cancelled at shutdown) is Prefect's bookkeeping, and printed among the run's lines it reads as a
    keystep traceback."""
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE

    if server_configured() or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
        return
    from prefect.logging import get_logger
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    if server.running:
        return
    log_path = Path(PREFECT_HOME.value()) / "temporary-server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        with output_to(log):   # the server process inherits file descriptors 1 and 2 while it starts
            server.start()
    get_logger("keystep").info(f"Started temporary server on {server.address} (its log: {log_path}); for one that "
                               "lasts, with the UI: `make serve` and PREFECT_API_URL=http://127.0.0.1:4200/api")


@contextlib.contextmanager
def output_to(file):
    """This process's stdout and stderr, at the file-descriptor level, go to `file` inside the block."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(file.fileno(), 1), os.dup2(file.fileno(), 2)
        yield
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def server_configured() -> bool:
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def check_server() -> None:
    """A configured server (PREFECT_API_URL) must answer before any work starts."""
    if not server_configured():
        return
    import httpx
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value().rstrip("/")
    try:
        httpx.get(f"{url}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as err:
        raise PrefectUnavailable(f"the Prefect server at PREFECT_API_URL={url} does not answer ({type(err).__name__}); "
                                 "start it (`make serve`), or unset PREFECT_API_URL to run on a temporary server") from None


def prefect_start_failure(err: BaseException) -> PrefectUnavailable | None:
    """Prefect's own start-up errors as one actionable line (None for any other error)."""
    text = str(err)
    if "ephemeral Prefect API server" in text:
        return PrefectUnavailable(
            "Prefect's temporary server did not start within "
            f"{os.environ.get('PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS')} s (the first start creates its "
            "database under PREFECT_HOME, slow on busy cores; its log: PREFECT_HOME/temporary-server.log); run the "
            "command again, raise "
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or start a server with `make serve` and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api")
    return None


def cmd_run(args) -> int:
    config = _config(args)
    preflight(config, check_teacher_endpoint=not args.no_check_teacher)
    start_prefect()
    from flows.distill import distill
    from flows.phases import from_catalog_run
    from flows.tracking import record_run_end, record_run_start
    from tasks.evaluate import results_table
    from storage.workspace import Workspace

    # With no Prefect server configured a run whose every stage is already in the catalog is read from it: it is
    # recorded in table `runs` without starting Prefect's temporary server (whose own run list is discarded anyway).
    cached = None if server_configured() else from_catalog_run(config)
    if cached:
        run_id = f"catalog-{uuid.uuid4()}"
        record_run_start(config, run_id, flow_run_id=None).stop()
        summary = record_run_end(config, run_id, cached)
    else:
        start_temporary_server()
        # the preset and the overrides, not the resolved config, are the run's parameters: the UI shows what was asked
        summary = distill(preset=args.config, overrides=_run_overrides(args))
    rows = Workspace(config.storage.workspace).catalog().query("latest_results", eval_fp=summary.eval_fp)
    print(results_table(rows))
    print(f"\nreport: {summary.report}\nworkspace: {summary.workspace}")
    return 0


def cmd_experiment(args) -> int:
    from keystep.config import arm_config, load_experiment

    exp = load_experiment(args.file, _overrides(args.set or []))
    for preset in (exp.pretrain, exp.teacher_preset):
        if preset:
            preflight(load_config(preset))
    for variant in exp.variants:   # a pretrained student's folder is checked once `pretrain` has made it
        if not exp.seeds_of(variant):   # `variant_seeds: {arm: []}` leaves an arm out of this run
            continue
        arm = arm_config(exp, variant, exp.seeds_of(variant)[0])
        if exp.teacher_preset:     # ... and the model teacher's once `teacher_preset` has
            arm = arm.model_copy(update={"teacher_scores": arm.teacher_scores.model_copy(update={"model": None})})
        preflight(arm)
    start_prefect()
    start_temporary_server()
    from flows.experiment import experiment

    out = experiment(config=exp)
    print(out.markdown)
    print(f"results: {out.results_path}")
    return 0


def cmd_export(args) -> int:
    """The rationales of the generation CONFIG resolves to, as a dataset folder (and a hub repo with --push-to-hub)."""
    overrides = _run_overrides(args)
    if args.out:
        overrides["export.out"] = args.out
    if args.push_to_hub:
        overrides["export.push_to_hub"] = args.push_to_hub
    if args.all:
        overrides["export.rows"] = "all"
    config = load_config(args.config, overrides)
    from tasks.export import check_export
    check_export(config)                                   # a push without a token: one line, before any work
    preflight(config, check_teacher_endpoint=False)
    from flows.phases import CatalogStages, generate_stages
    from tasks.stage import NotCached

    try:
        generated = generate_stages(config, CatalogStages(config))
    except NotCached:
        if config.teacher.backend != "reference":   # an export never pays the teacher
            raise ConfigError(f"no teacher rationales for {args.config} in workspace '{config.storage.workspace}' yet; "
                              "run `keystep run CONFIG` (or the generate deployment) first, or pass --workspace") from None
        generated = None
    if generated is None or server_configured():
        start_prefect()
    if generated is not None and not server_configured():   # everything it reads is in the catalog: no Prefect
        from flows.export import prepared_in_catalog
        from storage.workspace import Workspace
        from tasks.export import export_dataset, push_to_hub

        done = export_dataset(Workspace(config.storage.workspace), config, generated.generation,
                              **prepared_in_catalog(config, generated))
        out = {**done.model_dump(), "hub_url": push_to_hub(config, done) if config.export.push_to_hub else None}
    else:
        start_temporary_server()
        from flows.export import export
        out = export(preset=args.config, overrides=overrides)
    print(f"exported {out['n_rows']} rationales and {out['n_sft']} SFT rows ({', '.join(out['formats'])}) to "
          f"{out['out_dir']}" + (f"\nuploaded: {out['hub_url']}" if out.get("hub_url") else ""))
    return 0


def cmd_pack(args) -> int:
    """The trained student of the run CONFIG makes, with its lineage, as a folder to copy to another machine."""
    from flows.phases import planned_run
    from storage.workspace import Workspace
    from tasks.carry import pack_trained

    config = _config(args)
    lineage = planned_run(config).lineages["train"]
    manifest = pack_trained(Workspace(config.storage.workspace), lineage, Path(args.dest), args.config)
    size = sum((Path(args.dest) / "model" / rel).stat().st_size for rel in manifest["files"])
    print(f"packed train stage {lineage.fp} ({len(manifest['files'])} files, {size / 2**20:.1f} MiB) to {args.dest}")
    return 0


def cmd_unpack(args) -> int:
    """Record a pack as the trained student of the run CONFIG makes here: that run then trains nothing."""
    from flows.phases import planned_run
    from storage.workspace import Workspace
    from tasks.carry import unpack_trained
    from tasks.student import student_folder

    config = _config(args)
    preflight(config, check_teacher_endpoint=False)
    plan = planned_run(config)
    lineage, student = plan.lineages["train"], plan.lineages["student"]
    ws = Workspace(config.storage.workspace)
    trained, recorded = unpack_trained(ws, config, lineage, student_folder(ws, config, student.fp), Path(args.src), args.config)
    print(f"{'unpacked' if recorded else 'already in the workspace:'} train stage {lineage.fp} -> {trained.final_dir}"
          f"\n{args.config} with these settings now trains nothing when run here (its other stages and the "
          "evaluation still run)")
    return 0


def cmd_report(args) -> int:
    """An experiment's report rebuilt from its committed study files alone (no catalog, no Prefect)."""
    from keystep.config import load_experiment
    from tasks.compare import study_report

    out = study_report(load_experiment(args.file, _overrides(args.set or [])))
    print(out["markdown"])
    print(f"results: {out['results_path']} ({len(out['runs'])} runs, {len(out['missing'])} not run yet)")
    return 0


def cmd_results(args) -> int:
    from storage.catalog import Catalog
    from storage.runs import reconcile
    from tasks.evaluate import results_table, trained_description

    path = Path(args.workspace or ".keystep") / "catalog.duckdb"
    if not path.exists():
        raise ConfigError(f"no catalog at '{path}'; run `keystep run CONFIG` first or pass --workspace DIR")
    catalog = Catalog(path)
    reconcile(catalog, path.parent)          # a run killed without warning shows as killed, never as running
    rows = catalog.query("latest_results", eval_fp=None)
    runs = catalog.query("runs_recent", limit=5)
    trained = trained_description(catalog)
    if args.format == "json":
        print(json.dumps({"results": rows, "trained": trained, "runs": runs}, indent=2, default=str))
    else:
        if trained:
            print("evaluated: " + "; ".join(f"{k} {v}" for k, v in trained.items() if k != "final_dir" and v is not None))
        print(results_table(rows))
        print("\nlatest runs:")
        for r in runs:
            print(f"  {r['run_id']}  {r['status']:<9}  started {r['started_at']:%Y-%m-%d %H:%M:%S}"
                  + (f", ended {r['finished_at']:%H:%M:%S}" if r["finished_at"] else ""))
    return 0


def cmd_config(args) -> int:
    import yaml

    print(yaml.safe_dump(_config(args).model_dump(mode="json"), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keystep", description="Chain-of-thought distillation as a Prefect pipeline.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the distill flow on a config")
    run.add_argument("config", help="YAML preset, e.g. configs/demo.yaml")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    run.add_argument("--workspace", help="workspace folder (default: storage.workspace, .keystep)")
    run.add_argument("--no-check-teacher", action="store_true", help="skip the pre-flight check that the teacher "
                     "endpoint answers")
    run.set_defaults(fn=cmd_run)
    exp = sub.add_parser("experiment", help="run an experiment grid (variants x seeds) and print its comparison table")
    exp.add_argument("file", help="experiment YAML, e.g. configs/study-synthetic.yaml")
    exp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override an experiment key, e.g. seeds=[0]")
    exp.set_defaults(fn=cmd_experiment)
    exp_ = sub.add_parser("export", help="write the teacher's rationales as a dataset (HF datasets, Parquet, SFT layouts, card)")
    exp_.add_argument("config", help="YAML preset whose generation to export, e.g. configs/demo.yaml")
    exp_.add_argument("--out", help="folder to write (default <workspace>/exports/<fingerprint>)")
    exp_.add_argument("--workspace", help="workspace folder (default: storage.workspace)")
    exp_.add_argument("--all", action="store_true", help="every rationale with its status and reason, not only kept ones")
    exp_.add_argument("--push-to-hub", metavar="REPO", help="upload to this Hugging Face dataset repo (token in $HF_TOKEN)")
    exp_.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. export.formats=[label_only]")
    exp_.set_defaults(fn=cmd_export)
    for name, fn, where, what in (
            ("pack", cmd_pack, "dest", "folder to write the pack to"),
            ("unpack", cmd_unpack, "src", "pack folder that `keystep pack` wrote")):
        carry = sub.add_parser(name, help="write the trained student of CONFIG, with its lineage, to a folder to carry "
                               "to another machine" if name == "pack" else "record a pack as the trained student of "
                               "CONFIG here, so its run trains nothing")
        carry.add_argument("config", help="YAML preset, e.g. configs/teacher-arith.yaml")
        carry.add_argument(where, help=what)
        carry.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
        carry.add_argument("--workspace", help="workspace folder (default: storage.workspace)")
        carry.set_defaults(fn=fn)
    rep = sub.add_parser("report", help="rebuild an experiment's report from its study files (docs/studies/...)")
    rep.add_argument("file", help="experiment YAML, e.g. configs/study-scratch.yaml")
    rep.add_argument("--set", action="append", metavar="KEY=VALUE", help="override an experiment key")
    rep.set_defaults(fn=cmd_report)
    res = sub.add_parser("results", help="print the latest evaluation results from the catalog")
    res.add_argument("--workspace", help="workspace folder (default .keystep)")
    res.add_argument("--format", choices=["table", "json"], default="table")
    res.set_defaults(fn=cmd_results)
    cfg = sub.add_parser("config", help="print the resolved config")
    cfg.add_argument("config", nargs="?", help="YAML preset (default: the built-in default)")
    cfg.add_argument("--set", action="append", metavar="KEY=VALUE")
    cfg.add_argument("--workspace")
    cfg.set_defaults(fn=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, ValueError, FileNotFoundError, TeacherUnavailable, PrefectUnavailable) as err:
        # user mistakes (including ones found inside a stage, and a teacher that stopped answering) get one line,
        # not a traceback; the full one is in the run's log in the Prefect UI
        print(f"keystep: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        failure = prefect_start_failure(err)
        if failure is None:
            raise
        print(f"keystep: error: {failure}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
