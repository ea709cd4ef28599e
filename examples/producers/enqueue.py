#!/usr/bin/env python3
"""Enqueues COUNT pgbus jobs on QUEUE with one SQL statement, from Python with psycopg 3.

    pip install 'psycopg[binary]'
    DATABASE_URL=postgres://app@db/app python3 enqueue.py QUEUE COUNT

The database comes from DATABASE_URL (never an argument, so a password in it stays out of
process listings). Each job's payload is {"n": 1..COUNT, "producer": "python"}, JSON that a
typed Rust handler decodes. Prints the job ids, one per line, in send order.
"""

import os
import sys

import psycopg
from psycopg.types.json import Jsonb


def fail(message: str) -> None:
    print(f"enqueue.py: {message}", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    if len(sys.argv) != 3:
        fail("usage: DATABASE_URL=... python3 enqueue.py QUEUE COUNT")
    queue, count = sys.argv[1], sys.argv[2]
    if not count.isdigit():
        fail(f"COUNT must be a whole number, got {count!r}")
    url = os.environ.get("DATABASE_URL")
    if not url:
        fail("set DATABASE_URL to the database pgbus was migrated in")
    payloads = [Jsonb({"n": n, "producer": "python"}) for n in range(1, int(count) + 1)]
    try:
        with psycopg.connect(url, application_name="enqueue.py") as conn:
            # One statement for the whole batch (a list of Jsonb is a jsonb[]); options go
            # by name, as in psql. The connection's transaction commits on leaving `with`.
            rows = conn.execute(
                "SELECT id FROM pgbus.send_batch(%s, %s, headers => %s) AS id",
                (queue, payloads, Jsonb({"producer": "python"})),
            ).fetchall()
    except psycopg.Error as err:
        # pgbus's refusals are one line (a bad queue name, a missing queue, a bad option).
        diag = getattr(err, "diag", None)
        fail((diag and diag.message_primary) or str(err).splitlines()[0])
    for (job_id,) in rows:
        print(job_id)


if __name__ == "__main__":
    main()
