"""MixpanelGroupHandler and MixpanelGroupProcessor.

Translation and front-end behaviour run against the in-memory ``memory``
memory; what needs real HTTP or a real process (the root logger with urllib3's
own debug records) runs against the real one.
"""

from __future__ import annotations

import logging
import logging.config
import threading

import pytest
import structlog

from mixpanel_otel import MixpanelGroupHandler, MixpanelGroupProcessor

from .conftest import TOKEN
from .helpers import run_script


@pytest.fixture
def group_logger(memory, make_consumer):
    consumer = make_consumer(memory, flush_interval=60)
    handler = MixpanelGroupHandler(consumer=consumer)
    log = logging.getLogger(f"test.group.{id(handler)}")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    log.addHandler(handler)
    yield log, handler, consumer
    log.removeHandler(handler)


def g(group_id="acme", **ops):
    return {"group_key": "company", "group_id": group_id, **{f"${k}": v for k, v in ops.items()}}


def test_every_operation_through_the_handler(memory, group_logger):
    log, handler, consumer = group_logger
    log.info("g", extra=g(set={"plan": "free", "seats": 3}))
    log.info("g", extra=g(set_once={"plan": "no", "first": "2024"}))
    log.info("g", extra=g(union={"tags": ["a", "b"], "regions": "eu"}))
    log.info("g", extra=g(remove={"tags": "a"}))
    log.info("g", extra=g(unset=["seats"]))
    log.info("g", extra=g("gone", set={"x": 1}))
    log.info("g", extra=g("gone", delete=True))
    handler.flush()
    assert memory.profile("company", "acme") == {
        "plan": "free",
        "first": "2024",
        "tags": ["b"],
        "regions": ["eu"],
    }
    assert memory.profile("company", "gone") is None


def test_several_operations_in_one_record_are_sent_in_order(memory, group_logger):
    log, handler, consumer = group_logger
    log.info("g", extra=g(set={"plan": "pro"}, set_once={"plan": "first"}, unset=["plan"]))
    handler.flush()
    assert "plan" not in (memory.profile("company", "acme") or {})
    ops = [u["op"] for u in memory.updates("company", "acme")]
    assert ops == ["$set_once", "$set", "$unset"]
    log.info("g", extra=g(set={"plan": "x"}, delete=True))
    handler.flush()
    assert [u["op"] for u in memory.updates("company", "acme")][-1] == "$delete"


def test_meta_keys_are_merged(memory, group_logger):
    log, handler, consumer = group_logger
    log.info("g", extra={**g(set={"plan": "pro"}), "$time": 1700000000.5, "$ignore_time": True})
    handler.flush()
    (update,) = memory.updates("company", "acme")
    assert update["time"] == 1700000000.5


def test_untagged_records_are_ignored(memory, group_logger):
    log, handler, consumer = group_logger
    log.info("plain")
    log.info("half", extra={"group_key": "company"})
    log.info("other half", extra={"group_id": "acme"})
    handler.flush()
    stats = consumer.stats()
    assert stats["enqueued"] == 0 and stats["invalid"] == 0
    assert memory.profiles() == []


def test_bad_records_never_raise_and_never_cost_the_others(memory, group_logger, caplog):
    log, handler, consumer = group_logger
    log.info("ok1", extra=g("a", set={"n": 1}))
    log.info("bad", extra=g("b", set="not a dict"))
    log.info("bad", extra=g(["list id"], set={"n": 1}))
    log.info("bad", extra=g("c", unset="plan"))
    log.info("tags only", extra=g("d"))  # no operation: ignored, not invalid
    log.info("bad", extra=g("e", set={"x": float("nan")}))
    log.info("ok2", extra=g("f", set={"n": 2}))
    handler.flush()
    assert [p["group_id"] for p in memory.profiles()] == ["a", "f"]
    assert consumer.stats()["invalid"] == 4
    assert consumer.stats()["ignored"] == 1
    warnings = [r for r in caplog.records if r.name == "mixpanel_otel"]
    assert len(warnings) == 1, "rate-limited to one warning per 10 s"
    assert "'bad'" in warnings[0].getMessage() and "$set" in warnings[0].getMessage()


def test_dict_config(memory, make_consumer):
    make_consumer(memory, flush_interval=60)
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "handlers": {
                "mixpanel": {
                    "class": "mixpanel_otel.MixpanelGroupHandler",
                    "token": TOKEN,
                    "api_host": memory.url,
                    "level": "INFO",
                }
            },
            "loggers": {"dictconfigured": {"handlers": ["mixpanel"], "propagate": False}},
        }
    )
    log = logging.getLogger("dictconfigured")
    log.setLevel(logging.DEBUG)
    log.debug("below level", extra=g("skipped", set={"x": 1}))
    log.info("g", extra=g(set={"via": "dictConfig"}))
    (handler,) = log.handlers
    handler.flush()
    assert memory.profiles() == [
        {"group_key": "company", "group_id": "acme", "properties": {"via": "dictConfig"}}
    ]
    log.removeHandler(handler)


def test_file_config(memory, make_consumer, tmp_path):
    make_consumer(memory, flush_interval=60)
    config = tmp_path / "logging.ini"
    config.write_text(
        f"""
[loggers]
keys=root,fileconfigured
[handlers]
keys=mixpanel
[formatters]
keys=
[logger_root]
handlers=
[logger_fileconfigured]
qualname=fileconfigured
handlers=mixpanel
propagate=0
level=INFO
[handler_mixpanel]
class=mixpanel_otel.MixpanelGroupHandler
args=()
kwargs={{"token": "{TOKEN}", "api_host": "{memory.url}"}}
"""
    )
    logging.config.fileConfig(config, disable_existing_loggers=False)
    log = logging.getLogger("fileconfigured")
    log.info("g", extra=g(set={"via": "fileConfig"}))
    (handler,) = log.handlers
    handler.flush()
    assert memory.profile("company", "acme") == {"via": "fileConfig"}
    log.removeHandler(handler)


def test_eight_threads_of_records_arrive_exactly_once(memory, make_consumer):
    consumer = make_consumer(memory, flush_interval=0.05)
    handler = MixpanelGroupHandler(consumer=consumer)
    log = logging.getLogger("test.threads")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(handler)

    def work(thread):
        for i in range(2000):
            log.info("g", extra=g(f"t{thread}", union={"seen": [i]}, set={f"last{i % 7}": i}))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    handler.flush()
    log.removeHandler(handler)
    for thread in range(8):
        props = memory.profile("company", f"t{thread}")
        assert sorted(props["seen"]) == list(range(2000))
        assert {props[f"last{k}"] for k in range(7)} == {
            max(i for i in range(2000) if i % 7 == k) for k in range(7)
        }
    stats = consumer.stats()
    assert stats["enqueued"] == 32000 and stats["sent"] + stats["coalesced"] == 32000
    assert stats["pending"] == 0 and stats["failed"] == 0


@pytest.mark.slow
def test_root_handler_at_debug_with_http_debug_neither_loops_nor_deadlocks(sink):
    result, _ = run_script(
        """
        import logging, http.client
        from mixpanel_otel import MixpanelGroupHandler, get_consumer
        http.client.HTTPConnection.debuglevel = 1
        logging.basicConfig(level=logging.DEBUG)
        logging.getLogger("urllib3").setLevel(logging.DEBUG)
        handler = MixpanelGroupHandler(flush_interval=0.02)
        logging.getLogger().addHandler(handler)
        log = logging.getLogger("app")
        for i in range(300):
            log.debug("g", extra={"group_key": "company", "group_id": f"c{i % 3}",
                                   "$set": {"i": i}})
            log.warning("g", extra={"group_key": "company", "group_id": "bad", "$set": "x"})
        assert handler.consumer.flush(10)
        stats = handler.consumer.stats()
        print("STATS", stats)
        assert stats["invalid"] == 300, stats
        assert stats["failed"] == 0 and stats["errors"] == 0, stats
        """,
        sink,
        timeout=60,  # a loop or a deadlock ends here
    )
    # The worker's requests ran with http.client's debug output on (it prints, it does not log).
    assert "send: b'POST /groups" in result.stdout, result.stdout[-2000:]
    assert sorted(p["group_id"] for p in sink.profiles()) == ["c0", "c1", "c2"]
    assert sink.profile("company", "c2") == {"i": 299}


# -- structlog ---------------------------------------------------------------------------


def test_structlog_processor_every_operation_and_rendering(memory, make_consumer):
    consumer = make_consumer(memory, flush_interval=60)
    rendered = []
    structlog.configure(
        processors=[
            MixpanelGroupProcessor(consumer=consumer),
            lambda logger, name, event_dict: rendered.append(dict(event_dict)) or "",
        ],
        logger_factory=structlog.ReturnLoggerFactory(),
        cache_logger_on_first_use=False,
    )
    log = structlog.get_logger()
    log.info("g", **g(set={"plan": "free"}))
    log.info("g", **g(set_once={"first": "2024"}, union={"tags": ["a", "b"]}))
    log.info("g", **g(remove={"tags": "a"}))
    log.info("g", **g(unset=["first"]))
    log.info("plain", user="ann")
    log.info("bad", **g(set=["oops"]))
    assert consumer.flush(10)
    assert memory.profile("company", "acme") == {"plan": "free", "tags": ["b"]}
    assert rendered[0]["$set"] == {"plan": "free"} and rendered[0]["event"] == "g"
    assert rendered[4] == {"event": "plain", "user": "ann"}
    assert consumer.stats()["invalid"] == 1
    structlog.reset_defaults()


def test_structlog_strip_and_processor_formatter(memory, make_consumer):
    consumer = make_consumer(memory, flush_interval=60)
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    keep = Keep()
    keep.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.JSONRenderer(),
            ]
        )
    )
    std = logging.getLogger("test.structlog.pf")
    std.propagate = False
    std.setLevel(logging.INFO)
    std.addHandler(keep)
    # A stdlib group handler on the same logger must not send a second time.
    std.addHandler(MixpanelGroupHandler(consumer=consumer))
    structlog.configure(
        processors=[
            MixpanelGroupProcessor(consumer=consumer, strip=True),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=lambda *a: std,
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    structlog.get_logger().info("upgrade", **g(set={"plan": "pro"}), user="ann")
    assert consumer.flush(10)
    assert memory.profile("company", "acme") == {"plan": "pro"}
    assert consumer.stats()["enqueued"] == 1
    assert records == ['{"user": "ann", "event": "upgrade"}']
    structlog.reset_defaults()
