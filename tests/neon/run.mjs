// Runs the real @neondatabase/serverless driver against authgres.
// Started by tests/neon.rs with the stack's addresses and tokens in the
// environment; prints one line per check and "N passed, N failed".
import assert from 'node:assert/strict';
import ws from 'ws';
import { neon, neonConfig, Pool, NeonDbError } from '@neondatabase/serverless';
import { neon as neon010, neonConfig as neonConfig010 } from 'neon-0-10';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const HTTP_URL = env('AUTHGRES_HTTP_URL');
const HTTP_HOSTPORT = new URL(HTTP_URL).host;
const PG_HOSTPORT = env('AUTHGRES_PG_HOSTPORT');
const DATABASE_AUTHENTICATED_URL = `postgresql://authenticated@${PG_HOSTPORT}/app`;
const TOKEN_A = env('AUTHGRES_TOKEN_A');
const TOKEN_B = env('AUTHGRES_TOKEN_B');

// The only change an app makes: where the driver sends its requests.
neonConfig.fetchEndpoint = HTTP_URL;
neonConfig010.fetchEndpoint = HTTP_URL;
// WebSocket: plain ws:// to the proxy's /v2, the Postgres protocol inside.
neonConfig.webSocketConstructor = ws;
neonConfig.wsProxy = () => `${HTTP_HOSTPORT}/v2`;
neonConfig.useSecureWebSocket = false;
neonConfig.pipelineTLS = false;
neonConfig.pipelineConnect = 'password';

const checks = [];
const check = (name, fn) => checks.push({ name, fn });

const sqlFor = (token) =>
  neon(DATABASE_AUTHENTICATED_URL, { authToken: async () => token });

check('setup: each user inserts todos', async () => {
  const a = sqlFor(TOKEN_A);
  const b = sqlFor(TOKEN_B);
  await a`insert into todos (task) values ('alice one'), ('alice two')`;
  await b`insert into todos (task) values ('bob one')`;
});

check('the seed TodoList code, verbatim, with driver 0.10 (sql(...) call shape)', async () => {
  // From seed/clerk-neon-authorize.txt, with auth().getToken() returning the token.
  const auth = () => ({ getToken: async () => TOKEN_A });
  async function TodoList() {
    const sql = neon010(DATABASE_AUTHENTICATED_URL, {
      authToken: async () => {
        const token = await auth().getToken();
        if (!token) {
          throw new Error('No token');
        }
        return token;
      },
    });
    // WHERE filter is optional because of RLS.
    // But we send it anyway for performance reasons.
    const todos = await sql('select * from todos where user_id = auth.user_id()');
    return todos;
  }
  const todos = await TodoList();
  assert.deepEqual(todos.map((t) => t.task).sort(), ['alice one', 'alice two']);
  assert.ok(todos.every((t) => t.user_id === 'user_alice'));
});

check('TodoList query with driver 1.x and an async authToken: only the caller\'s rows', async () => {
  const sql = sqlFor(TOKEN_B);
  const todos = await sql.query('select * from todos where user_id = auth.user_id()');
  assert.deepEqual(todos.map((t) => t.task), ['bob one']);
  const all = await sql`select * from todos`;
  assert.deepEqual(all.map((t) => t.user_id), ['user_bob'], 'RLS hides the other user');
});

check('a parameterised query with int, text, jsonb, timestamptz, arrays and null', async () => {
  const sql = sqlFor(TOKEN_A);
  const when = new Date('2024-02-29T12:34:56.789Z');
  const [row] = await sql.query(
    'select $1::int as i, $2::text as t, $3::jsonb as j, $4::timestamptz as ts, ' +
      '$5::int[] as a, $6::text[] as ta, $7::text as n, $8::bigint as big, $9::bool as b',
    [42, "it's \"quoted\"", { k: [1, 'two'], n: null }, when, [1, 2, 3], ['x,y', 'z'], null, '9007199254740993', true],
  );
  assert.equal(row.i, 42);
  assert.equal(row.t, "it's \"quoted\"");
  assert.deepEqual(row.j, { k: [1, 'two'], n: null });
  assert.ok(row.ts instanceof Date);
  assert.equal(row.ts.getTime(), when.getTime());
  assert.deepEqual(row.a, [1, 2, 3]);
  assert.deepEqual(row.ta, ['x,y', 'z']);
  assert.equal(row.n, null);
  assert.equal(row.big, '9007199254740993');
  assert.equal(row.b, true);
});

check('full results carry fields, command and rowCount', async () => {
  const sql = neon(DATABASE_AUTHENTICATED_URL, { authToken: TOKEN_A, fullResults: true });
  const result = await sql`select auth.user_id() as me, 1::int2 as small`;
  assert.equal(result.command, 'SELECT');
  assert.equal(result.rowCount, 1);
  assert.deepEqual(result.fields.map((f) => f.name), ['me', 'small']);
  assert.deepEqual(result.fields.map((f) => f.dataTypeID), [25, 21]);
  assert.deepEqual(result.rows, [{ me: 'user_alice', small: 1 }]);
});

check('a batch transaction with isolation level and read-only options', async () => {
  const sql = sqlFor(TOKEN_A);
  const [inserted, counted, me] = await sql.transaction(
    (tx) => [
      tx`insert into todos (task) values ('alice in a batch') returning task`,
      tx`select count(*)::int as n from todos`,
      tx`select auth.user_id() as me, current_setting('transaction_isolation') as iso`,
    ],
    { isolationLevel: 'Serializable' },
  );
  assert.equal(inserted[0].task, 'alice in a batch');
  assert.equal(counted[0].n, 3);
  assert.deepEqual(me[0], { me: 'user_alice', iso: 'serializable' });
  const [ro] = await sql.transaction([sql`select current_setting('transaction_read_only') as ro`], {
    readOnly: true,
  });
  assert.equal(ro[0].ro, 'on');
});

check('a failing statement rolls the whole batch back', async () => {
  const sql = sqlFor(TOKEN_A);
  await assert.rejects(
    sql.transaction([sql`insert into todos (task) values ('never kept')`, sql`select 1/0`]),
    (e) => e instanceof NeonDbError && e.code === '22012',
  );
  const rows = await sql`select count(*)::int as n from todos where task = 'never kept'`;
  assert.equal(rows[0].n, 0);
});

check('an insert that RLS refuses surfaces as a NeonDbError with its SQLSTATE', async () => {
  const sql = sqlFor(TOKEN_B);
  await assert.rejects(
    sql`insert into todos (user_id, task) values ('user_alice', 'forged')`,
    (e) => {
      assert.ok(e instanceof NeonDbError, `not a NeonDbError: ${e}`);
      assert.equal(e.code, '42501');
      assert.match(e.message, /row-level security/);
      assert.equal(e.severity, 'ERROR');
      return true;
    },
  );
});

check('a bad or missing token is refused with its SQLSTATE, as Neon answers (HTTP 400)', async () => {
  // The driver reads a structured error only from a 400 body: a refused
  // login must be one, or err.code is lost (issue 21).
  const sql = neon(DATABASE_AUTHENTICATED_URL, { authToken: 'not-a-token' });
  await assert.rejects(sql`select 1`, (e) => {
    assert.ok(e instanceof NeonDbError, `not a NeonDbError: ${e}`);
    assert.equal(e.code, '28P01');
    return true;
  });
  const sql010 = neon010(DATABASE_AUTHENTICATED_URL, { authToken: 'not-a-token' });
  await assert.rejects(sql010('select 1'), (e) => {
    assert.equal(e.code, '28P01');
    return true;
  });
  const anonymousless = neon(`postgresql://authenticated@${PG_HOSTPORT}/app`);
  await assert.rejects(anonymousless`select 1`, (e) => {
    assert.ok(e instanceof NeonDbError, `not a NeonDbError: ${e}`);
    assert.equal(e.code, '28000');
    return true;
  });
});

check('a Pool over WebSocket with the token as password', async () => {
  const url = `postgresql://authenticated:${TOKEN_A}@${PG_HOSTPORT}/app`;
  const pool = new Pool({ connectionString: url });
  try {
    const { rows } = await pool.query('select auth.user_id() as me, count(*)::int as n from todos');
    assert.deepEqual(rows, [{ me: 'user_alice', n: 3 }]);
    const client = await pool.connect();
    try {
      await client.query('begin');
      await client.query("insert into todos (task) values ('over websocket')");
      const { rows: mine } = await client.query('select task from todos order by id');
      assert.ok(mine.some((r) => r.task === 'over websocket'));
      await client.query('rollback');
    } finally {
      client.release();
    }
    const badPool = new Pool({ connectionString: `postgresql://authenticated:garbage@${PG_HOSTPORT}/app` });
    await assert.rejects(badPool.query('select 1'), (e) => e.code === '28P01');
    await badPool.end();
  } finally {
    await pool.end();
  }
});

check('two users interleaved over many requests never see each other\'s rows', async () => {
  const a = sqlFor(TOKEN_A);
  const b = sqlFor(TOKEN_B);
  const requests = [];
  for (let i = 0; i < 200; i++) {
    const [sql, me] = i % 2 === 0 ? [a, 'user_alice'] : [b, 'user_bob'];
    requests.push(
      sql`select auth.user_id() as me, array_agg(distinct user_id) as owners from todos`.then(([row]) => {
        assert.equal(row.me, me);
        assert.deepEqual(row.owners, [me]);
      }),
    );
  }
  await Promise.all(requests);
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
