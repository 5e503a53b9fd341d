"""The `baim` command line (also `python -m orchestrator`).

Each subcommand is `add_<name>_parser(subparsers)` (its arguments, `func=cmd_<name>`) and `cmd_<name>(args)
-> int` (the work, the exit status), listed in `SUBCOMMANDS`. Only this module prints for the user or picks
an exit status: library errors become one line per problem on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from orchestrator.core.errors import ArtifactRejected, ScenarioError, UnknownTask
from orchestrator.core.scenario import (
    EdgeConfig,
    Scenario,
    ServingConfig,
    format_validation_error,
    load_scenario,
    scenario_reference_markdown,
)
from orchestrator.data.traces import synthesise_trace, write_trace

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1  # the work itself failed
EXIT_BAD_INPUT = 2  # the scenario, a file or an argument is wrong (also argparse's own status)
REGISTRY_ENV = "BAIM_REGISTRY"  # cluster.yaml exports it on every node


def _load(args: argparse.Namespace) -> Scenario:
    """Load the scenario named by `args.scenario`, applying `--data-root` when the command has it."""
    scenario = load_scenario(args.scenario)
    data_root = getattr(args, "data_root", None)
    if data_root is not None:
        data = scenario.data.model_copy(update={"root": str(data_root)})
        scenario = scenario.model_copy(update={"data": data})
    return scenario


# --------------------------------------------------------------------------------------------------------
# validate


def add_validate_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="check a scenario file; exit 0 when valid, 2 with one line per problem",
        description="Check a scenario file against the schema; print every problem as `field.path: message`.",
    )
    parser.add_argument("scenario", type=Path, help="scenario YAML file")
    parser.add_argument(
        "--check-data",
        action="store_true",
        help="also resolve the data and partition it, to check that it can supply every requested size",
    )
    parser.add_argument(
        "--data-root", type=Path, default=None, help="use this CelebA folder instead of data.root"
    )
    parser.set_defaults(func=cmd_validate)


def cmd_validate(args: argparse.Namespace) -> int:
    scenario = _load(args)
    if args.check_data:
        from orchestrator.data.partitions import make_partitions
        from orchestrator.data.sources import resolve_source

        make_partitions(resolve_source(scenario.data), scenario)
    print(
        f"{args.scenario}: valid scenario {scenario.name!r} ({len(scenario.tasks)} tasks, "
        f"{len(scenario.all_edges())} edges, {len(scenario.timeline)} timeline events)"
    )
    return EXIT_OK


# --------------------------------------------------------------------------------------------------------
# schema


def add_schema_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "schema",
        help="print or write the scenario reference generated from the schema",
        description="Print the scenario reference (Markdown, or JSON Schema with --json) or write it.",
    )
    parser.add_argument("--json", action="store_true", help="JSON Schema instead of Markdown")
    parser.add_argument(
        "--comparison",
        action="store_true",
        help="the comparison.json schema (baim compare's output) instead of the scenario's",
    )
    parser.add_argument("--out", type=Path, default=None, help="write to this file instead of stdout")
    parser.set_defaults(func=cmd_schema)


def cmd_schema(args: argparse.Namespace) -> int:
    from orchestrator.core.comparison import Comparison, comparison_reference_markdown

    model = Comparison if args.comparison else Scenario
    if args.json:
        text = json.dumps(model.model_json_schema(), indent=2) + "\n"
    else:
        text = comparison_reference_markdown() if args.comparison else scenario_reference_markdown()
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------------------
# traces


def add_traces_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "traces",
        help="availability traces for the virtual clock",
        description="Availability traces (edge_id, start_s, end_s, speed, bandwidth_mbps), `time: virtual`.",
    )
    actions = parser.add_subparsers(dest="traces_command", metavar="ACTION", required=True)
    synth = actions.add_parser(
        "synth",
        help="draw a seeded synthetic trace for a scenario's edges",
        description="Draw a trace: diurnal availability in sessions, permanent drop-outs, lognormal speeds.",
    )
    synth.add_argument("scenario", type=Path, help="scenario YAML whose edges the trace covers")
    synth.add_argument("--out", type=Path, required=True, help="trace file to write (.csv or .parquet)")
    synth.add_argument("--hours", type=float, default=24.0, help="simulated hours covered (default 24)")
    synth.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    synth.add_argument("--mean-online", type=float, default=0.7, help="mean share of sessions online")
    synth.add_argument("--diurnal-amplitude", type=float, default=0.25, help="daily swing of that share")
    synth.add_argument("--period-hours", type=float, default=24.0, help="length of the availability cycle")
    synth.add_argument("--session-minutes", type=float, default=20.0, help="granularity of on/off changes")
    synth.add_argument("--dropout-rate", type=float, default=0.0, help="share of edges that leave for good")
    synth.add_argument("--speed-sigma", type=float, default=0.5, help="lognormal sigma of compute speeds")
    synth.add_argument(
        "--bandwidth", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
        help="log-uniform bandwidth range in Mbit/s (default: each edge's own link)",
    )  # fmt: skip
    synth.set_defaults(func=cmd_traces_synth)


def cmd_traces_synth(args: argparse.Namespace) -> int:
    scenario = load_scenario(args.scenario)
    edge_ids = [edge.id for edge in scenario.all_edges()]
    try:
        rows = synthesise_trace(
            edge_ids, hours=args.hours, seed=args.seed, period_hours=args.period_hours,
            mean_online=args.mean_online, diurnal_amplitude=args.diurnal_amplitude,
            session_minutes=args.session_minutes, dropout_rate=args.dropout_rate,
            speed_sigma=args.speed_sigma,
            bandwidth_mbps=None if args.bandwidth is None else (args.bandwidth[0], args.bandwidth[1]),
        )  # fmt: skip
    except ValueError as err:
        print(f"baim traces synth: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    write_trace(rows, args.out)
    online = sum(row.end_s - row.start_s for row in rows) / max(1, len(edge_ids)) / 3600.0
    print(f"wrote {args.out}: {len(rows)} online intervals for {len(edge_ids)} edges, "
          f"{online:.2f} of {args.hours:g} hours online per edge on average")  # fmt: skip
    return EXIT_OK


# --------------------------------------------------------------------------------------------------------
# demo


def add_demo_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="validate a scenario, resolve its data, partition it and print the shards",
        description=(
            "Validate a scenario, find its data (CelebA or the procedural faces), partition it and print the "
            "shard of every edge. With --out, write partitions.json, scenario.json and data.json there."
        ),
    )
    parser.add_argument("scenario", type=Path, help="scenario YAML file")
    parser.add_argument("--out", type=Path, default=None, help="folder for partitions.json and friends")
    parser.add_argument(
        "--data-root", type=Path, default=None, help="use this CelebA folder instead of data.root"
    )
    parser.set_defaults(func=cmd_demo)


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def _resources(edge: EdgeConfig) -> str:
    parts = [f"cpu={edge.num_cpus:g}"]
    if edge.num_gpus:
        parts.append(f"gpu={edge.num_gpus:g}")
    if edge.memory_mb is not None:
        parts.append(f"mem={edge.memory_mb}MiB")
    parts += [f"{name}={amount:g}" for name, amount in edge.custom_resources.items()]
    return " ".join(parts)


def cmd_demo(args: argparse.Namespace) -> int:
    from orchestrator.data.partitions import make_partitions
    from orchestrator.data.sources import resolve_source

    scenario = _load(args)
    source = resolve_source(scenario.data)
    partitions = make_partitions(source, scenario)

    if source.kind == "celeba":
        data_line = f"CelebA at {source.root} ({source.num_images} images)"
    else:
        data_line = (
            f"procedural faces ({source.num_images} images, seed {source.procedural_seed}); "
            f"no CelebA found at {source.root}"
        )
    if source.test_split_drawn:
        test_line = f"drawn from the training pool with seed {scenario.seed} (the data has no test partition)"
    else:
        test_line = "from the official test partition"
    print(f"scenario {scenario.name!r}, seed {scenario.seed}, resolution {scenario.data.resolution}x"
          f"{scenario.data.resolution}")  # fmt: skip
    print(f"data: {data_line}")
    print(f"test split: {test_line}")
    print()
    squads = scenario.squads()
    task_rows = [
        [
            task.name,
            task.expression,
            len(partitions.test[task.name]),
            len(partitions.holdout[task.name]),
            len(partitions.cloud[task.name]),
            len(squads[task.name]),
            int(source.matching(task.expression).sum()),
        ]
        for task in scenario.tasks
    ]
    print(_table(["task", "expression", "test", "holdout", "cloud", "edges", "matching images"], task_rows))
    print()
    edge_rows = []
    for edge in scenario.all_edges():
        model = "-".join(str(w) for w in edge.model.widths) + f" z{edge.model.latent_dim}"
        edge_rows.append(
            [
                edge.id,
                edge.task,
                scenario.task(edge.task).expression,
                len(partitions.edges[edge.id]),
                _resources(edge),
                model,
                edge.local_epochs,
                f"{edge.link.bandwidth_mbps:g}Mbit/s {edge.link.latency_ms:g}ms",
                "start" if edge.start else "joins later",
            ]
        )
    header = [
        "edge",
        "task",
        "expression",
        "shard",
        "resources",
        "model (widths, latent)",
        "epochs",
        "link",
        "",
    ]
    print(_table(header, edge_rows))
    total_edge = sum(len(indices) for indices in partitions.edges.values())
    print()
    print(
        f"totals: {sum(len(v) for v in partitions.test.values())} test, "
        f"{sum(len(v) for v in partitions.holdout.values())} holdout, "
        f"{sum(len(v) for v in partitions.cloud.values())} cloud, {total_edge} edge images; all disjoint"
    )

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "partitions.json").write_text(partitions.to_json(), encoding="utf-8")
        (args.out / "scenario.json").write_text(scenario.model_dump_json(indent=1), encoding="utf-8")
        (args.out / "data.json").write_text(json.dumps(source.describe(), indent=1), encoding="utf-8")
        print(f"wrote {args.out / 'partitions.json'}, scenario.json, data.json")
    return EXIT_OK


# --------------------------------------------------------------------------------------------------------
# run


def add_run_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a scenario on Ray: edges train and upload, the cloud fuses and trains; writes report.json",
        description=(
            "Run a scenario end to end on a local embedded Ray instance (default) or an existing cluster "
            "(--address auto | ray://host:10001): edge actors train and upload, the coordinator validates, "
            "fuses and trains the BAIM, decomposes it into task models and publishes them to DIR/registry. "
            "Writes DIR/report.json and prints a summary table. Exit 0 unless the run itself failed (exit 1: "
            "e.g. a cloud round failed, so no task models were published; report.md says why; a crashed edge "
            "in a churn scenario is an expected event). Exit 2 when DIR (or its registry) already holds "
            "another run: pick a new --out or delete it."
        ),
    )
    parser.add_argument("scenario", type=Path, help="scenario YAML file")
    parser.add_argument("--out", type=Path, default=Path("baim-out"), help="output folder (default baim-out)")
    add_address_argument(parser)
    add_registry_argument(parser, default_help="DIR/registry")
    parser.add_argument(
        "--num-cpus", type=int, default=None, help="CPUs of the local embedded Ray (default: all cores)"
    )
    parser.add_argument(
        "--serve",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="serve the task models with Ray Serve after the run (default: the scenario's serving.enabled)",
    )
    parser.add_argument(
        "--data-root", type=Path, default=None, help="use this CelebA folder instead of data.root"
    )
    parser.add_argument(
        "--evaluate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after the run: FedAvg baseline (when the scenario enables it), personalisation, FID/KID and "
        "sample grids for report.md (default on)",
    )
    parser.add_argument(
        "--fid-samples",
        type=int,
        default=100,
        help="generated and real images per FID/KID set (default 100; Inception: ~0.13-0.8 s/image on CPU)",
    )
    parser.add_argument(
        "--personalise-epochs",
        type=int,
        default=2,
        help="local epochs each edge fine-tunes its downloaded task model (default 2; 0 skips)",
    )
    parser.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from actors.coordinator import RegistryHeldByAnotherRun
    from orchestrator.evaluation.evaluate import EvaluationOptions, evaluation_stage
    from orchestrator.report.build import summary_table
    from orchestrator.runtime.engine import EngineOptions, RunFailed, run_scenario

    scenario = _load(args)
    serve_after = scenario.serving.enabled if args.serve is None else args.serve
    try:
        evaluation = (
            EvaluationOptions(fid_samples=args.fid_samples, personalise_epochs=args.personalise_epochs)
            if args.evaluate
            else None
        )
    except ValueError as exc:
        print(f"--fid-samples/--personalise-epochs: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    address_problem = stale_ray_address(args.address)
    if address_problem is not None:
        print(address_problem, file=sys.stderr)
        return EXIT_BAD_INPUT
    options = EngineOptions(
        address=args.address,
        registry_uri=absolute_registry(args.registry),
        num_cpus=args.num_cpus,
        progress=lambda line: print(line, flush=True),
        keep_ray=serve_after,
        after_run=None if evaluation is None else evaluation_stage(evaluation),
    )
    try:
        report = run_scenario(scenario, args.out, options)
    except RegistryHeldByAnotherRun as exc:  # found before anything started or was written
        print(str(exc), file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunFailed as exc:  # the report is written and says why
        print(f"run failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # the run itself failed: one line, exit 1 (details in the log)
        logger.exception("run failed")
        print(f"run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print()
    print(summary_table(report))
    print(f"report: {args.out / 'report.md'} (rebuild with: baim report {args.out})")
    if serve_after:
        where = f"http://{scenario.serving.host}:{scenario.serving.port}"
        task = scenario.tasks[0].name
        print(f"serving the task models at {where} (Ctrl-C stops); try:", flush=True)
        print(f"  curl {where}/tasks", flush=True)
        print(
            f"  curl -X POST {where}/tasks/{task}/generate -H 'Content-Type: application/json' "
            '-d \'{"n": 4, "seed": 0}\'',
            flush=True,
        )
        serve_until_stopped(report.registry, scenario.serving)
    return EXIT_OK


def serve_until_stopped(registry_uri: str, serving: ServingConfig, poll_seconds: float = 5.0) -> None:
    """Serve a registry until SIGINT (Ctrl-C) or SIGTERM, then shut Ray down (`baim serve`, `run --serve`).

    Needs Ray initialised. The handlers are set explicitly, after ray.init (whose driver installs a SIGTERM
    handler that exits at once), because a process started in the background by a shell inherits SIGINT
    ignored, and Python then never raises KeyboardInterrupt.
    """
    import ray

    from serve.app import serve_registry

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve_registry(registry_uri, serving, poll_seconds=poll_seconds, stop=stop)
    finally:
        ray.shutdown()
    print("stopped serving", flush=True)


def absolute_registry(uri: str | None) -> str | None:
    """A local registry path made absolute: the coordinator, Ray Train and Serve replicas each resolve a
    relative one against their own working directory (under `ray job submit`, a temporary copy)."""
    if uri is None or "://" in uri:
        return uri
    return os.path.abspath(uri)


def add_address_argument(parser: argparse.ArgumentParser) -> None:
    """--address, passed to ray.init as is (`baim run` and `baim serve` join Ray the same way)."""
    parser.add_argument(
        "--address",
        default=None,
        help="auto or ray://host:port joins an existing Ray cluster; local starts a new embedded one "
        "(default: Ray's own choice: a running local cluster if there is one, else a new one)",
    )


RAY_ADDRESS_ENV = "RAY_ADDRESS"
GCS_PROBE_SECONDS = 5.0  # a live GCS accepts a connection at once; a dead one refuses it at once too


def stale_ray_address(address: str | None) -> str | None:
    """Why joining Ray at `address` would hang, or None when it would not.

    With no --address (or `auto`), ray.init joins the cluster named by $RAY_ADDRESS or by the address file
    that `ray start --head` writes (`<tmp>/ray/ray_current_cluster`). When that cluster was killed the file
    stays, and ray.init retries the dead GCS for minutes; one TCP connection tells at once.
    """
    if address not in (None, "auto"):
        return None
    from ray._common.utils import get_ray_address_file  # Ray's own rule for where the file is

    found = os.environ.get(RAY_ADDRESS_ENV) or None
    source, remedy = f"${RAY_ADDRESS_ENV}", f"unset {RAY_ADDRESS_ENV}"
    if found is None:
        address_file = get_ray_address_file(None)
        source, remedy = f"the Ray address file {address_file}", f"delete {address_file}"
        try:
            found = Path(address_file).read_text(encoding="utf-8").strip() or None
        except OSError:
            return None  # no file: ray.init starts a new local instance (or, for auto, says none runs)
    if found is None or found in ("auto", "local") or found.startswith("ray://"):
        return None
    host, _, port = found.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=GCS_PROBE_SECONDS).close()
    except (OSError, ValueError) as exc:
        return (
            f"{source} names the Ray cluster {found}, which does not answer ({exc}); a `ray start --head` "
            f"that was killed leaves this behind. Pass --address local to start a new embedded Ray instance, "
            f"or {remedy}"
        )
    return None


def add_registry_argument(parser: argparse.ArgumentParser, *, default_help: str) -> None:
    """--registry URI, defaulting to $BAIM_REGISTRY (cluster.yaml exports it on every node)."""
    parser.add_argument(
        "--registry",
        default=os.environ.get(REGISTRY_ENV) or None,
        metavar="URI",
        help=f"artifact registry: a folder or a pyarrow.fs URI such as s3://bucket/prefix, shared by every "
        f"node on a cluster (default: ${REGISTRY_ENV} when set, else {default_help})",
    )


# --------------------------------------------------------------------------------------------------------
# serve


def add_serve_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a registry's task models over HTTP with Ray Serve, following new versions",
        description=(
            "Deploy every task model of a registry with Ray Serve (one autoscaling application per task, "
            "reached by the proxy in one hop, plus an index at /; docs/http-api.md) and follow the registry: "
            "new versions roll out and new tasks appear without failing requests. Blocks until Ctrl-C or "
            "SIGTERM. Replica settings come from the scenario's `serving` section when --scenario is given, "
            "else from its defaults. Set BAIM_API_TOKEN to require a bearer token. --write-config FILE "
            "writes the same applications as a Serve config file instead (for `serve deploy FILE`)."
        ),
    )
    add_registry_argument(parser, default_help="required")
    parser.add_argument(
        "--scenario", type=Path, default=None, help="take the `serving` settings from this scenario YAML"
    )
    add_address_argument(parser)
    parser.add_argument("--host", default=None, help="HTTP host (default: serving.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default: serving.port, 8000)")
    parser.add_argument(
        "--poll-seconds",
        type=float,
        default=5.0,
        help="how often the registry is checked for new versions and tasks (default 5)",
    )
    parser.add_argument(
        "--write-config",
        type=Path,
        default=None,
        metavar="FILE",
        help="write a Serve config file for the registry's task models instead of serving, then exit; apply "
        "it with `serve deploy FILE` (a running cluster) or `serve run FILE` (docs/http-api.md)",
    )
    parser.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    if not args.registry:
        print(f"--registry: required (or set {REGISTRY_ENV})", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.poll_seconds <= 0:
        print(f"--poll-seconds: expected > 0, received {args.poll_seconds}", file=sys.stderr)
        return EXIT_BAD_INPUT
    serving = load_scenario(args.scenario).serving if args.scenario is not None else ServingConfig()
    overrides = {key: value for key, value in (("host", args.host), ("port", args.port)) if value is not None}
    # Validated like the scenario's own fields (port range, ...); main() prints a ValidationError.
    serving = ServingConfig.model_validate({**serving.model_dump(), **overrides})

    import ray

    from orchestrator.core.registry import Registry

    registry_uri = absolute_registry(args.registry)
    assert registry_uri is not None
    if "://" not in registry_uri and not os.path.isdir(registry_uri):
        # Registry() would create it: a mistyped path would serve an empty /tasks forever.
        print(f"--registry {registry_uri}: no such folder", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        Registry(registry_uri)  # a bad URI or an unreachable bucket fails here, before Ray starts
    except Exception as exc:
        print(f"--registry {registry_uri}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.write_config is not None:
        return write_serve_config(args.write_config, registry_uri, serving, args.poll_seconds)
    address_problem = stale_ray_address(args.address)
    if address_problem is not None:
        print(address_problem, file=sys.stderr)
        return EXIT_BAD_INPUT
    ray.init(address=args.address, include_dashboard=False, configure_logging=False)
    where = f"http://{serving.host}:{serving.port}"
    print(f"serving the task models of {registry_uri} at {where} (Ctrl-C stops); try: curl {where}/tasks")
    serve_until_stopped(registry_uri, serving, poll_seconds=args.poll_seconds)
    return EXIT_OK


def write_serve_config(path: Path, registry_uri: str, serving: ServingConfig, poll_seconds: float) -> int:
    """`baim serve --write-config FILE`: a Serve config for every task model in the registry (no Ray)."""
    import yaml

    from orchestrator.core.registry import Registry
    from serve.app import application_specs, latest_task_versions, serve_config

    tasks = sorted(latest_task_versions(Registry(registry_uri)))
    if not tasks:
        print(f"--registry {registry_uri}: holds no task models (task/<name>) to serve", file=sys.stderr)
        return EXIT_BAD_INPUT
    config = serve_config(application_specs(registry_uri, serving, tasks, poll_seconds=poll_seconds), serving)
    header = (
        f"# Ray Serve config for the task models of {registry_uri} ({', '.join(tasks)}), written by\n"
        f"# `baim serve --write-config`. Apply it with `serve deploy {path}` (a running cluster) or\n"
        f"# `serve run {path}`. BAIM_API_TOKEN is read where the applications are built (the cluster).\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    print(f"wrote {path} ({len(tasks)} task applications, an index, a metrics hub); serve deploy {path}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------------------
# compare


def add_compare_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="every method on the same edges, shards and test set: comparison.json, report.md, report.html",
        description=(
            "Run the BAIM (each strategy, an epoch sweep), FedAvg (a point per round, until a plateau or the "
            "round cap), FedAvg + cloud fine-tuning, cloud-only (scratch), each edge alone and a centralised "
            "reference (privacy-violating upper bound) on the same edges, shards and test set, as the "
            "scenario's `compare:` section says (defaults fill it). Writes DIR/comparison.json, "
            "DIR/report.md, DIR/report.html (every image inlined), DIR/plots/, DIR/samples/ and the BAIM "
            "run's own output under DIR/baim-run/. Exit 2 when DIR already holds a comparison."
        ),
    )
    parser.add_argument("scenario", type=Path, help="scenario YAML file")
    parser.add_argument("--out", type=Path, default=Path("compare-out"), help="output folder")
    add_address_argument(parser)
    parser.add_argument(
        "--num-cpus", type=int, default=None, help="CPUs of the local embedded Ray (default: all cores)"
    )
    parser.add_argument(
        "--cloud-trainer",
        choices=("auto", "ray_train", "local"),
        default=None,
        help="how the BAIM's cloud rounds train: Ray Train jobs, in the coordinator's process, or auto by "
        "the round's estimated FLOPs (default: the scenario's cloud.trainer)",
    )
    parser.add_argument(
        "--fid-samples", type=int, default=None, help="override compare.fid_samples (0: no FID/KID)"
    )
    parser.add_argument(
        "--data-root", type=Path, default=None, help="use this CelebA folder instead of data.root"
    )
    parser.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from orchestrator.evaluation.compare import BAIM_RUN_DIR, CompareOptions, run_compare
    from orchestrator.report.comparison import write_comparison_report

    scenario = _load(args)
    if args.fid_samples is not None:
        if args.fid_samples < 0:
            print(f"--fid-samples: expected >= 0, received {args.fid_samples}", file=sys.stderr)
            return EXIT_BAD_INPUT
        compare = scenario.compare.model_copy(update={"fid_samples": args.fid_samples})
        scenario = scenario.model_copy(update={"compare": compare})
    if (args.out / "comparison.json").exists() or (args.out / BAIM_RUN_DIR).exists():
        print(f"--out {args.out} already holds a comparison; pick a new --out or delete it", file=sys.stderr)
        return EXIT_BAD_INPUT
    address_problem = stale_ray_address(args.address)
    if address_problem is not None:
        print(address_problem, file=sys.stderr)
        return EXIT_BAD_INPUT
    options = CompareOptions(
        cloud_trainer=args.cloud_trainer,
        address=args.address,
        num_cpus=args.num_cpus,
        progress=lambda line: print(line, flush=True),
    )
    try:
        comparison = run_compare(scenario, args.out, options)
    except Exception as exc:  # the run itself failed: one line, exit 1 (details in the log)
        logger.exception("compare failed")
        print(f"compare failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    markdown, page = write_comparison_report(args.out, comparison)
    table = comparison.time_to_quality
    if table is not None:
        print(f"\ntime to quality (target test loss {table.target_loss:.5f}, {table.target_source}):")
        rows = [
            [
                row.label,
                f"{row.step_name} {row.step}" if row.reached else f"not reached within cap {row.cap}",
                f"{row.bytes_per_edge / 1e6:.3f} MB" if row.bytes_per_edge is not None else "",
                f"{row.edge_flops_per_edge / 1e9:.2f} GFLOP" if row.edge_flops_per_edge is not None else "",
                f"{row.wall_seconds:.1f} s" if row.wall_seconds is not None else "",
            ]
            for row in table.rows
        ]
        print(_table(["method", "reached at", "bytes/edge", "edge FLOPs/edge", "seconds"], rows))
    if comparison.goal is not None:
        print(f"goal: {comparison.goal.text}")
    print(f"wrote {args.out / 'comparison.json'}, {markdown}, {page}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------------------
# report


def add_report_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report",
        help="rebuild DIR/report.md and DIR/plots/*.png from DIR/report.json",
        description=(
            "Rebuild a run's report.md and its plots (sample grids, test-loss curves, bytes and FLOPs per "
            "edge, FID/KID, headline ratios BAIM vs FedAvg) from DIR/report.json and the sample tensors "
            "under DIR/samples/. Sections the run did not measure say so."
        ),
    )
    parser.add_argument("dir", type=Path, help="a run's output folder (holds report.json)")
    parser.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from orchestrator.report.markdown import write_report_markdown

    try:
        path = write_report_markdown(args.dir)
    except (FileNotFoundError, ValueError) as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {path} and {args.dir / 'plots'}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------------------
# entry point

SUBCOMMANDS: list[Callable[[Any], None]] = [
    add_validate_parser,
    add_schema_parser,
    add_demo_parser,
    add_run_parser,
    add_compare_parser,
    add_serve_parser,
    add_report_parser,
    add_traces_parser,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="baim",
        description="Ray orchestrator for edge-cloud generative AI with a bottom-up Big AI Model (BAIM).",
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level of the library's messages on stderr (default WARNING)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand and return its exit status (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    try:
        status: int = args.func(args)
    except ValidationError as exc:
        for line in format_validation_error(exc):
            print(line, file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ScenarioError, UnknownTask, ArtifactRejected) as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_BAD_INPUT
    return status
