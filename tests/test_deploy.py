"""deploy/ checked by the real tools: promtool, a real Prometheus scraping a real daemon, the sd_notify
socket, systemd-analyze, and (where installed) hadolint, docker-compose, kubernetes-validate, kubectl."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from rnnlm.cli import serve as serve_command
from rnnlm.clients.client import Client
from rnnlm.daemon import systemd
from rnnlm.daemon.fleet import Fleet, Member
from tests.daemon_helpers import Daemon
from tests.test_model import toy_text

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
RULES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
RULE_TESTS = sorted((DEPLOY / "prometheus" / "tests").glob("*.test.yml"))
SERVE_OPTIONS = {opt for param in serve_command.params for opt in param.opts}
# The adaptation guard's counters (RnnlmAdaptationHurting), which the rules may name before it lands.
NOT_YET_EXPORTED = {"rnnlm_base_loss_nats_total", "rnnlm_base_tokens_total", "rnnlm_sampled_loss_nats_total",
                    "rnnlm_sampled_tokens_total"}


def tool(name: str, required: bool = True) -> str:
    """A command from PATH or beside this Python (the venv's bin/, not always on PATH)."""
    path = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if path:
        return path
    if required:
        pytest.fail(f"{name} is missing: .ci/run installs it")
    pytest.skip(f"{name} is not installed here")


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60, **kwargs)


def load_yaml_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, model_path):
    tmp = tmp_path_factory.mktemp("daemon")
    with Daemon(tmp, model_path) as d:
        yield d
        assert d.stop() == 0, d.output()


# --- Prometheus: config, rules, rule unit tests ------------------------------------------------------

def test_promtool_accepts_the_rules_and_their_unit_tests():
    promtool = tool("promtool")
    result = run(promtool, "check", "rules", *RULES)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr
    assert [p.name for p in RULE_TESTS] == ["alerts.test.yml", "fleet.test.yml"]
    result = run(promtool, "test", "rules", *RULE_TESTS)
    assert result.returncode == 0 and result.stdout.count("SUCCESS") == len(RULE_TESTS), result.stdout + result.stderr


def test_every_alert_has_cases_that_must_fire_and_must_not():
    alerts = {r["alert"] for f in RULES for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"] if "alert" in r}
    units = [yaml.safe_load(path.read_text()) for path in RULE_TESTS]
    cases = [c for unit in units for t in unit["tests"] for c in t.get("alert_rule_test", [])]
    fires = {c["alertname"] for c in cases if c["exp_alerts"]}
    quiet = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert alerts == fires == quiet, (alerts, fires, quiet)


def test_promtool_accepts_the_scrape_configs(tmp_path):
    promtool = tool("promtool")
    result = run(promtool, "check", "config", DEPLOY / "prometheus" / "prometheus.yml")
    assert result.returncode == 0 and f"{len(RULES)} rule files found" in result.stdout, result.stdout + result.stderr
    # The compose stack's config, checked where the compose file mounts it.
    root = materialize_mounts(compose()["services"]["prometheus"], tmp_path)
    result = run(promtool, "check", "config", root / "etc/prometheus/prometheus.yml")
    assert result.returncode == 0 and f"{len(RULES)} rule files found" in result.stdout, result.stdout + result.stderr


def test_the_rules_and_dashboard_name_only_metrics_the_daemon_exports(daemon):
    # Every family is declared by a TYPE line, also before its first labelled sample exists.
    families = dict(line.split()[2:4] for line in daemon.scrape().splitlines() if line.startswith("# TYPE "))
    suffixes = {"histogram": ["_bucket", "_count", "_sum"], "summary": ["", "_count", "_sum"]}
    exported = {name + s for name, kind in families.items() for s in suffixes.get(kind, [""])}
    recorded = {r["record"] for f in RULES for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"] if "record" in r}
    expressions = [r["expr"] for f in RULES for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]]
    expressions += [e for _, e in dashboard_expressions()]
    named = {m for e in expressions for m in re.findall(r"\b(?:[a-z_]+:)?rnnlm_\w+(?::\w+)?", e)}
    unknown = named - exported - recorded - NOT_YET_EXPORTED
    assert not unknown, f"not exported by the daemon nor recorded: {sorted(unknown)}"


# --- Prometheus end to end: a real server scraping a real daemon -------------------------------------

class PrometheusServer:
    """Debian's `prometheus` as a child process on a free loopback port with its own storage."""

    def __init__(self, tmp: Path, config: dict):
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(tmp / "prometheus.log", "w+")
        self.proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.ready(), 30, lambda: f"prometheus did not start:\n{self.output()}")

    def ready(self) -> bool:
        assert self.proc.poll() is None, self.output()
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def api(self, path: str, **params) -> dict:
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}", timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def value(self, expr: str) -> float | None:
        """The single sample `expr` evaluates to now, or None."""
        result = self.api("query", query=expr)["result"]
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def alerts(self, name: str, **labels) -> list[str]:
        """States (pending, firing) of the active alerts named `name` with these labels."""
        return [a["state"] for a in self.api("alerts")["alerts"]
                if a["labels"]["alertname"] == name and all(a["labels"].get(k) == v for k, v in labels.items())]

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, message=lambda: "timed out", every: float = 0.2):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(message())
        time.sleep(every)


def e2e_config(daemon: Daemon, rule_files: list[Path]) -> dict:
    """deploy/'s scrape config pointed at the test daemon, scraping and evaluating every second."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(p) for p in rule_files]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "rnnlm"
    job["static_configs"] = [{"targets": [urllib.parse.urlparse(daemon.metrics_url).netloc]}]
    return config


def test_prometheus_records_the_windowed_perplexity_the_daemon_reports(tmp_path, daemon):
    """The recorded 1m/5m/1h perplexity of a burst of text equals exp(Δloss / Δtokens) of the
    daemon's own counters over that burst, to 1e-6 relative.

    Why so tight: the text format carries the counters' floats exactly, and both counters come
    from the same scrapes, so rate()'s extrapolation multiplies loss and tokens by the same factor,
    which cancels in the ratio; what is left is float64 rounding. Two conditions make the window
    hold exactly the burst: it is quiet before and after (a scrape sees the counters still), and
    the domain's counters are born by one message A (a single scrape cannot catch it half done)
    whose size is comparable to the burst's, so rate()'s limit on extrapolating below zero does
    not bind differently for the two counters."""
    domain = {"domain": "e2e"}
    with PrometheusServer(tmp_path, e2e_config(daemon, RULES)) as prom, Client(daemon.endpoint) as client:
        client.score("\n".join(toy_text(100, seed=11)), stream="e2e-a", **domain)
        loss0, tokens0 = daemon.metric("rnnlm_loss_nats_total", **domain), daemon.metric("rnnlm_tokens_total", **domain)
        wait_for(lambda: (prom.value('rnnlm_loss_nats_total{domain="e2e"}'),
                          prom.value('rnnlm_tokens_total{domain="e2e"}')) == (loss0, tokens0), 20, prom.output)
        replies = list(client.pipeline(({"op": "score", "stream": "e2e", "text": line, **domain}
                                        for line in toy_text(100, seed=12)), window=16))
        loss1, tokens1 = daemon.metric("rnnlm_loss_nats_total", **domain), daemon.metric("rnnlm_tokens_total", **domain)
        assert tokens1 - tokens0 == sum(r["tokens"] for r in replies)
        assert loss1 - loss0 == pytest.approx(sum(r["loss"] for r in replies), rel=1e-9)

        # Wait for a scrape that saw the end of the burst, then for an evaluation well after it.
        wait_for(lambda: prom.value('rnnlm_tokens_total{domain="e2e"}') == tokens1, 20, prom.output)
        seen = prom.value('timestamp(rnnlm_tokens_total{domain="e2e"})')
        for window in ("1m", "5m", "1h"):
            wait_for(lambda: (prom.value(f'timestamp(domain:rnnlm_perplexity:rate{window}{{domain="e2e"}})') or 0) >= seen + 1.5,
                     20, prom.output)
        expected = math.exp((loss1 - loss0) / (tokens1 - tokens0))
        for window in ("1m", "5m", "1h"):
            recorded = prom.value(f'domain:rnnlm_perplexity:rate{window}{{domain="e2e", job="rnnlm"}}')
            assert recorded == pytest.approx(expected, rel=1e-6), (window, recorded, expected)
        # Nothing is wrong, so nothing fires.
        firing = [a["labels"]["alertname"] for a in prom.api("alerts")["alerts"] if a["state"] == "firing"]
        assert not firing, firing


# The same rules with windows and `for:` scaled from minutes and hours to seconds.
FAST_WINDOWS = {"1m": "3s", "5m": "5s", "1h": "40s", "10m": "10s", "15m": "15s", "30m": "30s"}


def fast_rules(tmp: Path) -> list[Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    out = []
    for path in RULES:
        lines = []
        for line in path.read_text().splitlines():
            if not line.lstrip().startswith("#"):
                line = re.sub(r"\[(\w+)\]", lambda m: f"[{FAST_WINDOWS[m.group(1)]}]", line)
                line = re.sub(r"^(\s+for: )\w+$", r"\g<1>2s", line)
            lines.append(line)
        (tmp / path.name).write_text("\n".join(lines) + "\n")
        out.append(tmp / path.name)
    return out


def test_the_regression_alert_fires_when_the_text_turns_to_garbage(tmp_path, daemon):
    """In-domain text for a while: RnnlmPerplexityRegression stays quiet. Then word salad (the same
    words in random order, perplexity ~100 against ~2): it fires. Windows are scaled to seconds
    (5m -> 5s, 1h -> 40s, for: 2s); the expressions are deploy/'s."""
    rng = np.random.default_rng(1)
    words = sorted({w for line in toy_text(400) for w in line.split()})
    salad = [" ".join(rng.choice(words, 4)) for _ in range(5000)]
    text = toy_text(5000, seed=21)
    domain = {"domain": "reg"}

    def send(lines):
        for reply in client.pipeline(({"op": "score", "stream": "reg", "text": line, **domain} for line in lines), window=16):
            assert reply["ok"], reply

    with PrometheusServer(tmp_path / "prom", e2e_config(daemon, fast_rules(tmp_path / "rules"))) as prom, \
            Client(daemon.endpoint) as client:
        start = time.monotonic()
        i = 0
        while time.monotonic() - start < 8:
            send(text[i:i + 20])
            i += 20
            time.sleep(0.05)
            if time.monotonic() - start > 4:
                assert not prom.alerts("RnnlmPerplexityRegression", **domain), "fired on in-domain text"
        assert prom.value('domain:rnnlm_perplexity:rate5m{domain="reg"}') is not None, "the rules saw the traffic"

        start, i = time.monotonic(), 0
        while "firing" not in prom.alerts("RnnlmPerplexityRegression", **domain):
            assert time.monotonic() - start < 30, f"did not fire:\n{prom.api('alerts')}\n{prom.output()}"
            send(salad[i:i + 20])
            i += 20
            time.sleep(0.05)


# --- Grafana -----------------------------------------------------------------------------------------

GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$job": ".*", "$domain": ".*"}


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "rnnlm.json").read_text())


def dashboard_expressions() -> list[tuple[str, str]]:
    exprs = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(var, value)
            exprs.append((f"{panel['title']} / {target['refId']}", expr))
    return exprs


def test_the_dashboard_is_well_formed_and_promtool_parses_every_query(tmp_path):
    board = dashboard()
    assert board["uid"] == "rnnlm" and board["title"] and isinstance(board["schemaVersion"], int)
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "job", "domain"} <= variables
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids are unique"
    for p in panels:
        grid = p["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, p["title"]
        if p["type"] == "row":  # a heading across the board; the panels below it are its own
            assert grid["w"] == 24 and "targets" not in p, p["title"]
            continue
        assert p["targets"] and all(t["expr"].strip() and t["refId"] for t in p["targets"]), p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert not re.search(r"\$(?!__rate_interval|job|domain)\w+", " ".join(t["expr"] for t in p["targets"])), p["title"]
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("running perplexity", "windowed perplexity", "tokens / s", "p50 / p99", "update outcomes",
                  "oov", "streams", "checkpoint age"):
        assert topic in titles, topic
    # The fleet's row, and below it load, domains, handoffs and their wait, per member.
    (row,) = [p for p in panels if p["type"] == "row" and p["title"] == "Fleet"]
    below = " ".join(p["title"].lower() for p in panels if p["gridPos"]["y"] > row["gridPos"]["y"])
    for topic in ("load per member", "domains owned per member", "handoffs", "handoff wait p50 / p99"):
        assert topic in below, topic
    # Every query, as promtool sees it: each expression becomes a recording rule.
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query_{i}", "expr": e}
                                                        for i, (_, e) in enumerate(dashboard_expressions())]}]}
    (tmp_path / "dashboard-queries.yml").write_text(yaml.safe_dump(rules))
    result = run(tool("promtool"), "check", "rules", tmp_path / "dashboard-queries.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_points_at_the_compose_services():
    (source,) = load_yaml_docs(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")[0]["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"]
    stack = compose()["services"]
    host, port = urllib.parse.urlparse(source["url"]).netloc.split(":")
    assert host == "prometheus" and host in stack and port == "9090"  # the service, on Prometheus' default port
    (provider,) = load_yaml_docs(DEPLOY / "grafana" / "provisioning" / "dashboards" / "rnnlm.yml")[0]["providers"]
    mounts = dict(bind_mounts(stack["grafana"]))
    assert mounts[provider["options"]["path"]] == DEPLOY / "grafana" / "dashboards"
    assert mounts["/etc/grafana/provisioning"] == DEPLOY / "grafana" / "provisioning"


# --- systemd: the unit, and the notify protocol with a real socket -------------------------------

def unit_settings() -> dict[str, str]:
    text = (DEPLOY / "systemd" / "rnnlm.service").read_text().replace("\\\n", " ")
    return {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in text.splitlines())
            if v and not k.startswith(("#", "["))}


def test_systemd_analyze_verifies_the_unit(tmp_path):
    """`systemd-analyze verify` with --root: the unit in a scratch root that holds systemd's own
    units and a stand-in for ExecStart's binary (verify checks that it exists and is executable)."""
    analyze = tool("systemd-analyze")
    settings = unit_settings()
    exec_start = settings["ExecStart"].split()
    shutil.copytree("/usr/lib/systemd/system", tmp_path / "usr/lib/systemd/system", symlinks=True)
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(DEPLOY / "systemd" / "rnnlm.service", tmp_path / "etc/systemd/system/rnnlm.service")
    binary = tmp_path / exec_start[0].lstrip("/")
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    result = run(analyze, "verify", f"--root={tmp_path}", "/etc/systemd/system/rnnlm.service")
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr
    # systemd's own score of the hardening: 0 (locked down) to 10 (exposed); 2.5 or less.
    result = run(analyze, "security", "--offline=yes", "--threshold=25", f"--root={tmp_path}",
                 "/etc/systemd/system/rnnlm.service")
    assert result.returncode == 0, result.stdout[-600:] + result.stderr
    # What the unit promises the daemon does.
    assert settings["Type"] == "notify" and settings["Restart"] == "on-failure" and settings["StateDirectory"] == "rnnlm"
    assert int(settings["TimeoutStopSec"].rstrip("s")) >= 120 and settings["WatchdogSec"]
    assert exec_start[1] == "serve" and "--state-dir" in exec_start and exec_start[exec_start.index("--state-dir") + 1] == "/var/lib/rnnlm"
    assert {a for a in exec_start if a.startswith("--")} <= SERVE_OPTIONS
    # numba refuses to start without a writable cache, and the install tree is read-only here.
    text = (DEPLOY / "systemd" / "rnnlm.service").read_text()
    assert "CacheDirectory=rnnlm" in text and "Environment=NUMBA_CACHE_DIR=/var/cache/rnnlm" in text


def listen_datagram(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(30)
    return sock


def test_the_daemon_tells_systemd_ready_watchdog_and_stopping(tmp_path, model_path):
    """A real `rnnlm serve` with NOTIFY_SOCKET at a datagram socket this test binds, as systemd would."""
    path, port_file, state = tmp_path / "notify.sock", tmp_path / "ports.json", tmp_path / "state"
    env = {**os.environ, "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"}  # ping every 0.2 s
    with listen_datagram(str(path)) as sock, open(tmp_path / "daemon.log", "w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rnnlm.cli", "serve", "--model", str(model_path),
                                 "--bind", "tcp://127.0.0.1:0", "--metrics-addr", "127.0.0.1:0",
                                 "--port-file", str(port_file), "--state-dir", str(state)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            assert sock.recv(4096) == b"READY=1"
            # READY means serving: the sockets are bound and both endpoints answer at once.
            ports = json.loads(port_file.read_text())
            with Client(ports["endpoint"], timeout=5) as client:
                assert client.ping()["pong"]
            with urllib.request.urlopen(ports["metrics"], timeout=5) as response:
                assert b"rnnlm_model_info" in response.read()
            assert [sock.recv(4096) for _ in range(3)] == [b"WATCHDOG=1"] * 3
            proc.send_signal(signal.SIGTERM)
            while (message := sock.recv(4096)) == b"WATCHDOG=1":
                pass
            assert message == b"STOPPING=1"
            assert proc.wait(60) == 0
        finally:
            proc.kill() if proc.poll() is None else None
        assert list(state.glob("state-*.pt")), "the final checkpoint came after STOPPING=1"


def test_notify_speaks_to_abstract_sockets_and_is_a_no_op_without_systemd(monkeypatch):
    name = f"rnnlm-test-{os.getpid()}"
    with listen_datagram("\0" + name) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("STATUS=testing") is True
        assert sock.recv(4096) == b"STATUS=testing"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify.sock")
    assert systemd.notify("READY=1") is False, "a missing socket is not an error"
    # The watchdog interval is half of WATCHDOG_USEC, and only for the process systemd watches.
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert systemd.Watchdog().interval == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert not systemd.Watchdog().enabled
    monkeypatch.delenv("WATCHDOG_PID")
    monkeypatch.delenv("WATCHDOG_USEC")
    assert not systemd.Watchdog().enabled and systemd.Watchdog().ping() is False


def test_the_healthcheck_pings_through_the_main_loop(daemon):
    script = DEPLOY / "healthcheck.py"
    assert run(sys.executable, script, "--endpoint", daemon.endpoint, "--timeout", "10").returncode == 0
    dead = run(sys.executable, script, "--endpoint", f"tcp://127.0.0.1:{free_port()}", "--timeout", "0.5")
    assert dead.returncode == 1 and "no answer" in dead.stderr


# --- Docker ------------------------------------------------------------------------------------------

def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker" / "docker-compose.yml").read_text())


def bind_mounts(service: dict):
    """(container path, host path) of a compose service's bind mounts (named volumes skipped)."""
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            yield target, (DEPLOY / "docker" / source).resolve()


def materialize_mounts(service: dict, root: Path) -> Path:
    for target, source in bind_mounts(service):
        dest = root / target.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, dest)
    return root


def dockerfile_instructions() -> list[tuple[str, str]]:
    lines = [line for line in (DEPLOY / "docker" / "Dockerfile").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]  # comments may sit inside a continuation
    text = "\n".join(lines).replace("\\\n", " ")
    return [tuple(line.split(None, 1)) for line in text.splitlines()]


def test_the_dockerfile_builds_what_the_issue_asks():
    steps = dockerfile_instructions()
    # The base image and torch's index are build arguments whose defaults are what users need.
    assert steps[:2] == [("ARG", "BASE_IMAGE=python:3.11-slim"), ("FROM", "${BASE_IMAGE}")]
    assert ("ARG", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") in steps
    runs = " ".join(arg for op, arg in steps if op == "RUN")
    assert 'pip install torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}' in runs
    (user,) = [arg for op, arg in steps if op == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    (entrypoint,) = [json.loads(arg) for op, arg in steps if op == "ENTRYPOINT"]  # exec form: a JSON list
    assert entrypoint[:2] == ["rnnlm", "serve"] and {a for a in entrypoint if a.startswith("--")} <= SERVE_OPTIONS
    assert entrypoint[entrypoint.index("--state-dir") + 1] == "/var/lib/rnnlm"
    assert entrypoint[entrypoint.index("--bind") + 1].startswith("tcp://0.0.0.0:")
    assert ("VOLUME", '["/var/lib/rnnlm"]') in steps
    # Everything it copies exists in the build context (the repository root) and is not ignored.
    allowed = [line[1:].rstrip("/") for line in (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for op, arg in steps:
        if op == "COPY":
            for source in arg.split()[:-1]:
                assert (ROOT / source).exists(), source
                assert source.rstrip("/") in allowed, f"{source} is excluded by Dockerfile.dockerignore"
    # The image's healthcheck and the k8s probes run the script where the image puts it.
    assert ("COPY", "deploy/healthcheck.py /opt/rnnlm/healthcheck.py") in steps


def test_hadolint_finds_nothing_in_the_dockerfile():
    result = run(tool("hadolint", required=False), DEPLOY / "docker" / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_stack_wires_daemon_prometheus_and_grafana():
    stack = compose()
    services = stack["services"]
    assert set(services) == {"rnnlm", "prometheus", "grafana"}
    daemon = services["rnnlm"]
    assert (DEPLOY / "docker" / daemon["build"]["context"] / daemon["build"]["dockerfile"]).resolve() == DEPLOY / "docker" / "Dockerfile"
    assert "/var/lib/rnnlm" in [v.split(":")[1] for v in daemon["volumes"]]
    for name, service in services.items():
        assert all(p.startswith("127.0.0.1:") for p in service.get("ports", [])), f"{name} publishes beyond loopback"
        for _, source in bind_mounts(service):
            assert source.exists(), source
    # Prometheus scrapes the daemon by its service name, on the port the image binds.
    scrape = yaml.safe_load((DEPLOY / "docker" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == ["rnnlm:9109"]
    docker_compose = tool("docker-compose", required=False)
    result = run(docker_compose, "-f", DEPLOY / "docker" / "docker-compose.yml", "config", "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr


# --- Kubernetes --------------------------------------------------------------------------------------

def k8s() -> dict[str, dict]:
    docs = [d for path in sorted((DEPLOY / "k8s").glob("*.yaml")) if path.name != "kustomization.yaml"
            for d in load_yaml_docs(path)]
    return {d["kind"]: d for d in docs}


def test_the_k8s_manifests_hang_together(tmp_path):
    objects = k8s()
    deployment, service, pvc = objects["Deployment"], objects["Service"], objects["PersistentVolumeClaim"]
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate", "one learner, never two"
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports) and "metrics" in ports
    assert {p["name"] for p in service["spec"]["ports"]} >= {"metrics"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/var/lib/rnnlm"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pod["terminationGracePeriodSeconds"] >= 120
    assert {a for a in container.get("args", []) if a.startswith("--")} <= SERVE_OPTIONS
    for probe in ("livenessProbe", "readinessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[1] == "/opt/rnnlm/healthcheck.py", "the script the Dockerfile copies"
    assert container["startupProbe"]["httpGet"]["port"] in ports
    # The ServiceMonitor finds the Service and its named port; job = the Service's name.
    monitor = objects["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["endpoints"]] == ["metrics"] and service["metadata"]["name"] == "rnnlm"


def test_the_prometheusrule_embeds_exactly_the_tested_rules(tmp_path):
    sys.path.insert(0, str(DEPLOY / "k8s"))
    try:
        from render_prometheusrule import render
    finally:
        sys.path.pop(0)
    rendered = (DEPLOY / "k8s" / "prometheusrule.yaml").read_text()
    assert rendered == render(), "run: python deploy/k8s/render_prometheusrule.py"
    groups = k8s()["PrometheusRule"]["spec"]["groups"]
    assert groups == [g for f in RULES for g in yaml.safe_load(f.read_text())["groups"]]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": groups}))
    result = run(tool("promtool"), "check", "rules", tmp_path / "rules.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_validate_accepts_the_manifests():
    """Against the Kubernetes OpenAPI schemas bundled in the kubernetes-validate package (offline),
    strict: unknown fields are errors. It has no schemas for the Prometheus Operator's CRDs; those
    are checked above (fields, and the rules by promtool)."""
    validate = tool("kubernetes-validate", required=False)
    core = [p for p in sorted((DEPLOY / "k8s").glob("*.yaml")) if load_yaml_docs(p)[0]["apiVersion"] in ("v1", "apps/v1")]
    assert len(core) == 3
    result = run(validate, "--strict", "--no-warn", *core)
    assert result.returncode == 0 and result.stdout.count("passed") == 3, result.stdout + result.stderr


def test_kustomize_builds_the_manifests():
    result = run(tool("kubectl", required=False), "kustomize", DEPLOY / "k8s")
    assert result.returncode == 0, result.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(result.stdout))
    assert kinds == ["Deployment", "PersistentVolumeClaim", "PrometheusRule", "Service", "ServiceMonitor"]


# --- Kubernetes: a fleet (deploy/k8s/fleet) ---------------------------------------------------------

FLEET = DEPLOY / "k8s" / "fleet"


def fleet_k8s() -> dict[str, dict]:
    docs = [d for path in sorted(FLEET.glob("*.yaml")) if path.name != "kustomization.yaml" for d in load_yaml_docs(path)]
    return {d["kind"]: d for d in docs}


def fleet_container(objects: dict) -> dict:
    (container,) = objects["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    return container


def options(command: list[str]) -> dict[str, str]:
    """`--name value` pairs of a command line (every option of `rnnlm serve` used here takes a value)."""
    return {a: command[i + 1] for i, a in enumerate(command) if a.startswith("--")}


def expand(command: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' own expansion of $(VAR) in a container's command, from the container's env."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in command]


def relocate(arg: str, roots: dict[str, Path]) -> str:
    """A path inside the pod, moved to where its volume's stand-in is here (the deepest mount holding it)."""
    holding = [mount for mount in roots if arg == mount or arg.startswith(mount + "/")]
    if not holding:
        return arg
    mount = max(holding, key=len)
    return str(roots[mount]) + arg[len(mount):]


def test_the_fleet_manifests_hang_together():
    objects = fleet_k8s()
    statefulset, service, config = objects["StatefulSet"], objects["Service"], objects["ConfigMap"]
    store, budget = objects["PersistentVolumeClaim"], objects["PodDisruptionBudget"]
    spec = statefulset["spec"]
    pod, labels = spec["template"]["spec"], spec["template"]["metadata"]["labels"]
    # A headless Service names the pods: rnnlm-0.rnnlm, rnnlm-1.rnnlm, ...
    assert service["spec"]["clusterIP"] == "None" and spec["serviceName"] == service["metadata"]["name"] == "rnnlm"
    for selector in (spec["selector"]["matchLabels"], service["spec"]["selector"], budget["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    assert spec["replicas"] == 3 and spec["podManagementPolicy"] in ("Parallel", "OrderedReady")
    assert budget["spec"] == {"maxUnavailable": 1, "selector": budget["spec"]["selector"]}
    container = fleet_container(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports) == {"zmq", "metrics"}
    # The member's name is the pod's name, from the downward API.
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert set(re.findall(r"\$\((\w+)\)", " ".join(container["command"]))) <= set(env)
    command = container["command"]
    assert command[:2] == ["rnnlm", "serve"] and "args" not in container
    assert {a for a in command if a.startswith("--")} <= SERVE_OPTIONS
    given = options(command)
    assert given["--fleet-name"] == "$(POD_NAME)" and "--state-dir" not in given, "checkpoints go to the store"
    assert given["--bind"] == f"tcp://0.0.0.0:{ports['zmq']}" and given["--metrics-addr"] == f"0.0.0.0:{ports['metrics']}"
    # The fleet file: the ConfigMap mounted whole (a subPath mount never sees an edit), naming
    # exactly the StatefulSet's pods at their headless-Service names.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    fleet_file = Path(given["--fleet"])
    fleet_mount = mounts[str(fleet_file.parent)]
    assert "subPath" not in fleet_mount and fleet_mount["readOnly"]
    assert volumes[fleet_mount["name"]]["configMap"]["name"] == config["metadata"]["name"] == "rnnlm-fleet"
    fleet = Fleet.parse(config["data"][fleet_file.name])
    assert fleet.members == tuple(Member(f"rnnlm-{i}", f"tcp://rnnlm-{i}.rnnlm:{ports['zmq']}")
                                  for i in range(spec["replicas"]))
    # The store: one ReadWriteMany volume that every member mounts, no per-pod volumes.
    store_mount = mounts[given["--fleet-store"]]
    assert volumes[store_mount["name"]]["persistentVolumeClaim"]["claimName"] == store["metadata"]["name"]
    assert store["spec"]["accessModes"] == ["ReadWriteMany"] and "volumeClaimTemplates" not in spec
    # A departing member has time to hand over: the grace period outlasts --handoff-wait and a checkpoint.
    assert pod["terminationGracePeriodSeconds"] >= max(120, 2 * int(given["--handoff-wait"]))
    # Probes and hardening as the single daemon's.
    deployment = k8s()["Deployment"]["spec"]["template"]["spec"]
    (single,) = deployment["containers"]
    for key in ("startupProbe", "readinessProbe", "livenessProbe", "securityContext", "resources"):
        assert container[key] == single[key], key
    assert pod["securityContext"] == deployment["securityContext"]
    # deploy/k8s's ServiceMonitor finds this Service and its named port too.
    monitor = k8s()["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


def test_kubernetes_validate_accepts_the_fleet_manifests():
    validate = tool("kubernetes-validate", required=False)
    files = [p for p in sorted(FLEET.glob("*.yaml")) if p.name != "kustomization.yaml"]
    assert len(files) == 5
    result = run(validate, "--strict", "--no-warn", *files)
    assert result.returncode == 0 and result.stdout.count("passed") == 5, result.stdout + result.stderr


def test_kustomize_builds_the_fleet():
    result = run(tool("kubectl", required=False), "kustomize", FLEET)
    assert result.returncode == 0, result.stderr
    docs = list(yaml.safe_load_all(result.stdout))
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "PersistentVolumeClaim", "PodDisruptionBudget", "Service",
                                              "StatefulSet"]
    assert all(d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "rnnlm" for d in docs)


class PodFilesystem:
    """The volumes the StatefulSet's pods mount, as folders under `root` shared by every member here
    as on Kubernetes (the store is one ReadWriteMany volume, the fleet file one ConfigMap)."""

    def __init__(self, root: Path, objects: dict):
        self.container = fleet_container(objects)
        self.roots = {m["mountPath"]: root / m["name"] for m in self.container["volumeMounts"]}
        for folder in self.roots.values():
            folder.mkdir(parents=True)
        (fleet_mount,) = [m["mountPath"] for m in self.container["volumeMounts"] if m["name"] == "fleet"]
        self.config = self.roots[fleet_mount]
        for key, text in objects["ConfigMap"]["data"].items():
            self.edit_config(key, text)

    def edit_config(self, key: str, text: str) -> None:
        """As the kubelet updates a ConfigMap volume: the new file appears whole, in one rename."""
        (self.config / f".{key}.new").write_text(text)
        os.replace(self.config / f".{key}.new", self.config / key)

    def command(self, pod: str) -> list[str]:
        """The container's command for `pod`, with its paths moved to the folders here."""
        return [relocate(a, self.roots) for a in expand(self.container["command"], {"POD_NAME": pod})]


def start_member(tmp: Path, model: Path, pods: PodFilesystem, name: str) -> Daemon:
    """`rnnlm serve` with the StatefulSet's command for pod `name`, on loopback ports."""
    given = options(pods.command(name))
    return Daemon(tmp, model, *[a for opt, value in given.items() if opt not in ("--bind", "--metrics-addr")
                                for a in (opt, value)])


def fleet_info_members(member: Daemon) -> list[str]:
    return [re.search(r'member="([^"]+)"', line).group(1) for line in member.scrape().splitlines()
            if line.startswith("rnnlm_fleet_info{") and line.endswith(" 1.0")]


def fleet_text(fleet: Fleet) -> str:
    return "".join(f"{m.name} {m.endpoint}\n" for m in fleet.members)


def test_real_daemons_run_the_statefulset_grow_and_shrink_as_documented(tmp_path, model_path):
    """The StatefulSet's command as Kubernetes would run it for rnnlm-0, -1 and -2 (the member name
    from the pod's, the fleet file from the ConfigMap, one store), in folders standing in for the
    volumes. Each serves the domains it owns, exports what the fleet rules and alerts read, and
    checkpoints into <store>/<name>/. Then docs/operating.md's procedures: grow (scale to rnnlm-3
    first, then add its line: a domain moves to it) and shrink (remove the line first; once rnnlm-3
    owns nothing and counted its handoff, scale it away: the domain carries on where it was)."""
    objects = fleet_k8s()
    pods = PodFilesystem(tmp_path, objects)
    fleet = Fleet.parse(objects["ConfigMap"]["data"]["fleet"])
    grown = Fleet(fleet.members + (Member("rnnlm-3", fleet.members[0].endpoint.replace("rnnlm-0", "rnnlm-3")),))
    candidates = [f"domain-{i}" for i in range(200)]
    # rnnlm-0's domain is one that moves to rnnlm-3 when it joins.
    domains = {"rnnlm-0": next(d for d in candidates
                               if fleet.owner(d).name == "rnnlm-0" and grown.owner(d).name == "rnnlm-3")}
    domains |= {m.name: next(d for d in candidates if fleet.owner(d) == m) for m in fleet.members[1:]}
    store = Path(options(pods.command("rnnlm-0"))["--fleet-store"])
    members = {}
    try:
        for name in fleet.names():
            members[name] = start_member(tmp_path, model_path, pods, name)
        first = {}
        for name, member in members.items():
            with Client(member.endpoint, timeout=30) as client:
                info = client.info()["fleet"]
                assert info["member"] == name and [m["name"] for m in info["members"]] == fleet.names()
                first[name] = client.score("the cat sat on the mat", domain=domains[name])
                assert client.info()["fleet"]["owned_domains"] == [domains[name]]
                client.save()
            assert list((store / name).glob("*.pt")), f"no checkpoint in {name}'s folder: {list(store.rglob('*'))}"
            assert fleet_info_members(member) == [name]
            assert member.metric("rnnlm_fleet_members") == 3 and member.metric("rnnlm_fleet_owned_domains") == 1
            assert member.metric("rnnlm_fleet_awaiting_handoff") == 0

        # Grow: the pod first (not in the file yet, it owns nothing), then its line.
        moving, old_owner, moving_tokens = domains["rnnlm-0"], members["rnnlm-0"], first["rnnlm-0"]["tokens"]
        members["rnnlm-3"] = joining = start_member(tmp_path, model_path, pods, "rnnlm-3")
        with Client(joining.endpoint, timeout=30) as client:
            assert client.info()["fleet"]["owned_domains"] == []
        pods.edit_config("fleet", fleet_text(grown))
        wait_for(lambda: joining.metric("rnnlm_handoffs_total", direction="taken") == 1, 30, joining.output)
        assert old_owner.metric("rnnlm_handoffs_total", direction="given") == 1
        with Client(joining.endpoint, timeout=30) as client:
            moving_tokens += client.score("the dog sat on the mat", domain=moving)["tokens"]
            assert client.info()["fleet"]["owned_domains"] == [moving]
        assert all(m.metric("rnnlm_fleet_members") == 4 for m in members.values())

        # Shrink: the line first; once rnnlm-3 has handed over everything, scale it away.
        pods.edit_config("fleet", fleet_text(fleet))
        wait_for(lambda: joining.metric("rnnlm_fleet_owned_domains") == 0
                 and joining.metric("rnnlm_handoffs_total", direction="given") == 1, 30, joining.output)
        assert joining.stop() == 0, joining.output()
        with Client(old_owner.endpoint, timeout=30) as client:
            moving_tokens += client.score("the cat sat on the dog and the cat sat", domain=moving)["tokens"]
            assert moving in client.info()["fleet"]["owned_domains"]
            # Every update of the domain, wherever it was made, is in its state: one SGD step per token.
            assert client.stats()["domains"][moving]["updates"] == moving_tokens, old_owner.output()
        assert old_owner.metric("rnnlm_handoffs_total", direction="taken") >= 1
        assert old_owner.metric("rnnlm_fleet_awaiting_handoff") == 0 and old_owner.metric("rnnlm_fleet_members") == 3
        for name in fleet.names():
            assert members[name].stop() == 0, members[name].output()
    finally:
        for member in members.values():
            member.__exit__(None, None, None)


def test_prometheus_sees_a_fleet_member_go_down(tmp_path, model_path):
    """Two members run with the StatefulSet's command and a real Prometheus scraping both with
    deploy/'s rules (windows scaled to seconds): load and domains are recorded per member, by
    name, and RnnlmFleetMemberDown is quiet; one member SIGKILLed, and it fires."""
    objects = fleet_k8s()
    pods = PodFilesystem(tmp_path / "pod", objects)
    pair = Fleet(Fleet.parse(objects["ConfigMap"]["data"]["fleet"]).members[:2])
    pods.edit_config("fleet", fleet_text(pair))
    members = {}
    try:
        for name in pair.names():
            members[name] = start_member(tmp_path, model_path, pods, name)
        config = e2e_config(members["rnnlm-0"], fast_rules(tmp_path / "rules"))
        config["scrape_configs"][0]["static_configs"] = [
            {"targets": [urllib.parse.urlparse(m.metrics_url).netloc for m in members.values()]}]
        with PrometheusServer(tmp_path / "prometheus", config) as prom:
            def recorded(expr: str) -> dict[str, float]:
                return {r["metric"]["member"]: float(r["value"][1]) for r in prom.api("query", query=expr)["result"]}

            def score_on_each() -> None:  # traffic on both until the 5s-window load sees it
                for member in pair.members:
                    domain = next(d for d in (f"domain-{i}" for i in range(100)) if pair.owner(d) == member)
                    with Client(members[member.name].endpoint, timeout=30) as client:
                        client.score("the cat sat on the mat", domain=domain)
            wait_for(lambda: score_on_each() or len(recorded("member:rnnlm_tokens:rate5m > 0")) == 2, 30,
                     lambda: f"{recorded('member:rnnlm_tokens:rate5m')}\n{prom.output()}")
            assert recorded("member:rnnlm_fleet_owned_domains:max") == {"rnnlm-0": 1, "rnnlm-1": 1}
            assert not prom.alerts("RnnlmFleetMemberDown")

            members["rnnlm-1"].stop(signal.SIGKILL)
            wait_for(lambda: "firing" in prom.alerts("RnnlmFleetMemberDown"), 20, prom.output)
            assert prom.value('ALERTS{alertname="RnnlmFleetMemberDown", alertstate="firing"}') == 1
            assert prom.value("max(rnnlm_fleet_members) - count(rnnlm_fleet_info)") == 1
    finally:
        for member in members.values():
            member.__exit__(None, None, None)


# --- the adaptation plot -----------------------------------------------------------------------------

def test_the_adaptation_plot_is_drawn(tmp_path, model_path):
    pytest.importorskip("matplotlib")
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text("\n".join(toy_text(60, seed=1)) + "\n")
    rng = np.random.default_rng(2)
    words = sorted({w for line in toy_text(400) for w in line.split()})
    second.write_text("".join(" ".join(rng.choice(words, 5)) + ".\n\n" for _ in range(60)))
    out = tmp_path / "plot.png"
    result = run(sys.executable, DEPLOY / "plot_adaptation.py", first, second, "--prose", "--model", model_path,
                 "--window", "50", "--out", out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert "static" in result.stdout and "adapted" in result.stdout
