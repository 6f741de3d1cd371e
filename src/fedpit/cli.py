"""The `fedpit` command: run | compare | sweep | frontier | judge | serve | attack | report | data | flower | methods.

User mistakes (`FedpitError`) print one line and exit with status 2; `--debug` shows the
traceback. Everything that can fail on bad input is checked before a run directory exists.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from fedpit.errors import FedpitError


def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*generation flags are not valid.*")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _load_config(args: argparse.Namespace):
    from fedpit import config as config_mod
    from fedpit.methods import build_method

    config = config_mod.load(args.config, args.set)
    build_method(config)  # method options are checked before anything heavy happens
    return config


def cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fedpit.progress import RunProgress
    from fedpit.report import eval_rows, final_rows, write_report
    from fedpit.runs import RunDir, default_run_dir
    from fedpit.runtimes.local import open_run, prepare, run_experiment

    console = Console(stderr=True)
    if args.resume:
        if args.config or args.set or args.out:
            raise FedpitError("--resume takes the config and directory from the run; drop CONFIG, --set and --out")
        path = Path(args.resume)
        if not (path / "config.toml").is_file():
            raise FedpitError(f"'{path}' is not a run directory (no config.toml); pass the folder `fedpit run` made")
        if RunDir(path).read_status().get("status") == "complete":
            console.print(f"run '{path}' is already complete; nothing to resume")
            return 0
        config = _checked(RunDir(path).config)
    elif not args.config:
        raise FedpitError("give a CONFIG file (e.g. configs/demo.toml) or --resume RUN_DIR")
    else:
        config = _load_config(args)
    if args.runtime == "flower-sim":
        return _run_flower_sim(args, config, console)
    console.print(f"preparing: model {config.model.name}, data {config.data.source}")
    exp = prepare(config)
    sizes = {c: len(e) for c, e in exp.federation.clients.items()}
    console.print(f"federation: {len(sizes)} clients, sizes {sizes}; eval sets "
                f"{ {k: len(v) for k, v in exp.federation.eval_sets.items()} }")
    target = Path(args.resume) if args.resume else Path(args.out) if args.out else default_run_dir(config)
    run = open_run(exp, target, resume=bool(args.resume))
    start = time.perf_counter()
    try:
        with RunProgress(quiet=args.quiet, console=console) as progress:
            run_experiment(exp, run, progress)
    except KeyboardInterrupt:
        run.write_status("interrupted")
        raise
    except BaseException as exc:
        run.write_status("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    run.write_status("complete", seconds=round(time.perf_counter() - start, 1))
    report = write_report(run.path)
    table = Table(title=f"{config.method.name}: global model on held-out sets")
    for column in ("set", "round", "examples", "ROUGE-L", "NLL", "accuracy"):
        table.add_column(column)
    records = run.metrics()
    for name, rows in eval_rows(records).items():
        for row in (rows[0], rows[-1]) if len(rows) > 1 else rows:
            table.add_row(name, str(row["round"]), f"{row.get('n', 0):.0f}", f"{row['rougeL']:.4f}",
                          f"{row['nll']:.4f}", f"{row['accuracy']:.3f}" if "accuracy" in row else "")
    for row in final_rows(records):
        if row["model"] == "global":
            table.add_row(row["set"], "final", f"{row['n']:.0f}", f"{row['rougeL']:.4f}", f"{row['nll']:.4f}",
                          f"{row['accuracy']:.3f}" if "accuracy" in row else "")
    if table.row_count:
        console.print(table)
    console.print(f"run directory: {run.path}\nreport: {report}\n"
                  f"took {time.perf_counter() - start:.0f}s")
    return 0


def _run_flower_sim(args: argparse.Namespace, config, console) -> int:
    from fedpit.runs import default_run_dir
    from fedpit.runtimes.flower.simulation import run_simulation

    target = Path(args.resume) if args.resume else Path(args.out) if args.out else default_run_dir(config)
    console.print(f"running on Flower's simulation engine: {config.data.partition.num_clients} SuperNodes")
    start = time.perf_counter()
    path = run_simulation(config, target, resume=bool(args.resume))
    console.print(f"run directory: {path}\nreport: {path / 'report.md'}\ntook {time.perf_counter() - start:.0f}s")
    return 0


def cmd_flower(args: argparse.Namespace) -> int:
    """Start a SuperLink or a SuperNode (in the foreground, stopped with Ctrl-C), write the Flower
    App folder, register a SuperNode key, or submit a run and wait for it."""
    import subprocess

    from fedpit.runtimes.flower import deployment as dep

    home = Path(args.flwr_home).resolve()
    env = dep.flower_env(home)
    if args.action == "superlink":
        command = dep.superlink_command(args.port, Path(args.state_dir), args.host,
                                        Path(args.certs) if args.certs else None, args.auth)
    elif args.action == "supernode":
        root = Path(args.root_certificates) if args.root_certificates else None
        dep.check_superlink(args.superlink, root, must_answer=False)
        command = dep.supernode_command(args.superlink, args.port, Path(args.state_dir), client_id=args.client_id,
                                        data_file=args.data_file, partition_id=args.partition_id, host=args.host,
                                        root_certificates=Path(args.root_certificates) if args.root_certificates
                                        else None, auth_key=Path(args.auth_key) if args.auth_key else None)
    elif args.action == "app":
        print(dep.write_app(Path(args.app_dir)))
        return 0
    else:
        root = Path(args.root_certificates).resolve() if args.root_certificates else None
        dep.check_superlink(args.superlink, root)
        dep.write_connection(home, args.superlink, root)
        if args.action == "register":
            command = [dep._tool("flwr"), "supernode", "register", args.key, dep.CONNECTION]
        else:
            from fedpit import config as config_mod
            from fedpit.runtimes.flower.server_app import check_config

            if args.timeout <= 0:
                raise FedpitError(f"--timeout {args.timeout:g}: the seconds to wait for the run must be positive")
            config = _load_config(args)
            check_config(config)  # a bad config fails here, before anything is sent
            app = dep.write_app(home / "app")
            submitted = dep.write_submission(home, Path(args.run_dir), config_mod.dumps(config))
            command = dep.submit_command(app, submitted, Path(args.run_dir), args.clients, args.resume)
            received: list[int] = []  # `flwr run` streams the ServerApp's log, in a process group of its own
            timed_out: list[float] = []
            dep.run_foreground(command, env, timeout=args.timeout, received=received, timed_out=timed_out)
            if received:  # Ctrl-C or a service manager's SIGTERM: stop following the run, now
                print(f"stopped following the run; it goes on at the SuperLink until it ends (`flwr stop` ends it): "
                      f"{args.run_dir}", file=sys.stderr)
                return 128 + received[0]
            if timed_out:
                print(f"fedpit: no result after --timeout {args.timeout:g} s: {args.run_dir}", file=sys.stderr)
                return 1
            # `flwr run --stream` exits 0 even when the ServerApp failed: the run directory says how it ended.
            status = dep.wait_for_run(Path(args.run_dir), timeout=30)
            print(f"run {status['status']}: {args.run_dir}")
            return 0 if status["status"] == "complete" else 1
    print(" ".join(command), file=sys.stderr)
    if args.action == "supernode":  # SIGTERM / Ctrl-C reach every Flower process it starts
        return dep.run_foreground(command, env, diagnose=dep.diagnose_supernode(
            Path(args.auth_key) if args.auth_key else None))
    if args.action == "superlink":
        return dep.run_foreground(command, env)
    return subprocess.run(command, env=env, check=False).returncode


def _checked(load):
    """A stored config that the current code can no longer read refuses to resume, with the reason."""
    from fedpit.methods import build_method

    try:
        config = load()
        build_method(config)
    except FedpitError as exc:
        raise FedpitError(f"cannot resume: the run's config does not match this version of fedpit ({exc})") from None
    return config


def cmd_report(args: argparse.Namespace) -> int:
    from fedpit.report import write_report

    path = Path(args.run_dir)
    if not (path / "config.toml").is_file():
        raise FedpitError(f"'{path}' is not a run directory (no config.toml)")
    print(write_report(path))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from fedpit.data.federation import build_federation
    from fedpit.model import resolve_model_path

    config = _load_config(args)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(config.model.name, config.model.cache_dir))
    federation = build_federation(config, tokenizer)
    for key, value in federation.summary().items():
        print(f"{key}: {value}")
    if args.export:
        for path in export_clients(federation.clients, Path(args.export), config.data):
            print(f"wrote {path}")
    return 0


def export_clients(clients: dict, folder: Path, data) -> list[Path]:
    """Each client's examples as its own JSONL file (the fields `data.*_field` name), the file an
    institution's SuperNode reads with --data-file. Refuses to overwrite: these are someone's data."""
    import json

    from fedpit.runs import atomic_write_text

    targets = {client: folder / f"{client}.jsonl" for client in sorted(clients)}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing:
        raise FedpitError(f"{', '.join(existing)} already exist; export into an empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    for client, path in targets.items():
        lines = "".join(json.dumps({data.instruction_field: e.instruction, data.input_field: e.input,
                                    data.output_field: e.output}) + "\n" for e in clients[client])
        atomic_write_text(path, lines)
    return list(targets.values())


def cmd_attack(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fedpit.progress import RunProgress
    from fedpit.report import write_report
    from fedpit.runs import RunDir
    from fedpit.runtimes.attack import attack_run

    path = Path(args.run_dir)
    if not (path / "config.toml").is_file():
        raise FedpitError(f"'{path}' is not a run directory (no config.toml)")
    console = Console(stderr=True)
    targets = ["uploads" if t == "upload" else t for t in args.target]
    with RunProgress(quiet=args.quiet, console=console) as progress:
        records = attack_run(RunDir(path), args.round, targets, args.attacks, progress)
    keys = ["memorization_rougeL", "extraction_exact_rate", "mia_loss_auc", "mia_ref_auc",
            "canary_exposure_extrapolated"]
    table = Table(title=f"leakage after round {records[0]['round'] if records else '?'}")
    for column in ["target", "client", *keys]:
        table.add_column(column)
    for rec in records:
        figures = rec["figures"]
        table.add_row(rec["target"], rec["client"] or "", *(f"{figures[k]:.3f}" if k in figures else "–" for k in keys))
    console.print(table)
    console.print(f"report: {write_report(path)}")
    return 0


def _split_list(text: str, what: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise FedpitError(f"{what} is empty; give a comma-separated list")
    return items


def _run_rows(args: argparse.Namespace, rows: dict[str, list[str]], folder: str,
              reference: str | None = None) -> tuple[Path, dict[str, list[Path]], list[str]]:
    """Run every (row, seed) job with its extra overrides under --out (default runs/<config>-<folder>),
    skipping complete runs, and judge the answers when [eval.judge] is set. Every config, the
    reference and the judge endpoint are checked before any model is loaded. Returns the folder,
    label -> run directories (one per seed) and the judge requests that failed."""
    from rich.console import Console

    from fedpit import config as config_mod
    from fedpit.evaluation.judge import build_backend as build_judge
    from fedpit.judging import judge_groups
    from fedpit.methods import build_method
    from fedpit.progress import RunProgress
    from fedpit.runtimes.batch import Job, run_jobs

    seeds = [int(s) for s in _split_list(args.seeds, "--seeds")] if args.seeds else [None]
    jobs, groups = [], {}
    for label, extra in rows.items():
        for seed in seeds:
            overrides = [*args.set, *extra, *([f"seed={seed}"] if seed is not None else [])]
            config = config_mod.load(args.config, overrides)
            build_method(config)
            job_label = f"{label}-seed{config.seed}"
            jobs.append(Job(label=job_label, config=config))
            groups.setdefault(label, []).append(job_label)
    if reference is not None and reference not in groups:
        raise FedpitError(f"--reference '{reference}' is not one of the compared rows: {', '.join(groups)}")
    root = Path(args.out) if args.out else Path("runs") / f"{Path(args.config).stem}-{folder}"
    paths = {label: [root / j for j in labels] for label, labels in groups.items()}
    judge = jobs[0].config.eval.judge
    if judge.endpoint:
        build_judge(judge).preflight()  # a bad endpoint or key fails now, not after hours of training
    with RunProgress(quiet=args.quiet, console=Console(stderr=True)) as progress:
        run_jobs(jobs, root, progress)
        failures = judge_groups(paths, reference, judge, progress.phase) if judge.endpoint else []
    return root, paths, failures


def _judge_failures(failures: list[str]) -> None:
    if failures:
        raise FedpitError(f"{len(failures)} judge requests failed after retries ({failures[0]}); run the same "
                          f"command again: finished runs and received verdicts are kept, only the rest is asked")


def _batch(args: argparse.Namespace, rows: dict[str, list[str]], title: str, filename: str,
           x_values: dict[str, float] | None = None, reference: str | None = None) -> int:
    """Run the rows (`_run_rows`), then write the comparison page with every row's paired differences
    to `reference`."""
    from rich.console import Console

    from fedpit.comparison import write_comparison

    root, paths, failures = _run_rows(args, rows, filename.split(".")[0], reference)
    page = write_comparison(root, paths, title, filename, x_values, reference)
    Console(stderr=True).print(f"{filename}: {page}")
    _judge_failures(failures)
    return 0


def _variant(text: str) -> tuple[str, list[str]]:
    """`LABEL:KEY=VALUE[;KEY=VALUE...]`: a row of its own, the config with these overrides."""
    import re

    label, sep, body = text.partition(":")
    overrides = [o.strip() for o in body.split(";") if o.strip()]
    if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=-]*", label) or not overrides:
        raise FedpitError(f"--variant '{text}' must look like LABEL:KEY=VALUE[;KEY=VALUE...], e.g. "
                          f"\"beta0.75:method.name='fedpit';method.fedpit.beta=0.75\" (LABEL: letters, digits, .=_-)")
    return label, overrides


def cmd_compare(args: argparse.Namespace) -> int:
    methods = _split_list(args.methods, "--methods") if args.methods else []
    rows = {m: [f"method.name='{m}'"] for m in methods}
    for text in args.variant:
        label, overrides = _variant(text)
        if label in rows:
            raise FedpitError(f"--variant label '{label}' is already a row; choose another")
        rows[label] = overrides
    if not rows:
        raise FedpitError("nothing to compare: give --methods and/or --variant")
    if Path(args.page).name != args.page or not args.page.endswith(".md"):
        raise FedpitError(f"--page '{args.page}' must be a file name ending in .md (it is written in --out)")
    # the row everything is measured against: the first listed baseline unless named
    reference = args.reference or next((m for m in rows if m != "fedpit"), next(iter(rows)))
    return _batch(args, rows, f"comparison: {', '.join(rows)}", args.page, reference=reference)


def cmd_sweep(args: argparse.Namespace) -> int:
    values = _split_list(args.values, "--values")
    rows, xs = {}, {}
    for value in values:
        label = f"{args.param.split('.')[-1]}={value}"
        rows[label] = [f"{args.param}={value}"]
        try:
            xs[label] = float(value)
        except ValueError:
            xs[label] = float(len(xs))
    reference = f"{args.param.split('.')[-1]}={args.reference}" if args.reference else next(iter(rows))
    return _batch(args, rows, f"sweep of {args.param}", "sweep.md", xs, reference=reference)


def cmd_frontier(args: argparse.Namespace) -> int:
    """The built-in rows (or --rows of them) on identical clients and seeds; comparison.md with the
    paired differences to --reference, and frontier.md placing every row on utility vs leakage."""
    from rich.console import Console

    from fedpit.comparison import write_comparison
    from fedpit.frontier import ROWS, write_frontier

    labels = _split_list(args.rows, "--rows") if args.rows else list(ROWS)
    unknown = [label for label in labels if label not in ROWS]
    if unknown:
        raise FedpitError(f"--rows: unknown row(s) {', '.join(unknown)}; the rows are: {', '.join(ROWS)}")
    rows = {label: ROWS[label] for label in dict.fromkeys(labels)}
    root, paths, failures = _run_rows(args, rows, "frontier", args.reference)
    console = Console(stderr=True)
    comparison = write_comparison(root, paths, f"frontier rows against {args.reference}", "comparison.md",
                                  reference=args.reference)
    console.print(f"comparison.md: {comparison}\nfrontier.md: {write_frontier(root, paths, args.reference)}")
    _judge_failures(failures)
    return 0


def _judge_config(run_config, args: argparse.Namespace):
    """The run's [eval.judge] with the command line's choices on top, validated like any config (so a key
    given where its variable's name belongs, or a negative concurrency, is refused)."""
    from fedpit import config as config_mod

    changes = {f"eval.judge.{key}": getattr(args, key) for key in
               ("endpoint", "model", "api_key_env", "template", "max_concurrency") if getattr(args, key) is not None}
    judge = config_mod.replace(run_config, **changes).eval.judge
    if not judge.endpoint or not judge.model:
        raise FedpitError("no judge: give --endpoint URL and --model NAME (or set [eval.judge] endpoint and model in "
                          "the run's config)")
    return judge


def cmd_judge(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fedpit.judging import judge_run
    from fedpit.progress import RunProgress
    from fedpit.runs import RunDir

    for path in [args.run_dir, *([args.against] if args.against else [])]:
        if not (Path(path) / "config.toml").is_file():
            raise FedpitError(f"'{path}' is not a run directory (no config.toml)")
    judge = _judge_config(RunDir(Path(args.run_dir)).config(), args)
    console = Console(stderr=True)
    with RunProgress(quiet=args.quiet, console=console) as progress:
        results = judge_run(Path(args.run_dir), judge, args.round, args.set or None,
                            Path(args.against) if args.against else None, on_progress=progress.phase)
    table = Table(title=f"judge {judge.model}: {args.run_dir} against "
                        f"{args.against or 'the reference answers'} (both orders)")
    for column in ("set", "n", "win", "tie", "lose", "invalid", "Win+Tie [95% CI]", "win − lose [95% CI]"):
        table.add_column(column)
    failures = 0
    for result in results:
        counts = result.counts()
        table.add_row(result.set, str(len(result.verdicts)), *(str(counts[k]) for k in ("win", "tie", "lose",
                      "invalid")), result.win_tie().describe(), result.net().describe())
        failures += len(result.failures)
    console.print(table)
    console.print(f"new judge requests: {sum(r.requests for r in results)}; verdicts in {args.run_dir}/judge/")
    if failures:
        first = next(f for r in results for f in r.failures)
        raise FedpitError(f"{failures} judge requests failed after retries ({first}); run the same command again: "
                          f"the verdicts received are cached and only the missing ones are asked for")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from fedpit.serving import load_served_model, serve_forever

    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise FedpitError(f"--api-key-env names {args.api_key_env}, which is not set; export the key there")
    model = load_served_model(Path(args.target), base=args.base, dtype=args.dtype, template=args.template)
    serve_forever(model, host=args.host, port=args.port, api_key=key, model_name=args.model_name)
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fedpit.progress import RunProgress
    from fedpit.runtimes.diagnose import synthetic_quality

    path = Path(args.run_dir)
    if not (path / "config.toml").is_file():
        raise FedpitError(f"'{path}' is not a run directory (no config.toml)")
    console = Console(stderr=True)
    with RunProgress(quiet=args.quiet, console=console) as progress:
        figures = synthetic_quality(path, progress)

    def show(value) -> str:
        if isinstance(value, dict) and "mean" in value:
            return f"{value['mean']:.3f} [{value['low']:.3f}, {value['high']:.3f}] (n={value['n']})"
        if isinstance(value, dict):
            return ", ".join(f"{k} {v:g}" for k, v in value.items())
        if isinstance(value, float):
            return f"{value:.3f}"
        return str(value)

    table = Table(title=f"synthetic data of {path} (kept samples) vs the private data")
    table.add_column("figure")
    table.add_column("synthetic")
    table.add_column("private")
    for name in ("base_nll", "response_words", "distinct_2"):
        table.add_row(name, show(figures[f"{name}_synthetic"]), show(figures[f"{name}_private"]))
    for name in ("samples_passed", "samples_kept", "pass_rate", "filtered", "repeats_earlier_round",
                 "rouge_vs_private_mean", "rouge_vs_private_above_0.5"):
        table.add_row(name, show(figures[name]), "")
    console.print(table)
    console.print(f"written: {path / 'synthetic_quality.json'}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from fedpit.methods import METHODS

    for name in METHODS.names():
        doc = sys.modules[METHODS.get(name).__module__].__doc__ or ""
        first = " ".join(doc.strip().split("\n\n")[0].split())
        print(f"{name:12s} {first[:110]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedpit", description="Privacy-preserving few-shot federated instruction tuning"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", help="TOML config file, e.g. configs/demo.toml")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set federation.rounds=3 (repeatable)")

    run = sub.add_parser("run", help="run an experiment and write a run directory")
    run.add_argument("config", nargs="?", help="TOML config file, e.g. configs/demo.toml")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set federation.rounds=3 (repeatable)")
    run.add_argument("--out", help="run directory (default: runs/<name>-<method>-<time>)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped or killed run from its last checkpoint")
    run.add_argument("--runtime", choices=["local", "flower-sim"], default="local",
                     help="local: in-process simulator (default); flower-sim: Flower's simulation engine")
    run.add_argument("--quiet", action="store_true", help="log lines only, no progress bars")
    run.set_defaults(func=cmd_run)

    report = sub.add_parser("report", help="write report.md and plots for a run directory")
    report.add_argument("run_dir")
    report.set_defaults(func=cmd_report)

    data = sub.add_parser("data", help="build the federation of a config and print its summary")
    with_config(data)
    data.add_argument("--export", metavar="DIR", help="also write each client's examples to DIR/<client>.jsonl "
                      "(one institution's --data-file each)")
    data.set_defaults(func=cmd_data)

    compare = sub.add_parser("compare", help="run several methods on identical clients and seeds; comparison.md")
    with_config(compare)
    compare.add_argument("--methods", default="", help="comma-separated, e.g. fedpit,fedavg")
    compare.add_argument("--variant", action="append", default=[], metavar="LABEL:KEY=VALUE[;KEY=VALUE]",
                         help="a further row: the config with these overrides, e.g. "
                              "\"beta0.75:method.name='fedpit';method.fedpit.beta=0.75\" (repeatable)")
    compare.add_argument("--page", default="comparison.md", help="file name of the comparison page")
    compare.add_argument("--seeds", default="", help="comma-separated seeds, e.g. 0,1,2 (default: the config's)")
    compare.add_argument("--out", help="comparison folder (default: runs/<config>-comparison)")
    compare.add_argument("--reference", help="method every other is paired with (default: the first listed "
                         "method other than fedpit)")
    compare.add_argument("--quiet", action="store_true")
    compare.set_defaults(func=cmd_compare)

    sweep = sub.add_parser("sweep", help="run one config over values of a key (e.g. method.beta); sweep.md")
    with_config(sweep)
    sweep.add_argument("--param", required=True, help="dotted config key, e.g. method.beta")
    sweep.add_argument("--values", required=True, help="comma-separated values, e.g. 0,0.3,0.5,0.7,1")
    sweep.add_argument("--seeds", default="")
    sweep.add_argument("--out", help="sweep folder (default: runs/<config>-sweep)")
    sweep.add_argument("--reference", help="value every other is paired with (default: the first)")
    sweep.add_argument("--quiet", action="store_true")
    sweep.set_defaults(func=cmd_sweep)

    frontier = sub.add_parser("frontier", help="FedPIT vs FedAvg+DP vs training less on identical clients and seeds: "
                              "utility vs leakage; frontier.md")
    with_config(frontier)
    frontier.add_argument("--rows", default="", help="comma-separated labels of built-in rows to run, e.g. "
                          "fedavg,fedpit-beta0.5 (default: all; fedpit.frontier.ROWS, an unknown label lists them)")
    frontier.add_argument("--seeds", default="", help="comma-separated seeds, e.g. 0,1 (default: the config's)")
    frontier.add_argument("--reference", default="fedavg", help="row every other is paired with (default: fedavg)")
    frontier.add_argument("--out", help="frontier folder (default: runs/<config>-frontier)")
    frontier.add_argument("--quiet", action="store_true")
    frontier.set_defaults(func=cmd_frontier)

    attack = sub.add_parser("attack", help="measure leakage of a finished run (global model, uploads, private)")
    attack.add_argument("run_dir")
    attack.add_argument("--round", type=int, default=None, help="round to attack (default: the last checkpoint)")
    attack.add_argument("--target", nargs="+", default=["global"], choices=["global", "uploads", "upload", "private"])
    attack.add_argument("--attacks", nargs="+", default=None, choices=["memorization", "membership", "canary"])
    attack.add_argument("--quiet", action="store_true")
    attack.set_defaults(func=cmd_attack)

    flower = sub.add_parser("flower", help="run a real federation on Flower: superlink | supernode | submit | ...")
    flower.add_argument("--flwr-home", default=".flwr", help="Flower's home folder (connections, installed apps)")
    actions = flower.add_subparsers(dest="action", required=True)
    link = actions.add_parser("superlink", help="start the SuperLink (the server's endpoint)")
    link.add_argument("--port", type=int, default=9091)
    link.add_argument("--host", default="0.0.0.0")
    link.add_argument("--state-dir", default=".flwr/superlink")
    link.add_argument("--certs", help="folder with ca.crt, server.pem, server.key (scripts/make-certs.sh)")
    link.add_argument("--auth", action="store_true", help="admit only registered SuperNodes (needs --certs)")
    node = actions.add_parser("supernode", help="start one institution's SuperNode")
    node.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    node.add_argument("--port", type=int, default=9094, help="this SuperNode's local port (one per node and machine)")
    node.add_argument("--host", default="127.0.0.1")
    node.add_argument("--state-dir", required=True, help="where this client keeps its private state")
    node.add_argument("--client-id", default="", help="the client's name (default: the data file's name)")
    node.add_argument("--data-file", default="", help="this institution's own JSON/JSONL examples")
    node.add_argument("--partition-id", type=int, default=None, help="instead: client N of the config's federation")
    node.add_argument("--root-certificates", help="CA certificate to trust the SuperLink (TLS)")
    node.add_argument("--auth-key", help="private key registered with `fedpit flower register`")
    app = actions.add_parser("app", help="write the Flower App folder that `flwr run` packages")
    app.add_argument("app_dir")
    register = actions.add_parser("register", help="register a SuperNode's public key with an --auth SuperLink")
    register.add_argument("key", help="public key file (ssh-keygen -t ecdsa -b 384)")
    register.add_argument("--superlink", required=True)
    register.add_argument("--root-certificates", required=True)
    submit = actions.add_parser("submit", help="submit an experiment to a SuperLink and wait for it")
    with_config(submit)
    submit.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    submit.add_argument("--run-dir", required=True, help="run directory, written on the server's machine")
    submit.add_argument("--clients", type=int, default=0, help="SuperNodes to wait for (default: the config's)")
    submit.add_argument("--resume", action="store_true", help="continue --run-dir from its last checkpoint")
    submit.add_argument("--root-certificates", help="CA certificate to trust the SuperLink (TLS)")
    submit.add_argument("--timeout", type=float, default=7 * 24 * 3600, help="seconds to wait for the run")
    flower.set_defaults(func=cmd_flower)

    judge = sub.add_parser("judge", help="LLM judge (both orders, Win/Tie/Lose) of a run's saved answers")
    judge.add_argument("run_dir")
    judge.add_argument("--against", metavar="RUN_B", help="head to head against another run's answers "
                       "(default: against each set's reference answers)")
    judge.add_argument("--round", type=int, default=None, help="a per-round evaluation (default: the final one)")
    judge.add_argument("--set", action="append", default=[], metavar="SET", help="evaluation set (repeatable; "
                       "default: all)")
    judge.add_argument("--endpoint", help="OpenAI-compatible base URL (default: the run's eval.judge.endpoint)")
    judge.add_argument("--model", help="judge model name (default: eval.judge.model)")
    judge.add_argument("--api-key-env", help="name of the environment variable holding the key ('' for none)")
    judge.add_argument("--template", help="built-in template name or file (default: eval.judge.template)")
    judge.add_argument("--max-concurrency", type=int, help="parallel requests (default: eval.judge.max_concurrency)")
    judge.add_argument("--quiet", action="store_true")
    judge.set_defaults(func=cmd_judge)

    serve = sub.add_parser("serve", help="serve a run's (or an adapter's) tuned model over the OpenAI chat API")
    serve.add_argument("target", help="run directory or PEFT adapter folder")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--base", help="base model of a bare adapter (default: from adapter_config.json)")
    serve.add_argument("--dtype", choices=["bf16", "fp32", "fp16", "auto"], help="default: the run's model.dtype")
    serve.add_argument("--template", choices=["chat", "alpaca"], help="prompt template (default: the run's)")
    serve.add_argument("--model-name", default="fedpit", help="the model id clients ask for")
    serve.add_argument("--api-key-env", default="", help="require 'Authorization: Bearer <key>' with the key from "
                       "this environment variable")
    serve.set_defaults(func=cmd_serve)

    diagnose = sub.add_parser("diagnose", help="quality of a run's synthetic data next to its private data")
    diagnose.add_argument("run_dir")
    diagnose.add_argument("--quiet", action="store_true")
    diagnose.set_defaults(func=cmd_diagnose)

    methods = sub.add_parser("methods", help="list registered methods")
    methods.set_defaults(func=cmd_methods)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    _quiet_libraries()
    try:
        return args.func(args)
    except FedpitError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
