"""Helpers the Python tests share (tests/interop, tests/images): waiting with a bound, and
asking a service's HTTP endpoints."""

import json
import socket
import time
import urllib.request
import uuid


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(where, path):
    """`path`'s JSON from a port on 127.0.0.1, or from "host:port" (a pod of the local cluster)."""
    address = where if isinstance(where, str) and ":" in where else f"127.0.0.1:{where}"
    with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as r:
        return json.load(r)


def wait_for(what, predicate, timeout):
    """`predicate()`'s first truthy answer, asked every 0.3 s for at most `timeout` seconds;
    connection errors and bad JSON count as not yet."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except (OSError, ValueError) as e:
            last = e
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")
