"""The processor's status page (`/`), looked at in a real browser (tests/browser.py).

After a known set of orders, the totals on the page equal `/stats/global`, the dead letters
equal the analyzer's `/report`, each trace id links to that trace in the Jaeger UI, a page
opened after the orders stopped draws their throughput at once (the processor keeps the
history), no table is cut off at 1400 px, nothing on the page fails to load, and the browser's
console has no error. The screenshot stays in target/test-logs/status-page.png.
"""

import pathlib
import signal
import subprocess
import sys
import urllib.request

from confluent_kafka import Producer

from test_confluent import BIN, BOOTSTRAP, ROOT, create_topic, free_port, service_env, unique

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from browser import browser, card, clipped, loaded, rows, text, trace_links  # noqa: E402
from support import get_json, wait_for  # noqa: E402

SCREENSHOT = ROOT / "target" / "test-logs" / "status-page.png"
# traces to the native stack's Jaeger (spans are made at the info level), so that dead letters
# carry trace ids
TRACED = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "RUST_LOG": "info,rdkafka=warn"}
# the stack's Jaeger has the query API and no UI (make stack-up says so): the links are checked
# by the trace they name, which its API must hold
JAEGER = "http://127.0.0.1:16686"


def test_the_status_page_shows_the_groups_totals_and_the_dead_letters():
    topic = unique("page-orders")
    create_topic(topic, 3)
    create_topic(topic + "-dlq", 1)
    ports = {"processor": free_port(), "analyzer": free_port()}
    analyzer = subprocess.Popen(
        [BIN / "dlq-analyzer"], env=service_env(topic, HTTP_PORT=ports["analyzer"], CONSUMER_GROUP=unique("page-analyzer"), **TRACED),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    processor = subprocess.Popen(
        [BIN / "order-processor"],
        env=service_env(topic, HTTP_PORT=ports["processor"], CONSUMER_GROUP=unique("page-processor"),
                        TRANSIENT_FAILURE_RATE="0.2", RETRY_INITIAL_BACKOFF_MS="20",
                        ANALYZER_URL=f"http://127.0.0.1:{ports['analyzer']}", JAEGER_UI_URL=JAEGER + "/",
                        **TRACED),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    driver = None
    try:
        for p in ports.values():
            wait_for("ready", lambda p=p: urllib.request.urlopen(f"http://127.0.0.1:{p}/readyz", timeout=2).status == 200, 60)
        driver = browser()
        # ten seconds of orders: the processor notes its throughput every 5 s
        run = subprocess.run([BIN / "order-generator"],
                             env=service_env(topic, ORDER_COUNT=150, ORDER_RATE=15, INVALID_ORDER_RATIO=0.1,
                                             HTTP_PORT=free_port(), **TRACED),
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr + run.stdout
        producer = Producer({"bootstrap.servers": BOOTSTRAP})
        producer.produce(topic, key="garbage", value=b"not an order")
        assert producer.flush(30) == 0

        total = 151
        stats = wait_for("every record settled", lambda: (
            s if (s := get_json(ports["processor"], "/stats/global"))["processed"] + s["dead_lettered"] == total else None), 120)
        report = wait_for("the analyzer's report", lambda: (
            r if (r := get_json(ports["analyzer"], "/report"))["total"] == stats["dead_lettered"] else None), 60)
        assert stats["dead_lettered"] >= 1  # the garbage at least
        # the page is opened only now, after the orders: it draws their throughput from the
        # processor's history at its first answer
        driver.get(f"http://127.0.0.1:{ports['processor']}/")
        wait_for("the page's first answer", lambda: loaded(driver), 30)
        first = text(driver, "#rate")
        assert first.startswith("now ") and "top of the chart 1 orders/s" not in first, first
        # and the line is drawn across the chart, not squeezed into its last pixels
        drawn = driver.execute_script("return document.querySelector('#throughput polyline').getBBox().width;")
        assert drawn > 300, f"the throughput line spans {drawn} of 600"
        # the page polls every 2 s
        wait_for("the page to show the final figures", lambda: (
            int(card(driver, "processed")) == stats["processed"]
            and text(driver, "#dead-total").replace(",", "") == str(report["total"])), 30)
        assert clipped(driver) == [], "cut off at their right edge"
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(SCREENSHOT))

        assert int(card(driver, "processed")) == stats["processed"]
        assert card(driver, "revenue") == f"{stats['revenue']:.2f}"
        assert card(driver, "average") == f"{stats['average']:.2f}"
        assert card(driver, "min") == f"{stats['min']:.2f}"
        assert card(driver, "max") == f"{stats['max']:.2f}"
        assert int(card(driver, "dead-lettered")) == stats["dead_lettered"]
        assert int(card(driver, "retries")) == stats["retries"]

        cells = [[c.replace(",", "") for c in row] for row in rows(driver, "#partitions tbody tr")]
        assert len(cells) == 3, cells
        # partition, committed, end, lag, in flight, processed, retries, dead letters
        assert sum(int(c[5]) for c in cells) == stats["processed"]
        assert all(c[3] == "0" and c[4] == "0" for c in cells), cells  # nothing left once all is committed

        assert text(driver, "#dead-total").replace(",", "") == str(report["total"])
        assert text(driver, "#failed-value") == f"${report['failed_value']:,.2f}"
        kinds = {row[0]: int(row[1]) for row in rows(driver, "#kinds tbody tr")}
        assert kinds == report["by_kind"]
        recent = rows(driver, "#recent tbody tr")
        assert len(recent) == len(report["recent"])
        shown = {row[5] for row in recent}
        assert shown == {f.get("trace_id") or "–" for f in report["recent"]}
        # every dead letter but the garbage (which no producer of ours wrote) carries its trace
        traced = [t for t in shown if len(t) == 32]
        assert len(traced) >= len(report["recent"]) - 1
        # each trace id is a link to its trace in the Jaeger UI, and Jaeger holds that trace
        links = trace_links(driver)
        assert links == {t: f"{JAEGER}/trace/{t}" for t in traced}, links
        # an order's (the garbage's trace begins at the processor): all three services in it
        order = next(f["trace_id"] for f in report["recent"] if f.get("trace_id") and f.get("key") != "garbage")
        services = wait_for("the linked trace in Jaeger, with the analyzer's span", lambda: (
            s if {"order-generator", "order-processor", "dlq-analyzer"} <= (s := {
                p["serviceName"] for p in get_json(16686, f"/api/traces/{order}")["data"][0]["processes"].values()})
            else None), 30)
        assert links[order] == f"{JAEGER}/trace/{order}", services

        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors
        assert text(driver, "#global-error") == ""
        assert text(driver, "#dead-error") == ""
    finally:
        if driver is not None:
            driver.quit()
        for proc in (processor, analyzer):
            proc.send_signal(signal.SIGTERM)
        for proc in (processor, analyzer):
            proc.wait(timeout=30)
