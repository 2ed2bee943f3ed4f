"""What still stopped a new user in the third hour (issue 30): the first logging example,
zero code with the distro alone, a failed constructor, Celery, flush hooks without a
token, Django's autoreloader, option typos and OpenTelemetry versions."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from mixpanel_otel._config import check_arguments, known_environment, unknown_environment
from mixpanel_otel._exceptions import MixpanelException
from mixpanel_otel._launch import zero_code_defaults

from .helpers import (
    CLI,
    ROOT,
    TOKEN,
    AppProcess,
    example_gunicorn,
    free_port,
    process_env,
    sink_env,
)


def _python(source: str, env: dict[str, str], cwd=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _clean_env(**extra):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MIXPANEL", "OTEL_"))}
    return process_env(base, **extra)


# -- 1. a handler on a logger whose level drops INFO records says so --------------------

FIRST_EXAMPLE = """
import logging
from mixpanel_otel import MixpanelGroupHandler

{setup}
logging.getLogger("billing").info(
    "plan changed", extra={{"group_key": "company", "group_id": "acme", "$set": {{"plan": "pro"}}}}
)
"""
LEVEL_WARNING = "MixpanelGroupHandler is on the 'root' logger, whose level is WARNING"


@pytest.mark.slow
def test_a_handler_on_a_warning_root_logger_warns_once_at_exit(sink):
    setup = "logging.getLogger().addHandler(MixpanelGroupHandler())"
    result = _python(FIRST_EXAMPLE.format(setup=setup), sink_env(sink.url))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(LEVEL_WARNING) == 1, result.stderr
    assert "logging.getLogger().setLevel(logging.INFO)" in result.stderr
    assert sink.profiles() == [], "the INFO record never reached the handler"


@pytest.mark.slow
def test_the_warning_comes_with_the_first_record_when_one_arrives(sink):
    setup = """
logging.basicConfig()  # a console handler: the warning goes through logging
logging.getLogger().addHandler(MixpanelGroupHandler())
logging.getLogger("app").warning("disk almost full")
print("after the first record", flush=True)
import sys; sys.stderr.flush()
"""
    result = _python(FIRST_EXAMPLE.format(setup=setup), sink_env(sink.url))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(LEVEL_WARNING) == 1, result.stderr
    assert "WARNING:mixpanel_otel:" in result.stderr, "logged, not written past the handlers"


@pytest.mark.slow
@pytest.mark.parametrize(
    "setup",
    [
        "root = logging.getLogger(); root.setLevel(logging.INFO); "
        "root.addHandler(MixpanelGroupHandler())",
        "logging.getLogger().addHandler(MixpanelGroupHandler()); "
        "logging.getLogger('billing').setLevel(logging.INFO)",
    ],
    ids=["root-at-info", "the-group-logger-at-info"],
)
def test_no_warning_when_info_records_arrive(sink, setup):
    result = _python(FIRST_EXAMPLE.format(setup=setup), sink_env(sink.url))
    assert result.returncode == 0, result.stderr
    assert "whose level is" not in result.stderr, result.stderr
    assert sink.profile("company", "acme") == {"plan": "pro"}


@pytest.mark.slow
def test_a_handler_asked_for_warnings_only_is_not_warned_about(sink):
    setup = "logging.getLogger().addHandler(MixpanelGroupHandler(level=logging.WARNING))"
    result = _python(FIRST_EXAMPLE.format(setup=setup), sink_env(sink.url))
    assert result.returncode == 0 and result.stderr == "", result.stderr


# -- 3. a constructor that fails leaves no second traceback at exit --------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "construct, error",
    [
        ("MixpanelGroupHandler(batchsize=10)", "unknown option(s): batchsize"),
        ("MixpanelGroupHandler(rules=[{'group_key': 'company'}])", "rule 1"),
        (
            "logging.config.dictConfig({'version': 1, 'handlers': {'mp': {"
            "'class': 'mixpanel_otel.MixpanelGroupHandler', 'flush_intervall': 1}}})",
            "flush_intervall",
        ),
    ],
    ids=["bad-argument", "bad-rules", "dictConfig-typo"],
)
def test_a_failed_constructor_leaves_nothing_for_exit(construct, error):
    source = "import logging, logging.config\nfrom mixpanel_otel import MixpanelGroupHandler\n"
    source += construct
    result = _python(source, _clean_env(MIXPANEL_TOKEN=TOKEN, MIXPANEL_API_HOST="127.0.0.1:9"))
    assert result.returncode == 1
    assert error in result.stderr, result.stderr
    assert "Exception ignored" not in result.stderr, result.stderr
    assert "has no attribute" not in result.stderr, result.stderr


# -- 4. Celery: the README's handler keeps delivering under a worker --------------------

CELERY_APP = """
import logging

from celery import Celery
from celery.utils.log import get_task_logger

from mixpanel_otel import MixpanelGroupHandler

logging.getLogger().addHandler(MixpanelGroupHandler())  # the README's setup
logging.getLogger().setLevel(logging.INFO)
logging.getLogger(__name__).info("tasks loaded")  # the handler checks the level now: fine

app = Celery("tasks", broker="filesystem://")
app.conf.broker_transport_options = {transport!r}
app.conf.broker_connection_retry_on_startup = True


@app.task
def upgrade(tenant):
    logging.getLogger("billing").info(
        "upgrade", extra={{"group_key": "company", "group_id": tenant, "$set": {{"plan": "pro"}}}}
    )
    get_task_logger(__name__).info(
        "seats", extra={{"group_key": "company", "group_id": tenant, "$set": {{"seats": 3}}}}
    )
"""


def _celery_worker(tmp_path, sink, *args: str) -> AppProcess:
    """A Celery worker (prefork, one child) for ``CELERY_APP`` on a filesystem broker,
    with one ``upgrade("acme")`` task already queued for it."""
    celery = pytest.importorskip("celery")
    transport = {
        "data_folder_in": str(tmp_path / "queue"),
        "data_folder_out": str(tmp_path / "queue"),
        "processed_folder": str(tmp_path / "done"),
        "control_folder": str(tmp_path / "control"),  # not the current directory
    }
    for folder in set(transport.values()):
        os.makedirs(folder, exist_ok=True)
    sender = celery.Celery("tasks", broker="filesystem://")
    sender.conf.broker_transport_options = transport
    sender.send_task("tasks.upgrade", args=["acme"])
    (tmp_path / "tasks.py").write_text(CELERY_APP.format(transport=transport))
    env = sink_env(sink.url, MIXPANEL_OTEL_FLUSH_INTERVAL="0.1")
    env["PYTHONPATH"] = str(tmp_path) + os.pathsep + env["PYTHONPATH"]
    command = [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-c", "1", *args]
    return AppProcess(command, 0, env, cwd=str(tmp_path))


def _wait_profile(sink, worker, deadline_s=90.0):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        found = sink.profile("company", "acme")
        if found and {"plan", "seats"} <= set(found):
            return found
        if worker.proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"no complete profile arrived; worker output:\n{worker.output}")


@pytest.mark.slow
def test_celery_worker_keeps_the_root_handler(tmp_path, sink):
    worker = _celery_worker(tmp_path, sink, "--loglevel", "INFO")
    try:
        assert _wait_profile(sink, worker) == {"plan": "pro", "seats": 3}
    finally:
        worker.stop(signal.SIGTERM)
    assert "whose level is" not in worker.output, worker.output


@pytest.mark.slow
def test_celery_worker_at_its_default_level_warns_naming_celery(tmp_path, sink):
    worker = _celery_worker(tmp_path, sink)  # --loglevel defaults to WARNING
    try:
        deadline = time.monotonic() + 90
        while "--loglevel INFO" not in worker.output and time.monotonic() < deadline:
            assert worker.proc.poll() is None, worker.output
            time.sleep(0.1)
    finally:
        worker.stop(signal.SIGTERM)
    output = worker.output
    assert output.count("start the Celery worker with --loglevel INFO") == 1, output


# -- 5. flush hooks without a token are no-ops ------------------------------------------


LIFESPAN = """
import asyncio
{snippet}

async def serve_and_stop():
    async with lifespan(app):
        pass

asyncio.run(serve_and_stop())
print("stopped")
"""


def _docs_block(path: str, marker: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
        blocks = re.findall(r"```python\n(.*?)```", handle.read(), re.S)
    (block,) = [b for b in blocks if marker in b]
    return block


@pytest.mark.slow
def test_the_fastapi_lifespan_snippet_runs_without_a_token():
    snippet = _docs_block("docs/opentelemetry.md", "async def lifespan")
    result = _python(LIFESPAN.format(snippet=snippet), _clean_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "stopped"
    assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.slow
def test_gunicorn_worker_exit_without_a_token(tmp_path):
    port = free_port()
    server = AppProcess(
        example_gunicorn(port),
        port,
        _clean_env(),
        cwd=str(tmp_path),
    )
    try:
        server.wait_ready("/")
    finally:
        assert server.stop(signal.SIGTERM) == 0
    assert "Traceback" not in server.output, server.output
    assert "MissingToken" not in server.output


def test_get_consumer_without_a_token_is_a_no_op(monkeypatch):
    from mixpanel_otel import get_consumer
    from mixpanel_otel._frontend import DisabledConsumer

    monkeypatch.delenv("MIXPANEL_TOKEN", raising=False)
    monkeypatch.delenv("MIXPANEL_OTEL_DISABLED", raising=False)
    consumer = get_consumer()
    assert isinstance(consumer, DisabledConsumer) and "no Mixpanel project token" in consumer.reason
    assert consumer.flush(5) is True
    with pytest.raises(MixpanelException, match="batchsize"):
        get_consumer(batchsize=3)  # a wrong argument still raises


# -- 6. Django's autoreloader ------------------------------------------------------------


def test_django_docs_say_the_autoreloader_loses_updates():
    with open(os.path.join(ROOT, "docs", "opentelemetry.md"), encoding="utf-8") as handle:
        text = handle.read()
    django = text[text.index("### Django") :]
    django = django[: django.index("\n## ")]
    assert "SIGKILL" in django and "--noreload" in django
    assert "runserver" in django and "process manager" in django


# -- 9. option typos ---------------------------------------------------------------------


def test_an_unknown_option_names_the_closest_one():
    with pytest.raises(MixpanelException) as caught:
        check_arguments({"batchsize": 10, "flush_intervall": 1, "zzz": 1})
    assert str(caught.value) == (
        "unknown option(s): batchsize (did you mean batch_size?), "
        "flush_intervall (did you mean flush_interval?), zzz"
    )


def test_unknown_environment_names_each_variable_nothing_reads():
    environ = {
        "MIXPANEL_OTEL_BATCHSIZE": "10",
        "MIXPANEL_OTEL_BATCH_SIZE": "10",
        "MIXPANEL_OTEL_SPOOLDIR": "/tmp",
        "MIXPANEL_TOKEN": "x",
        "OTEL_TRACES_EXPORTER": "mixpanel",
    }
    assert unknown_environment(environ) == [
        "MIXPANEL_OTEL_BATCHSIZE (did you mean MIXPANEL_OTEL_BATCH_SIZE?)",
        "MIXPANEL_OTEL_SPOOLDIR (did you mean MIXPANEL_OTEL_SPOOL_DIR?)",
    ]


def test_every_variable_the_package_reads_is_known():
    read = set()
    for folder, _, files in os.walk(os.path.join(ROOT, "mixpanel_otel")):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name), encoding="utf-8") as handle:
                    read.update(re.findall(r"[\"'](MIXPANEL_OTEL_[A-Z0-9_]+)[\"']", handle.read()))
    assert "MIXPANEL_OTEL_RULES" in read and read - set(known_environment()) == set()


@pytest.mark.slow
def test_a_misspelt_variable_warns_once_at_start(sink):
    source = """
    from mixpanel_otel import GroupClient, MixpanelGroupHandler
    MixpanelGroupHandler()
    GroupClient().group_set("company", "acme", {"plan": "pro"})
    """
    result = _python(source, sink_env(sink.url, MIXPANEL_OTEL_BATCHSIZE="10"))
    assert result.returncode == 0, result.stderr
    line = (
        "ignored unknown environment variable(s): "
        "MIXPANEL_OTEL_BATCHSIZE (did you mean MIXPANEL_OTEL_BATCH_SIZE?)"
    )
    assert result.stderr.count(line) == 1, result.stderr


@pytest.mark.slow
def test_check_names_every_unknown_variable(sink):
    env = sink_env(sink.url, MIXPANEL_OTEL_BATCHSIZE="10", MIXPANEL_OTEL_RULE="rules.toml")
    result = subprocess.run([*CLI, "check"], env=env, capture_output=True, text=True, timeout=60)
    assert "MIXPANEL_OTEL_BATCHSIZE (did you mean MIXPANEL_OTEL_BATCH_SIZE?)" in result.stdout
    assert "MIXPANEL_OTEL_RULE (did you mean MIXPANEL_OTEL_RULES?)" in result.stdout
    assert result.returncode == 0, result.stdout  # ignored, not fatal: the rest still delivers


# -- 12. one OpenTelemetry family ----------------------------------------------------------

CONSTRAINTS = os.path.join(ROOT, "constraints", "otel.txt")


def _pins(lines) -> dict[tuple[str, str], str]:
    """``(package, marker) -> version`` for each ``name==version; marker`` line."""
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        match = re.fullmatch(r"([\w.-]+)==([\w.]+)\s*;\s*(.+)", line)
        if match:
            marker = match.group(3).replace("'", '"').replace(" ", "")
            pins[(match.group(1), marker)] = match.group(2)
    return pins


def test_the_constraints_file_pins_the_test_extras_family():
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        extra = tomllib.load(handle)["project"]["optional-dependencies"]["test"]
    with open(CONSTRAINTS, encoding="utf-8") as handle:
        constraints = _pins(handle)
    tested = {key: v for key, v in _pins(extra).items() if key[0].startswith("opentelemetry-")}
    assert tested and all(constraints.get(key) == v for key, v in tested.items()), (
        tested,
        constraints,
    )
    for marker in {marker for _, marker in constraints}:
        family = {v for (_, m), v in constraints.items() if m == marker}
        core = {v for v in family if v.startswith("1.")}
        contrib = {v for v in family if v.startswith("0.")}
        assert len(core) == 1 and len(contrib) == 1, (marker, family)
        (core_version,) = core
        (contrib_version,) = contrib
        minor, patch = core_version.split(".")[1:]
        assert contrib_version == f"0.{int(minor) + 21}b{patch}", "contrib 0.(N+21)b<k>"


def test_the_docs_install_with_the_constraints_file():
    for path in ("README.md", "docs/opentelemetry.md"):
        with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
            text = handle.read()
        assert "-c /path/to/mixpanel-otel/constraints/otel.txt" in text, path


# -- 2. zero code with opentelemetry-distro alone --------------------------------------


def test_zero_code_defaults_leave_explicit_settings_alone():
    otlp_absent = {"OTEL_EXPORTER_OTLP_PROTOCOL": "no-such-protocol-so-grpc-is-looked-up"}
    mixpanel_only = {"OTEL_TRACES_EXPORTER": "mixpanel", **otlp_absent}
    defaults = zero_code_defaults(mixpanel_only, [])
    if defaults:  # the test venv has the OTLP exporter: nothing to default
        assert defaults == {"OTEL_METRICS_EXPORTER": "none", "OTEL_LOGS_EXPORTER": "none"}
    assert zero_code_defaults({"OTEL_TRACES_EXPORTER": "console"}, []) == {}
    explicit = {**mixpanel_only, "OTEL_LOGS_EXPORTER": "otlp", "OTEL_METRICS_EXPORTER": "otlp"}
    assert zero_code_defaults(explicit, []) == {}
    argv = ["--logs_exporter", "otlp", "--metrics_exporter=console", "python", "app.py"]
    assert zero_code_defaults(mixpanel_only, argv) == {}
    named_by_argument = ["--traces_exporter", "mixpanel", "python", "app.py"]
    assert zero_code_defaults({}, named_by_argument) == zero_code_defaults(mixpanel_only, [])
    after_the_command = ["python", "app.py", "--traces_exporter", "mixpanel"]
    assert zero_code_defaults({}, after_the_command) == {}


ZERO_CODE_APP = """
from opentelemetry import trace

tracer = trace.get_tracer("shop")
with tracer.start_as_current_span("upgrade") as span:
    span.set_attribute("mixpanel.group_key", "company")
    span.set_attribute("mixpanel.group_id", "acme")
    span.set_attribute("mixpanel.$set.plan", "pro")
"""


@pytest.fixture(scope="module")
def distro_venv(tmp_path_factory):
    """A fresh venv holding only this package (editable, its dependencies) and
    opentelemetry-distro, from the registry, pinned by constraints/otel.txt."""
    venv = tmp_path_factory.mktemp("distro-only") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "-q"]
    deps = [
        "requests>=2.32.4",
        "urllib3>=2.6.3",
        "structlog>=21.1",
        "tomli>=1.1; python_version<'3.11'",
    ]
    for step in (
        [*pip, "-c", CONSTRAINTS, "opentelemetry-distro", "setuptools>=77", *deps],
        [*pip, "--no-deps", "--no-build-isolation", "-e", ROOT],
    ):
        done = subprocess.run(step, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    return venv


@pytest.mark.slow
def test_zero_code_with_only_the_distro(distro_venv, sink, tmp_path):
    listed = subprocess.run(
        [str(distro_venv / "bin" / "python"), "-m", "pip", "list"], capture_output=True, text=True
    )
    assert "opentelemetry-exporter-otlp" not in listed.stdout, "the OTLP exporter is absent"
    (tmp_path / "app.py").write_text(ZERO_CODE_APP)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIXPANEL", "OTEL_", "PYTHON"))}
    env.update(MIXPANEL_TOKEN=TOKEN, MIXPANEL_API_HOST=sink.url, OTEL_TRACES_EXPORTER="mixpanel")
    command = [
        str(distro_venv / "bin" / "opentelemetry-instrument"),
        str(distro_venv / "bin" / "python"),
        "app.py",
    ]
    result = subprocess.run(
        command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "Failed to auto initialize" not in result.stderr, result.stderr
    assert sink.profile("company", "acme") == {"plan": "pro"}, result.stderr

    env["OTEL_LOGS_EXPORTER"] = "otlp"  # said by the user: kept, and fails as it would
    result = subprocess.run(
        command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert "Failed to auto initialize" in result.stderr, result.stderr
