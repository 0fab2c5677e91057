// node-postgres (pg) and postgres.js through authgres: each connects with a
// token as its password, over TLS and in the clear, and runs the checks of
// the compatibility suite. Started by tests/compat.rs; prints
// "N passed, N failed".
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { pipeline } from 'node:stream/promises';
import { Readable, Writable } from 'node:stream';
import pg from 'pg';
import copyStreams from 'pg-copy-streams';
import postgres from 'postgres';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const host = env('PGHOST');
const port = Number(env('PGPORT'));
const database = env('PGDATABASE');
const tokenA = env('AUTHGRES_TOKEN_A');
const tokenB = env('AUTHGRES_TOKEN_B');
const ca = fs.readFileSync(env('AUTHGRES_CA'), 'utf8');

const checks = [];
const check = (name, fn) => checks.push({ name, fn });

// ---- node-postgres --------------------------------------------------------

const pgConfig = (password, tls) => ({
  host, port, database, user: 'authenticated', password,
  ssl: tls ? { ca, servername: 'localhost' } : false,
});
async function withPg(password, tls, fn) {
  const client = new pg.Client(pgConfig(password, tls));
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end();
  }
}

for (const tls of [false, true]) {
  const mode = tls ? 'TLS' : 'plaintext';
  check(`pg ${mode}: token as password; simple and parameterised queries; RLS`, () =>
    withPg(tokenA, tls, async (c) => {
      assert.equal((await c.query('select auth.user_id() as me')).rows[0].me, 'user_alice');
      assert.equal((await c.query('select $1::int + 1 as n', [41])).rows[0].n, 42);
      await c.query("insert into todos (task) values ($1)", [`pg ${mode}`]);
      const owners = await c.query('select distinct user_id from todos');
      assert.deepEqual(owners.rows.map((r) => r.user_id), ['user_alice']);
    }));
}

check('pg: a bad token is an authentication error with a readable message', async () => {
  const client = new pg.Client(pgConfig('not-a-token', false));
  await assert.rejects(client.connect(), (e) => {
    assert.equal(e.code, '28P01');
    assert.match(e.message, /token/);
    return true;
  });
});

check('pg: a named prepared statement reused 200 times; a transaction rolled back', () =>
  withPg(tokenA, false, async (c) => {
    for (let i = 0; i < 200; i++) {
      const r = await c.query({ name: 'echo', text: 'select $1::int as i', values: [i] });
      assert.equal(r.rows[0].i, i);
    }
    const before = (await c.query('select count(*)::int as n from todos')).rows[0].n;
    await c.query('begin');
    await c.query("insert into todos (task) values ('rolled back')");
    await c.query('rollback');
    assert.equal((await c.query('select count(*)::int as n from todos')).rows[0].n, before);
  }));

check('pg: COPY FROM STDIN and COPY TO STDOUT', () =>
  withPg(tokenA, false, async (c) => {
    const lines = Array.from({ length: 1000 }, (_, i) => `copied ${i}\n`);
    await pipeline(Readable.from(lines), c.query(copyStreams.from('copy copy_target (task) from stdin')));
    let out = '';
    await pipeline(
      c.query(copyStreams.to("copy (select task from copy_target where task like 'copied %') to stdout")),
      new Writable({ write(chunk, _, done) { out += chunk; done(); } }),
    );
    assert.equal(out.split('\n').filter(Boolean).length, 1000);
  }));

check('pg: LISTEN/NOTIFY across two connections', () =>
  withPg(tokenA, false, (listener) => withPg(tokenB, false, async (notifier) => {
    await listener.query('listen authgres_channel');
    const got = new Promise((resolve) => listener.on('notification', resolve));
    await notifier.query("select pg_notify('authgres_channel', 'hello')");
    const message = await got;
    assert.equal(message.payload, 'hello');
  })));

check('pg: a 100k-row result', () =>
  withPg(tokenA, false, async (c) => {
    const r = await c.query('select i, md5(i::text) from generate_series(1, 100000) i');
    assert.equal(r.rows.length, 100000);
  }));

check('pg: query cancel and an error with its SQLSTATE', () =>
  withPg(tokenA, false, async (c) => {
    const sleeping = c.query('select pg_sleep(30)');
    await new Promise((r) => setTimeout(r, 300));
    const canceller = new pg.Client(pgConfig(tokenA, false));
    canceller.cancel(c, c.activeQuery);
    await assert.rejects(sleeping, (e) => e.code === '57014');
    await assert.rejects(c.query('select 1/0'), (e) => e.code === '22012');
  }));

// ---- postgres.js ------------------------------------------------------------

const sqlFor = (password, tls) => postgres({
  host, port, database, username: 'authenticated', password,
  ssl: tls ? { ca, servername: 'localhost' } : false,
  max: 2, onnotice: () => {},
});

for (const tls of [false, true]) {
  const mode = tls ? 'TLS' : 'plaintext';
  check(`postgres.js ${mode}: token as password; queries; RLS`, async () => {
    const sql = sqlFor(tokenB, tls);
    try {
      const [{ me }] = await sql`select auth.user_id() as me`;
      assert.equal(me, 'user_bob');
      const [{ n }] = await sql`select ${41}::int + 1 as n`;
      assert.equal(n, 42);
      await sql`insert into todos (task) values (${`postgres.js ${mode}`})`;
      const owners = await sql`select distinct user_id from todos`;
      assert.deepEqual(owners.map((r) => r.user_id), ['user_bob']);
    } finally {
      await sql.end();
    }
  });
}

check('postgres.js: a bad token is an authentication error', async () => {
  const sql = sqlFor('not-a-token', false);
  try {
    await assert.rejects(sql`select 1`, (e) => e.code === '28P01' && /token/.test(e.message));
  } finally {
    await sql.end();
  }
});

check('postgres.js: prepared statements reused, a transaction rolled back, COPY both ways', async () => {
  const sql = sqlFor(tokenB, false);
  try {
    for (let i = 0; i < 200; i++) {
      const [{ i: got }] = await sql`select ${i}::int as i`;
      assert.equal(got, i);
    }
    const [{ before }] = await sql`select count(*)::int as before from todos`;
    await assert.rejects(sql.begin(async (tx) => {
      await tx`insert into todos (task) values ('rolled back')`;
      throw new Error('roll back');
    }));
    const [{ after }] = await sql`select count(*)::int as after from todos`;
    assert.equal(after, before);
    const writable = await sql`copy copy_target (task) from stdin`.writable();
    await pipeline(Readable.from(['b1\n', 'b2\n']), writable);
    const readable = await sql`copy (select task from copy_target where task like 'b_' order by task) to stdout`.readable();
    let out = '';
    for await (const chunk of readable) out += chunk;
    assert.equal(out, 'b1\nb2\n');
  } finally {
    await sql.end();
  }
});

check('postgres.js: LISTEN/NOTIFY, 100k rows, cancel, SQLSTATE', async () => {
  const sql = sqlFor(tokenB, false);
  try {
    const got = new Promise((resolve) => sql.listen('pjs_channel', resolve));
    await new Promise((r) => setTimeout(r, 200));
    await sql.notify('pjs_channel', 'hi');
    assert.equal(await got, 'hi');
    const rows = await sql`select i from generate_series(1, 100000) i`;
    assert.equal(rows.length, 100000);
    const sleeping = sql`select pg_sleep(30)`;
    setTimeout(() => sleeping.cancel(), 300);
    await assert.rejects(sleeping, (e) => e.code === '57014');
    await assert.rejects(sql`select 1/0`, (e) => e.code === '22012');
  } finally {
    await sql.end();
  }
});

let passed = 0;
let failed = 0;
for (const { name, fn } of checks) {
  try {
    await fn();
    passed++;
    console.log(`ok   ${name}`);
  } catch (error) {
    failed++;
    console.log(`FAIL ${name}\n     ${String(error?.stack ?? error).split('\n').join('\n     ')}`);
  }
}
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
