// Enqueues COUNT pgbus jobs on QUEUE with one SQL statement, from Node.js with `pg`:
//
//     cd examples/producers && npm ci
//     DATABASE_URL=postgres://app@db/app node enqueue.mjs QUEUE COUNT
//
// The database comes from DATABASE_URL (never an argument, so a password in it stays out of
// process listings). Each job's payload is {"n": 1..COUNT, "producer": "node"}, JSON that a
// typed Rust handler decodes. Prints the job ids, one per line, in send order.
import pg from 'pg';

function fail(message) {
  console.error(`enqueue.mjs: ${message}`);
  process.exit(1);
}

const [queue, countArg, ...extra] = process.argv.slice(2);
if (queue === undefined || countArg === undefined || extra.length > 0) {
  fail('usage: DATABASE_URL=... node enqueue.mjs QUEUE COUNT');
}
if (!/^[0-9]+$/.test(countArg)) {
  fail(`COUNT must be a whole number, got ${JSON.stringify(countArg)}`);
}
const count = Number(countArg);
const url = process.env.DATABASE_URL;
if (!url) {
  fail('set DATABASE_URL to the database pgbus was migrated in');
}

const client = new pg.Client({ connectionString: url, application_name: 'enqueue.mjs' });
try {
  await client.connect();
  // One statement for the whole batch; `pg` sends each array element as the text of a JSON
  // value, and the cast makes them a jsonb[]. Options go by name, as in psql.
  const payloads = Array.from({ length: count }, (_, i) =>
    JSON.stringify({ n: i + 1, producer: 'node' }),
  );
  const { rows } = await client.query(
    `SELECT id FROM pgbus.send_batch($1, $2::jsonb[], headers => $3) AS id`,
    [queue, payloads, JSON.stringify({ producer: 'node' })],
  );
  for (const row of rows) {
    console.log(row.id);
  }
} catch (err) {
  // pgbus's refusals are one line (a bad queue name, a missing queue, a bad option).
  fail(err.message);
} finally {
  await client.end().catch(() => {});
}
