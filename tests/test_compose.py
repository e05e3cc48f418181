"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

1. The compose file is valid against the Compose Specification's own JSON schema — the copy that the
   ``check-jsonschema`` package ships (``check_jsonschema/builtin_schemas/vendor/compose-spec.json``,
   Apache-2.0, from the compose-spec repository), validated with ``jsonschema`` — both as written and
   after Compose's ``${VAR:-default}`` interpolation. Where a ``docker-compose``/``docker compose``
   binary exists, ``config`` must accept it too.
2. The services' *exact* commands and healthchecks (the file's ``command`` and ``healthcheck.test``,
   interpolated as Compose would with only the required secrets set) run here as local processes with the file's own
   ``environment``; only hosts and ports are replaced: PostgreSQL is a private local server, Redis is
   the session's server on a database number of its own (so the session's worker never sees these
   jobs), and the API and Flower listen on free ports of 127.0.0.1.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import pytest

from api.stack import free_port, stop_process
from tests.procs import wait_for

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read docker-compose.yml (pip install PyYAML)")

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
VENV_BIN = Path(sys.executable).parent
ANDON_SERVICES = ("migrate", "api", "worker", "flower")
#: The session's Redis, database 11: isolated from the shared worker on database 0 (Celery's
#: broadcasts and events are prefixed by database number, the queues and keys live in it).
REDIS_DB = 11
#: The secrets the file refuses to start without; the tests set these, as an operator's .env would.
SECRETS = {"ANDON_API_TOKEN": "compose-test-token", "ANDON_FLOWER_BASIC_AUTH": "ops:compose-flower-pass",
           "POSTGRES_PASSWORD": "compose-test-pg"}


# --- reading the file as Compose does ---------------------------------------------------------------

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value, env: dict[str, str]):
    """Compose's variable interpolation (``$$``, ``$V``, ``${V}``, ``${V:-d}``, ``${V-d}``, ``${V:?e}``,
    ``${V?e}``, ``${V:+r}``, ``${V+r}``) over every string of a loaded compose document."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        name = m["braced"] or m["named"]
        op, arg = m["op"], m["arg"] or ""
        current = env.get(name)
        is_set, non_empty = current is not None, bool(current)
        if op == ":-":
            return current if non_empty else arg
        if op == "-":
            return current if is_set else arg
        if op in (":?", "?"):
            if (op == ":?" and not non_empty) or (op == "?" and not is_set):
                raise ValueError(f"required variable {name} is missing: {arg}")
            return current
        if op == ":+":
            return arg if non_empty else ""
        if op == "+":
            return arg if is_set else ""
        return current or ""

    return _VAR.sub(one, value)


def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose(env: dict[str, str] | None = None) -> dict:
    """The file as Compose sees it with the secrets and ``env`` set (every other default applies)."""
    return interpolate(raw_compose(), {**SECRETS, **(env or {})})


def duration_s(text: str) -> float:
    """A Compose duration (``30s``, ``1m30s``, ``500ms``) in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a Compose duration: {text!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


def healthcheck_argv(test: list[str] | str) -> list[str]:
    if isinstance(test, str):
        return ["sh", "-c", test]
    kind, *rest = test
    assert kind in ("CMD", "CMD-SHELL"), f"unexpected healthcheck form {kind}"
    return rest if kind == "CMD" else ["sh", "-c", rest[0]]


def dockerfile_env() -> dict[str, str]:
    """The image's ``ENV`` (``K=V`` pairs, with line continuations)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip().upper().startswith("ENV "):
            for pair in line.split()[1:]:
                key, _, value = pair.partition("=")
                env[key] = value
    return env


# --- 1. the file itself --------------------------------------------------------------------------------

def compose_spec_schema() -> dict:
    pytest.importorskip("jsonschema", reason="jsonschema is needed to validate docker-compose.yml")
    try:
        vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    except ModuleNotFoundError:
        pytest.skip("the Compose Specification schema comes from the check-jsonschema package "
                    "(pip install check-jsonschema, part of .[dev])")
    return json.loads(vendor.joinpath("compose-spec.json").read_text())


def schema_errors(document: dict) -> list[str]:
    from jsonschema.validators import validator_for

    schema = compose_spec_schema()
    validator_cls = validator_for(schema)
    validator_cls.check_schema(schema)
    validator = validator_cls(schema, format_checker=validator_cls.FORMAT_CHECKER)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))]


def test_compose_file_matches_the_compose_specification_schema():
    schema = compose_spec_schema()
    assert schema.get("title") == "Compose Specification"
    assert schema_errors(raw_compose()) == []
    assert schema_errors(compose()) == []
    assert schema_errors(compose({"ANDON_WORKER_CONCURRENCY": "8", "ANDON_API_PORT": "80"})) == []


def test_compose_has_no_default_credentials():
    """Each secret is required: Compose refuses the file (``${VAR:?message}``) until it is set."""
    for name in SECRETS:
        missing = {k: v for k, v in SECRETS.items() if k != name}
        with pytest.raises(ValueError, match=f"required variable {name} is missing"):
            interpolate(raw_compose(), missing)
        with pytest.raises(ValueError, match=f"required variable {name} is missing"):
            interpolate(raw_compose(), {**missing, name: ""})
    doc = compose()
    env = doc["x-andon-env"]
    assert env["ANDON_API_TOKEN"] == SECRETS["ANDON_API_TOKEN"]
    assert env["ANDON_FLOWER_BASIC_AUTH"] == SECRETS["ANDON_FLOWER_BASIC_AUTH"]
    assert f":{SECRETS['POSTGRES_PASSWORD']}@" in env["ANDON_DATABASE_URL"]
    assert doc["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] == SECRETS["POSTGRES_PASSWORD"]
    text = COMPOSE_FILE.read_text()
    for weak in ("change-me", "POSTGRES_PASSWORD:-", "ANDON_API_TOKEN:-", "ANDON_FLOWER_BASIC_AUTH:-"):
        assert weak not in text, weak


def test_compose_passes_every_andon_setting_the_services_read(monkeypatch):
    """Every ``ANDON_*`` setting andon reads reaches every andon service; one the operator leaves
    unset is passed empty, which andon reads as unset (its own default), not as a value."""
    from db.settings import Settings

    read = {f"ANDON_{name.upper()}" for name in Settings.model_fields}
    passed = set(raw_compose()["x-andon-env"])
    assert read - {"ANDON_HOME"} <= passed, sorted(read - {"ANDON_HOME"} - passed)
    assert "ANDON_HOME" in dockerfile_env()  # the image's own path; not the operator's to move

    for name in [k for k in os.environ if k.startswith("ANDON_")]:
        monkeypatch.delenv(name)
    defaults = Settings()
    for name, value in compose()["x-andon-env"].items():  # only the secrets set: the rest pass through empty
        monkeypatch.setenv(name, str(value))
    seen = Settings()
    for name in ("job_time_limit_s", "max_job_rss_mb", "max_streams", "max_body_bytes", "api_tokens",
                 "admin_token", "public_reads", "llm_base_url", "embeddings_model", "pipelines"):
        assert getattr(seen, name) == getattr(defaults, name), name
    assert seen.api_token == SECRETS["ANDON_API_TOKEN"]
    assert seen.allowed_host_list == ["localhost", "127.0.0.1", "::1", "api"]  # the services reach it as `api`
    assert seen.resolved_api_url == "http://api:8000"


def test_the_schema_check_is_not_vacuous():
    doc = raw_compose()
    doc["services"]["worker"]["stop_grace_periodd"] = "30s"
    doc["services"]["api"]["depends_on"]["migrate"]["condition"] = "service_finished"
    errors = schema_errors(doc)
    assert any("stop_grace_periodd" in e for e in errors), errors
    assert any("service_finished" in e for e in errors), errors


def test_compose_file_wires_the_stack_as_intended():
    doc = compose()
    services = doc["services"]
    assert set(services) == {"redis", "postgres", "rabbitmq", "migrate", "api", "worker", "flower"}
    # the default profile is Redis: only RabbitMQ sits in a profile of its own
    assert {name for name, svc in services.items() if svc.get("profiles")} == {"rabbitmq"}
    for name, deps in services.items():
        for dep in deps.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert services["migrate"]["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert services["migrate"]["restart"] == "no"
    for name, svc in services.items():
        if name != "migrate":
            assert svc["healthcheck"]["test"], f"{name} has no healthcheck"
            assert not svc["healthcheck"].get("disable"), name

    andon_env = doc["x-andon-env"]
    for key in ("ANDON_BROKER_URL", "ANDON_REDIS_URL", "ANDON_DATABASE_URL", "ANDON_API_TOKEN",
                "ANDON_FLOWER_BASIC_AUTH", "ANDON_TERMINATE_GRACE_S", "ANDON_COLD_SHUTDOWN_GRACE_S"):
        assert andon_env[key], key
    assert andon_env["ANDON_DATABASE_URL"].startswith("postgresql+psycopg://")
    for name in ANDON_SERVICES:  # every andon service gets the whole shared environment
        assert andon_env.items() <= services[name]["environment"].items(), name

    worker = services["worker"]
    assert worker["command"][:4] == ["celery", "-A", "tasks.app", "worker"]
    assert {"-P", "prefork", "-E"} <= set(worker["command"])
    assert worker["command"][worker["command"].index("-P") + 1] == "prefork"
    assert worker["stop_signal"] == "SIGTERM"
    # warm shutdown: jobs stop at their next checkpoint within seconds; plenty of room before SIGKILL
    assert duration_s(worker["stop_grace_period"]) >= 20
    assert "-d andon@$HOSTNAME" in worker["healthcheck"]["test"][1]
    # Flower's password goes in its environment, never on a command line (`ps` shows those)
    assert "--basic-auth" not in services["flower"]["command"][-1]
    assert 'export FLOWER_BASIC_AUTH="$ANDON_FLOWER_BASIC_AUTH"' in services["flower"]["command"][-1]
    assert "celery -A tasks.app flower" in services["flower"]["command"][-1]
    assert "/readyz" in services["api"]["healthcheck"]["test"][-1]


def test_dockerfile_installs_the_package_as_a_non_root_user():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    assert re.search(r"^RUN pip install \"\.\[postgres\]\"", text, re.M)
    copied = {Path(m).name for m in re.findall(r"^COPY\s+(\S+)\s+\./", text, re.M)}
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for pattern in packages["include"]:  # every top-level package pyproject installs is in the image
        assert pattern.rstrip("*") in copied, f"Dockerfile does not COPY {pattern.rstrip('*')}/"
    assert {"pyproject.toml", "README.md"} <= set(re.findall(r"^COPY (.+) \./$", text, re.M)[0].split())


def _compose_binary() -> list[str] | None:
    for argv in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(argv[0]) and subprocess.run([*argv, "version"], capture_output=True).returncode == 0:
            return argv
    return None


def test_docker_compose_config_accepts_the_file(tmp_path):
    """Compose itself, where installed (Debian's docker-compose, or Docker's compose plugin)."""
    argv = _compose_binary()
    if argv is None:
        pytest.skip("no docker-compose or `docker compose` on PATH (Debian: apt-get install docker-compose); "
                    "the JSON-schema test covers the file")
    version = subprocess.run([*argv, "version", "--short"], capture_output=True, text=True).stdout.strip()
    path = COMPOSE_FILE
    if version.startswith("1."):  # Compose v1 (EOL) predates the top-level `name`; the rest must pass
        path = tmp_path / "docker-compose.yml"
        path.write_text(re.sub(r"^name: .*\n", "", COMPOSE_FILE.read_text(), flags=re.M))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANDON_") and k != "POSTGRES_PASSWORD"}
    result = subprocess.run([*argv, "-f", str(path), "config", "-q"], capture_output=True, text=True,
                            env={**env, **SECRETS}, cwd=path.parent, timeout=60)
    assert result.returncode == 0, result.stderr
    refused = subprocess.run([*argv, "-f", str(path), "config", "-q"], capture_output=True, text=True, env=env,
                             cwd=path.parent, timeout=60)
    assert refused.returncode != 0 and "ANDON_API_TOKEN" in refused.stderr + refused.stdout


def test_flower_command_refuses_to_run_without_auth():
    flower = compose()["services"]["flower"]
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for bad in ("", "no-colon", ":password", "user:"):
        result = subprocess.run(flower["command"], env={**env, "ANDON_FLOWER_BASIC_AUTH": bad},
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 64, (bad, result.stdout, result.stderr)
        assert "ANDON_FLOWER_BASIC_AUTH=user:password" in result.stderr


#: What the README's .env for the `rabbitmq` profile sets (besides the secrets above).
RABBITMQ_PROFILE = {"COMPOSE_PROFILES": "rabbitmq", "RABBITMQ_PASSWORD": "compose-test-rabbit",
                    "ANDON_BROKER_URL": "amqp://andon:compose-test-rabbit@rabbitmq:5672/andon"}


def test_the_rabbitmq_profile_points_the_andon_services_at_rabbitmq():
    assert schema_errors(compose(RABBITMQ_PROFILE)) == []
    default, services = compose(), compose(RABBITMQ_PROFILE)["services"]
    assert default["x-andon-env"]["ANDON_BROKER_URL"] == "redis://redis:6379/0"
    rabbit = services["rabbitmq"]
    assert rabbit["profiles"] == ["rabbitmq"] and rabbit["hostname"] == "rabbitmq"
    assert rabbit["environment"]["RABBITMQ_DEFAULT_USER"] == "andon"
    assert rabbit["environment"]["RABBITMQ_DEFAULT_PASS"] == RABBITMQ_PROFILE["RABBITMQ_PASSWORD"]
    assert rabbit["environment"]["RABBITMQ_DEFAULT_VHOST"] == "andon"
    assert "rabbitmq-data:/var/lib/rabbitmq" in rabbit["volumes"] and rabbit["healthcheck"]["test"]
    for name in ANDON_SERVICES:  # the broker is RabbitMQ; tokens, results and pub/sub stay in Redis
        env = services[name]["environment"]
        assert env["ANDON_BROKER_URL"] == RABBITMQ_PROFILE["ANDON_BROKER_URL"], name
        assert env["ANDON_REDIS_URL"] == "redis://redis:6379/0", name
    for name in ("api", "worker", "flower"):  # they wait for it when the profile runs it, not otherwise
        assert services[name]["depends_on"]["rabbitmq"] == {"condition": "service_healthy", "required": False}


def test_the_rabbitmq_consumer_timeout_outlasts_any_job():
    """acks_late: a running job's message stays unacked; RabbitMQ's consumer_timeout (30 min by
    default) must be far above the longest job, or it closes the channel and redelivers the job."""
    args = compose()["services"]["rabbitmq"]["environment"]["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"].split()
    timeout_ms = int(args[args.index("consumer_timeout") + 1])
    assert args[args.index("consumer_timeout") - 1] == "-rabbit"
    assert timeout_ms >= 12 * 3600 * 1000
    custom = compose({"RABBITMQ_CONSUMER_TIMEOUT_MS": "90000000"})["services"]["rabbitmq"]
    assert "consumer_timeout 90000000" in custom["environment"]["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"]


def test_rabbitmq_command_refuses_to_run_without_a_password():
    rabbit = compose()["services"]["rabbitmq"]
    assert rabbit["environment"]["RABBITMQ_DEFAULT_PASS"] == ""  # no default credentials
    result = subprocess.run(rabbit["command"], env={**os.environ, "RABBITMQ_DEFAULT_PASS": ""},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 64 and "set RABBITMQ_PASSWORD" in result.stderr, result.stderr
    assert rabbit["command"][-1].endswith("exec docker-entrypoint.sh rabbitmq-server")


# --- 2. the same commands, run here ---------------------------------------------------------------------

def _wait(predicate, timeout: float, what: str, interval: float = 0.05):
    return wait_for(predicate, timeout, interval, what)


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class LocalStack:
    """The compose services' commands as local processes, each with the env Compose would give it."""

    def __init__(self, doc: dict, home: Path, local: dict[str, str]) -> None:
        self.doc = doc
        self.home = home
        self.logs = home / "logs"
        self.logs.mkdir(parents=True)
        self.local = local
        self.procs: dict[str, subprocess.Popen] = {}
        # The image's ENV, then the inherited PATH (with this venv first, as the image's python is),
        # without any ANDON_/UVICORN_/FLOWER_ setting of the test session leaking in.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("ANDON_", "UVICORN_", "FLOWER_"))}
        self.base = {**inherited, **dockerfile_env(), "ANDON_HOME": str(home), "HOSTNAME": socket.gethostname(),
                     "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

    def env(self, name: str) -> dict[str, str]:
        declared = {k: str(v) for k, v in self.doc["services"][name]["environment"].items()}
        replaced = {k: self.local[k] for k in declared if k in self.local}
        return {**self.base, **declared, **replaced}

    def run(self, name: str, timeout: float = 60) -> subprocess.CompletedProcess:
        log = self.logs / f"{name}.log"
        with log.open("ab") as out:
            return subprocess.run(self.doc["services"][name]["command"], env=self.env(name), cwd=ROOT,
                                  stdout=out, stderr=subprocess.STDOUT, timeout=timeout)

    def start(self, name: str) -> subprocess.Popen:
        log = self.logs / f"{name}.log"
        proc = subprocess.Popen(self.doc["services"][name]["command"], env=self.env(name), cwd=ROOT,
                                stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def alive(self, name: str) -> bool:
        proc = self.procs[name]
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited with {proc.returncode}:\n{self.log(name)[-3000:]}")
        return True

    def healthy(self, name: str) -> bool:
        """Run the service's own healthcheck command once (inside its environment, as Docker does)."""
        check = self.doc["services"][name]["healthcheck"]
        self.alive(name)
        try:
            result = subprocess.run(healthcheck_argv(check["test"]), env=self.env(name), cwd=ROOT,
                                    capture_output=True, timeout=duration_s(check["timeout"]))
        except subprocess.TimeoutExpired:
            return False
        return result.returncode == 0

    def descendants(self) -> set[int]:
        import psutil

        pids = set()
        for proc in self.procs.values():
            try:
                parent = psutil.Process(proc.pid)
                pids |= {parent.pid, *(c.pid for c in parent.children(recursive=True))}
            except psutil.NoSuchProcess:
                pass
        return pids

    def ours(self) -> list:
        """Every live process on this machine running with this stack's ANDON_HOME."""
        import psutil

        found = []
        for proc in psutil.process_iter(["pid", "status"]):
            try:
                if proc.info["status"] != psutil.STATUS_ZOMBIE and proc.environ().get("ANDON_HOME") == str(self.home):
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return found

    def stop(self, name: str, timeout: float) -> float:
        """SIGTERM (every service's stop signal here), as `docker compose stop` sends; seconds to exit."""
        proc = self.procs[name]
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still running {timeout}s after SIGTERM:\n{self.log(name)[-3000:]}")
        return time.monotonic() - started

    def kill_all(self) -> None:
        for proc in self.procs.values():
            stop_process(proc, signal.SIGKILL, timeout=5)


@pytest.mark.postgres
def test_compose_service_commands_run_the_stack(postgres_server, redis_server, tmp_path):
    import httpx
    import psycopg
    import redis

    doc = compose()
    services = doc["services"]
    db_url = postgres_server.create_database(f"andon_compose_{uuid.uuid4().hex[:8]}")
    redis_url = os.environ["ANDON_REDIS_URL"].rsplit("/", 1)[0] + f"/{REDIS_DB}"
    api_port, flower_port = free_port(), free_port()
    # The hosts and ports the file names (compose's service names, 0.0.0.0) are replaced; nothing else.
    local = {
        "ANDON_DATABASE_URL": db_url, "ANDON_REDIS_URL": redis_url, "ANDON_BROKER_URL": redis_url,
        "UVICORN_HOST": "127.0.0.1", "UVICORN_PORT": str(api_port),
        "FLOWER_ADDRESS": "127.0.0.1", "FLOWER_PORT": str(flower_port),
    }
    assert "@postgres:5432/" in doc["x-andon-env"]["ANDON_DATABASE_URL"]
    assert doc["x-andon-env"]["ANDON_BROKER_URL"].startswith("redis://redis:6379/")
    assert services["api"]["environment"]["UVICORN_PORT"] == "8000"
    assert services["flower"]["environment"]["FLOWER_PORT"] == "5555"

    home = tmp_path / "andon-home"
    stack = LocalStack(doc, home, local)
    token = stack.env("api")["ANDON_API_TOKEN"]
    flower_auth = tuple(stack.env("flower")["ANDON_FLOWER_BASIC_AUTH"].split(":", 1))
    broker = redis.Redis.from_url(redis_url)
    broker.flushdb()
    api = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=10,
                       headers={"Authorization": f"Bearer {token}"})
    flower = httpx.Client(base_url=f"http://127.0.0.1:{flower_port}", timeout=10, auth=flower_auth)
    try:
        # migrate: runs once, exits 0, leaves the schema at Alembic's head
        result = stack.run("migrate")
        assert result.returncode == 0, stack.log("migrate")
        with psycopg.connect(db_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
            assert conn.execute("SELECT version_num FROM alembic_version").fetchone()

        for name in ("worker", "api", "flower"):
            stack.start(name)
        _wait(lambda: stack.alive("worker") and " ready." in stack.log("worker"), 60, "worker ready.")
        for name in ("api", "flower", "worker"):  # each service's own healthcheck passes
            _wait(lambda: stack.healthy(name), 45, f"{name} healthcheck", interval=0.2)
        assert f"andon@{socket.gethostname()}" in stack.log("worker")

        # the other services reach the API by its service name; a name not listed is refused (rebinding)
        assert api.get("/api/jobs", headers={"Host": "api:8000"}).status_code == 200
        assert api.get("/api/jobs", headers={"Host": "rebind.attacker.example"}).status_code == 400
        assert api.get("/readyz").json()["status"] == "ready"
        # Flower's password is on no process's command line
        import psutil

        for pid in stack.descendants():
            assert flower_auth[1] not in " ".join(psutil.Process(pid).cmdline()), pid
        # the secrets in the file's environment are enforced
        assert httpx.post(f"http://127.0.0.1:{api_port}/api/jobs", json={"documents": ["x"]}).status_code == 401
        assert httpx.get(f"http://127.0.0.1:{api_port}/api/jobs").status_code == 401  # reads too
        # (Flower's /healthcheck itself is open; everything else is behind its basic auth)
        assert httpx.get(f"http://127.0.0.1:{flower_port}/api/tasks").status_code == 401
        assert httpx.get(f"http://127.0.0.1:{flower_port}/api/tasks", auth=("andon", "wrong")).status_code == 401
        assert flower.get("/api/tasks").status_code == 200

        # a job through the API, cancelled mid-way: it keeps its partial results
        documents = [f"Document {i}. It has two sentences." for i in range(30)]
        answer = api.post("/api/jobs", json={"documents": documents, "options": {"stage_delay_s": 0.05}})
        assert answer.status_code == 202, answer.text
        job_id = answer.json()["job_id"]
        _wait(lambda: api.get(f"/api/jobs/{job_id}").json()["completed_items"] >= 2, 30, "2 finished items")
        cancel = api.post(f"/api/jobs/{job_id}/cancel", json={"reason": "user_requested"})
        assert cancel.status_code == 202, cancel.text
        job = _wait(lambda: (j := api.get(f"/api/jobs/{job_id}").json())["status"] in
                    ("cancelled", "completed", "failed") and j, 30, "job terminal")
        assert job["status"] == "cancelled" and job["cancelled"], job
        assert job["cancellation_reason"] == "user_requested", job
        assert 2 <= job["completed_items"] < len(documents), job
        partial = api.get(f"/api/jobs/{job_id}/partial-results").json()
        assert partial["status"] == "partial", partial
        assert len(partial["results"]) == job["completed_items"]
        # the worker runs with -E, so Flower saw the job, and shows it REVOKED
        _wait(lambda: (r := flower.get(f"/api/task/info/{job_id}")).status_code == 200
              and r.json().get("state") == "REVOKED", 20, "Flower shows the job REVOKED", interval=0.2)

        # warm shutdown (the worker's stop_signal): a running job stops at its next checkpoint, and the
        # worker exits well within stop_grace_period
        answer = api.post("/api/jobs", json={"documents": documents, "options": {"stage_delay_s": 0.2}})
        running_id = answer.json()["job_id"]
        _wait(lambda: api.get(f"/api/jobs/{running_id}").json()["completed_items"] >= 1, 30, "job running")
        pids = stack.descendants()
        assert len(pids) >= 5  # worker main + its 2 prefork children, API, Flower
        grace = duration_s(services["worker"]["stop_grace_period"])
        took = stack.stop("worker", timeout=grace)
        assert took < 10, f"warm shutdown took {took:.1f}s"
        assert stack.procs["worker"].returncode == 0, stack.log("worker")[-3000:]
        job = api.get(f"/api/jobs/{running_id}").json()
        assert job["status"] == "cancelled" and job["cancellation_reason"] == "system_shutdown", job
        assert 1 <= job["completed_items"] < len(documents), job

        for name in ("api", "flower"):
            assert stack.stop(name, timeout=10) < 10
        _wait(lambda: not any(_running(pid) for pid in pids), 10, "no process of the stack left")
        assert stack.ours() == []
    finally:
        api.close()
        flower.close()
        stack.kill_all()
        broker.flushdb()
        broker.close()
