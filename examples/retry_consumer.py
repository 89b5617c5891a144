"""Retries with backoff, then a dead-letter queue: a consumer posting webhooks to a flaky
HTTP server.

Run it: ``python examples/retry_consumer.py`` (a few seconds; creates a temporary spool
and a local HTTP server, prints what happens, exits 0).

- ``/flaky`` fails twice (HTTP 503), then accepts: that hook is delivered on its 3rd try.
- ``/down`` always fails: after ``max_attempts`` failures that hook lands in ``dead``,
  with its metadata and data untouched, for a person (``multispool ls SPOOL dead``).
"""

from __future__ import annotations

import enum
import http.server
import logging
import tempfile
import threading
import time
import urllib.error
import urllib.request

import msgspec

import multispool


class Queue(enum.Enum):
    OUTGOING = "outgoing"
    DEAD = "dead"


class Hook(msgspec.Struct):
    url: str


class FlakyHandler(http.server.BaseHTTPRequestHandler):
    calls: dict[str, int] = {}  # noqa: RUF012 - shared by the server's handler instances

    def do_POST(self) -> None:
        n = self.calls[self.path] = self.calls.get(self.path, 0) + 1
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        ok = self.path == "/flaky" and n > 2
        self.send_response(200 if ok else 503)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet


def post(hook: Hook, data: multispool.DataFile[bytes]) -> multispool.Remove:
    """Deliver one hook; any exception (a refused connection, a 5xx) means: try later."""
    req = urllib.request.Request(hook.url, data=data.load(), method="POST")
    with urllib.request.urlopen(req, timeout=5):
        pass
    print(f"{time.strftime('%X')} delivered {hook.url}")
    return multispool.REMOVE


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FlakyHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"

    with tempfile.TemporaryDirectory() as tmp:
        spool = multispool.Spool.create(f"{tmp}/spool", multispool.Spoolable(queues=Queue, metadata=Hook))
        flaky = spool.enqueue(Queue.OUTGOING, Hook(f"{base}/flaky"), b'{"event": "paid"}')
        down = spool.enqueue(Queue.OUTGOING, Hook(f"{base}/down"), b'{"event": "refunded"}')

        # Short delays so the example runs in a second or two; a real service would use
        # something like first=1.0, max=600.0, max_attempts=8.
        policy = multispool.Backoff(
            first=0.1, factor=2.0, max=5.0, jitter=0.1, max_attempts=4, dead_letter=Queue.DEAD
        )
        stop = threading.Event()

        def settled() -> bool:
            # /down dead-lettered, and /flaky past its last (successful) call and removed.
            # "Nothing in outgoing" alone is not enough: a hook going back to the queue
            # after a failed attempt can leave the checkouts between the two listings
            # below and be missed by both, and the consumer would stop before its last
            # attempt. After its final call, /flaky stays checked out until removed.
            return (
                bool(spool.list(Queue.DEAD))
                and FlakyHandler.calls.get("/flaky", 0) >= 3
                and not spool.list_checkouts_unsafe(Queue.OUTGOING)
                and not spool.list(Queue.OUTGOING)
            )

        def until_settled() -> None:
            while not settled():
                time.sleep(0.05)
            stop.set()

        watcher = threading.Thread(target=until_settled)
        watcher.start()
        with spool.reader(Queue.OUTGOING) as reader:
            reader.iter(post, stop=stop, on_error=policy)
        watcher.join()

        dead = spool.list(Queue.DEAD)
        assert [e.name for e in dead] == [down.name], dead
        entry = dead[0]
        print(f"dead-lettered {entry.direct.contents().url} after {entry.attempts()} attempts;"
              f" data kept: {entry.direct.data_file().load()!r}")
        print(f"server saw: {FlakyHandler.calls}")
        assert FlakyHandler.calls == {"/flaky": 3, "/down": 4}
        assert not spool.list(Queue.OUTGOING) and flaky.name not in {e.name for e in dead}
    server.shutdown()
    server.server_close()


if __name__ == "__main__":
    main()
