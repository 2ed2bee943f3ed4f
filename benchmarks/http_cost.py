"""CPU per request of the transport against urllib3 and bare http.client.

    python benchmarks/http_cost.py [rounds]

Posts 200-message bodies (about 40 KB, what a batch is) to the local sink in
its own process, each variant ten requests a round, interleaved, and prints
the median and the lowest CPU ms per request (``time.process_time``).
"""

from __future__ import annotations

import http.client
import json
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import quote_plus

import urllib3

sys.path.insert(0, str(Path(__file__).parent))

from bench import SinkProcess  # noqa: E402

from mixpanel_otel._transport import Transport  # noqa: E402

HEADERS = {"Content-Type": "application/x-www-form-urlencoded", "User-Agent": "bench"}


def bodies(count: int) -> list[str]:
    return [
        "data="
        + quote_plus(
            json.dumps(
                [
                    {
                        "$token": "t",
                        "$time": 1.0,
                        "$group_key": "company",
                        "$group_id": f"h-{i}-{j}",
                        "$set": {"plan": "pro", "i": j},
                    }
                    for j in range(200)
                ]
            )
        )
        + "&verbose=1&ip=0"
        for i in range(count)
    ]


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 25
    sink = SinkProcess()
    try:
        transport = Transport(sink.url, 10)
        manager = urllib3.PoolManager()
        timeout = urllib3.Timeout(total=10)
        bare = http.client.HTTPConnection("127.0.0.1", sink.port, timeout=10)

        def bare_post(body: str) -> None:
            bare.request("POST", "/groups", body.encode(), HEADERS)
            bare.getresponse().read()

        variants = {
            "Transport.post (http.client, this package)": lambda b: transport.post("/groups", b),
            "urllib3 PoolManager.request (the transport before)": lambda b: manager.request(
                "POST",
                sink.url + "/groups",
                body=b.encode(),
                headers=HEADERS,
                retries=False,
                redirect=False,
                timeout=timeout,
            ),
            "bare http.client": bare_post,
        }
        posts = iter(bodies(rounds * 10 * len(variants) + len(variants)))
        for post in variants.values():
            post(next(posts))  # connect first
        cpu: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, post in variants.items():
                started = time.process_time()
                for _ in range(10):
                    post(next(posts))
                cpu[name].append((time.process_time() - started) / 10 * 1000)
        print("| variant | median CPU ms per request | lowest |\n|---|---|---|")
        for name, values in cpu.items():
            print(f"| {name} | {statistics.median(values):.3f} | {min(values):.3f} |")
    finally:
        sink.stop()


if __name__ == "__main__":
    main()
