"""The local Prometheus: Debian's ``prometheus`` binary, run by us with our own configuration.

The configuration is ``ops/prometheus/prometheus.yml`` (a template whose targets are the default
ports) rendered with the ports the stack really uses, jobs of services it does not run dropped, and
the rules of ``ops/prometheus/rules/`` loaded from where they are (so the rules that are tested are
the rules that run). Data, the rendered ``prometheus.yml`` and the log live under the stack's home
(``$MLPIPE_HOME/prometheus/``); it listens on 127.0.0.1 only. The Debian package's own service is
never used (``.ci/ensure-prometheus`` installs the package without starting it).

    mlpipe prometheus serve --dir DIR --port 9090 --target consumer=127.0.0.1:9108 ...
    mlpipe prometheus check          # promtool: check config, check rules, test rules
    mlpipe prometheus render --dir DIR --target ...   # write the configuration only

``serve`` renders the configuration and then becomes the ``prometheus`` process (exec): the PID the
stack records is Prometheus itself, stopped with SIGTERM like every service.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

from tasks.config import PROJECT_ROOT
from tasks.contracts.files import atomic_write
from tasks.local.procs import LOOPBACK

OPS_DIR = PROJECT_ROOT / "ops" / "prometheus"
TEMPLATE = OPS_DIR / "prometheus.yml"
RULES_DIR = OPS_DIR / "rules"
RULE_TESTS_DIR = OPS_DIR / "tests"
#: the scrape jobs of the template, one per service (``prometheus`` scrapes itself)
JOBS = ("prometheus", "consumer", "gateway", "triton", "exporter")
INSTALL_HINT = ("install Debian's package with `bash .ci/ensure-prometheus` (as root: apt-get install -y "
                "--no-install-recommends prometheus) or set MLPIPE_PROMETHEUS_BIN to a prometheus binary")


class PrometheusMissing(RuntimeError):
    """No ``prometheus`` / ``promtool`` binary: the message says how to install one."""


def prometheus_binary() -> Path:
    """``MLPIPE_PROMETHEUS_BIN`` or ``prometheus`` on PATH; ``PrometheusMissing`` otherwise."""
    from tasks.config import load_settings

    override = load_settings().local.prometheus_bin
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise PrometheusMissing(f"MLPIPE_PROMETHEUS_BIN={override} is not an executable file")
        return path
    found = shutil.which("prometheus")
    if not found:
        raise PrometheusMissing(f"no prometheus binary on PATH: {INSTALL_HINT}")
    return Path(found)


def promtool_binary() -> Path:
    """``promtool`` beside the prometheus binary, else on PATH; ``PrometheusMissing`` otherwise."""
    try:
        beside = prometheus_binary().parent / "promtool"
        if beside.is_file() and os.access(beside, os.X_OK):
            return beside
    except PrometheusMissing:
        pass
    found = shutil.which("promtool")
    if not found:
        raise PrometheusMissing(f"no promtool binary on PATH: {INSTALL_HINT}")
    return Path(found)


def available() -> str | None:
    """None when prometheus can run here; else why not (with the fix)."""
    try:
        prometheus_binary()
        return None
    except PrometheusMissing as exc:
        return str(exc)


def render_config(targets: Mapping[str, str], *, rules_dir: Path = RULES_DIR, template: Path = TEMPLATE,
                  scrape_interval: str | None = None, evaluation_interval: str | None = None,
                  external_labels: Mapping[str, str] | None = None) -> str:
    """The template with each job's targets set to ``targets[job]`` (``host:port``); jobs without a target
    are dropped, a target whose job the template lacks is an error (a typo must not go unscraped)."""
    import yaml

    config = yaml.safe_load(template.read_text())
    jobs = {job["job_name"]: job for job in config.get("scrape_configs", [])}
    unknown = sorted(set(targets) - set(jobs))
    if unknown:
        raise ValueError(f"no scrape job {', '.join(unknown)} in {template}: jobs are {', '.join(jobs)}")
    config["scrape_configs"] = []
    for name, job in jobs.items():
        if name in targets:
            # no extra target label: ``service`` is a label of the exporter's own series
            job["static_configs"] = [{"targets": [targets[name]]}]
            config["scrape_configs"].append(job)
    config["rule_files"] = [str(Path(rules_dir).resolve() / "*.yml")]
    glob = config.setdefault("global", {})
    if scrape_interval:
        glob["scrape_interval"] = scrape_interval
        if _seconds(scrape_interval) < _seconds(glob.get("scrape_timeout", "10s")):
            glob["scrape_timeout"] = scrape_interval  # Prometheus refuses a timeout longer than the interval
    if evaluation_interval:
        glob["evaluation_interval"] = evaluation_interval
    if external_labels:
        glob.setdefault("external_labels", {}).update(external_labels)
    header = f"# rendered from {template} by tasks/local/prometheus.py: edit the template, not this file\n"
    return header + yaml.safe_dump(config, sort_keys=False)


def _seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for unit in ("ms", "s", "m", "h"):
        if text.endswith(unit) and text[:-len(unit)].replace(".", "", 1).isdigit():
            return float(text[:-len(unit)]) * units[unit]
    raise ValueError(f"not a duration: {text!r} (use e.g. 15s, 1m)")


def write_config(folder: Path, targets: Mapping[str, str], **kw: object) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "prometheus.yml"
    atomic_write(path, render_config(targets, **kw), mode=0o644)  # type: ignore[arg-type]
    return path


def command(folder: Path, port: int, config: Path, retention: str = "7d") -> list[str]:
    """The ``prometheus`` command line: loopback only, data under ``folder/data``."""
    return [str(prometheus_binary()), f"--config.file={config}", f"--storage.tsdb.path={Path(folder) / 'data'}",
            f"--storage.tsdb.retention.time={retention}", f"--web.listen-address={LOOPBACK}:{port}",
            "--log.level=info"]


def check(promtool: Path | None = None, rules_dir: Path = RULES_DIR, tests_dir: Path = RULE_TESTS_DIR,
          config: Path = TEMPLATE) -> list[tuple[str, subprocess.CompletedProcess]]:
    """``promtool check config``, ``check rules`` and ``test rules``: (what, result) of each."""
    tool = str(promtool or promtool_binary())
    rules = sorted(str(p) for p in Path(rules_dir).glob("*.yml"))
    tests = sorted(str(p) for p in Path(tests_dir).glob("*.yml"))
    runs = [("check config", [tool, "check", "config", str(config)]),
            ("check rules", [tool, "check", "rules", *rules]),
            ("test rules", [tool, "test", "rules", *tests])]
    return [(what, subprocess.run(argv, capture_output=True, text=True, timeout=120)) for what, argv in runs]


def _targets(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        job, sep, addr = item.partition("=")
        if not sep or not job or ":" not in addr:
            raise ValueError(f"--target {item!r}: use JOB=HOST:PORT (jobs: {', '.join(JOBS)})")
        out[job] = addr
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlpipe prometheus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("serve", "render"):
        p = sub.add_parser(name, help="render the configuration and run prometheus" if name == "serve"
                           else "render the configuration only")
        p.add_argument("--dir", type=Path, required=True, help="folder for prometheus.yml and data/")
        p.add_argument("--port", type=int, default=None, help="listen port on 127.0.0.1 (MLPIPE_PROMETHEUS_PORT)")
        p.add_argument("--target", action="append", default=[], help=f"JOB=HOST:PORT; jobs: {', '.join(JOBS)} "
                       "(prometheus scrapes itself on --port unless given)")
        p.add_argument("--scrape-interval", default=None, help="e.g. 15s (the template's by default)")
        p.add_argument("--evaluation-interval", default=None, help="e.g. 15s (the template's by default)")
        p.add_argument("--retention", default="7d", help="how long samples are kept")
    sub.add_parser("check", help="promtool check config + check rules + test rules on ops/prometheus")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "check":
            failed = False
            for what, res in check():
                print(f"== promtool {what}: {'ok' if res.returncode == 0 else 'FAILED'}")
                print((res.stdout + res.stderr).strip())
                failed = failed or res.returncode != 0
            return 1 if failed else 0
        from tasks.config import load_settings

        port = args.port or load_settings().local.prometheus_port
        targets = {"prometheus": f"{LOOPBACK}:{port}", **_targets(args.target)}
        config = write_config(args.dir, targets, scrape_interval=args.scrape_interval,
                              evaluation_interval=args.evaluation_interval)
        if args.cmd == "render":
            print(config)
            return 0
        argv_ = command(args.dir, port, config, args.retention)
        sys.stdout.flush()
        os.execv(argv_[0], argv_)  # becomes prometheus: the stack's PID is the server's
    except (PrometheusMissing, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0  # pragma: no cover - execv does not return


if __name__ == "__main__":
    sys.exit(main())
