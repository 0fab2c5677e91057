// pgjdbc through authgres: connects with a token as the password, over TLS
// and in the clear, and runs the compatibility checks. Started by
// tests/compat.rs with `java -cp postgresql.jar Compat.java`; prints
// "N passed, N failed".

import java.io.StringReader;
import java.io.StringWriter;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.Executors;
import java.util.concurrent.TimeUnit;

import org.postgresql.PGConnection;
import org.postgresql.PGNotification;
import org.postgresql.copy.CopyManager;

public class Compat {
    interface Check { void run() throws Exception; }

    static final String HOST = System.getenv("PGHOST");
    static final String PORT = System.getenv("PGPORT");
    static final String DATABASE = System.getenv("PGDATABASE");
    static final String TOKEN_A = System.getenv("AUTHGRES_TOKEN_A");
    static final String TOKEN_B = System.getenv("AUTHGRES_TOKEN_B");
    static final String CA = System.getenv("AUTHGRES_CA");

    static Connection connect(String token, boolean tls) throws SQLException {
        Properties props = new Properties();
        props.setProperty("user", "authenticated");
        props.setProperty("password", token);
        if (tls) {
            props.setProperty("sslmode", "verify-full");
            props.setProperty("sslrootcert", CA);
        } else {
            props.setProperty("sslmode", "disable");
        }
        return DriverManager.getConnection("jdbc:postgresql://" + HOST + ":" + PORT + "/" + DATABASE, props);
    }

    static void require(boolean condition, String what) {
        if (!condition) throw new AssertionError(what);
    }

    static String one(Connection c, String sql) throws SQLException {
        try (Statement s = c.createStatement(); ResultSet r = s.executeQuery(sql)) {
            r.next();
            return r.getString(1);
        }
    }

    public static void main(String[] args) throws Exception {
        List<String> names = new ArrayList<>();
        List<Check> checks = new ArrayList<>();
        for (boolean tls : new boolean[] {false, true}) {
            names.add("pgjdbc " + (tls ? "TLS" : "plaintext") + ": token as password; queries; RLS");
            checks.add(() -> {
                try (Connection c = connect(TOKEN_A, tls)) {
                    require("user_alice".equals(one(c, "select auth.user_id()")), "user_id");
                    try (PreparedStatement p = c.prepareStatement("select ?::int + 1")) {
                        p.setInt(1, 41);
                        try (ResultSet r = p.executeQuery()) { r.next(); require(r.getInt(1) == 42, "param"); }
                    }
                    try (Statement s = c.createStatement()) {
                        s.execute("insert into todos (task) values ('pgjdbc')");
                    }
                    require("user_alice".equals(one(c, "select string_agg(distinct user_id, ',') from todos")), "rls");
                }
            });
        }
        names.add("pgjdbc: a bad token is an SQLException with SQLSTATE 28P01");
        checks.add(() -> {
            try {
                connect("not-a-token", false).close();
                throw new AssertionError("a bad token logged in");
            } catch (SQLException e) {
                require("28P01".equals(e.getSQLState()), "sqlstate " + e.getSQLState());
                require(e.getMessage().contains("token"), e.getMessage());
            }
        });
        names.add("pgjdbc: a server-prepared statement reused 200 times; a rolled-back transaction");
        checks.add(() -> {
            try (Connection c = connect(TOKEN_B, false)) {
                try (PreparedStatement p = c.prepareStatement("select ?::int")) {
                    for (int i = 0; i < 200; i++) {
                        p.setInt(1, i);
                        try (ResultSet r = p.executeQuery()) { r.next(); require(r.getInt(1) == i, "echo"); }
                    }
                    require(p.unwrap(org.postgresql.PGStatement.class).isUseServerPrepare(), "server prepared");
                }
                String before = one(c, "select count(*) from todos");
                c.setAutoCommit(false);
                try (Statement s = c.createStatement()) { s.execute("insert into todos (task) values ('rolled back')"); }
                c.rollback();
                c.setAutoCommit(true);
                require(before.equals(one(c, "select count(*) from todos")), "rollback");
            }
        });
        names.add("pgjdbc: COPY FROM STDIN and COPY TO STDOUT");
        checks.add(() -> {
            try (Connection c = connect(TOKEN_B, false)) {
                CopyManager copy = c.unwrap(PGConnection.class).getCopyAPI();
                StringBuilder lines = new StringBuilder();
                for (int i = 0; i < 1000; i++) lines.append("jdbc ").append(i).append('\n');
                long in = copy.copyIn("copy copy_target (task) from stdin", new StringReader(lines.toString()));
                require(in == 1000, "copied in " + in);
                StringWriter out = new StringWriter();
                copy.copyOut("copy (select task from copy_target where task like 'jdbc %') to stdout", out);
                require(out.toString().split("\n").length == 1000, "copied out");
            }
        });
        names.add("pgjdbc: LISTEN/NOTIFY across two connections");
        checks.add(() -> {
            try (Connection listener = connect(TOKEN_A, false); Connection notifier = connect(TOKEN_B, false)) {
                try (Statement s = listener.createStatement()) { s.execute("listen jdbc_channel"); }
                try (Statement s = notifier.createStatement()) { s.execute("select pg_notify('jdbc_channel', 'hello')"); }
                PGNotification[] got = listener.unwrap(PGConnection.class).getNotifications(5000);
                require(got != null && got.length == 1 && "hello".equals(got[0].getParameter()), "notification");
            }
        });
        names.add("pgjdbc: a 100k-row result; Statement.cancel(); an error with its SQLSTATE");
        checks.add(() -> {
            try (Connection c = connect(TOKEN_A, false); Statement s = c.createStatement()) {
                int rows = 0;
                try (ResultSet r = s.executeQuery("select i from generate_series(1, 100000) i")) {
                    while (r.next()) rows++;
                }
                require(rows == 100000, "rows " + rows);
                var pool = Executors.newSingleThreadScheduledExecutor();
                pool.schedule(() -> { try { s.cancel(); } catch (SQLException e) { throw new RuntimeException(e); } },
                        300, TimeUnit.MILLISECONDS);
                long started = System.nanoTime();
                try {
                    s.execute("select pg_sleep(30)");
                    throw new AssertionError("not cancelled");
                } catch (SQLException e) {
                    require("57014".equals(e.getSQLState()), "sqlstate " + e.getSQLState());
                } finally {
                    pool.shutdown();
                }
                require(System.nanoTime() - started < 10_000_000_000L, "cancel took too long");
                try {
                    s.execute("select 1/0");
                    throw new AssertionError("no error");
                } catch (SQLException e) {
                    require("22012".equals(e.getSQLState()), "sqlstate " + e.getSQLState());
                }
            }
        });
        int passed = 0, failed = 0;
        for (int i = 0; i < checks.size(); i++) {
            try {
                checks.get(i).run();
                passed++;
                System.out.println("ok   " + names.get(i));
            } catch (Throwable t) {
                failed++;
                System.out.println("FAIL " + names.get(i) + "\n     " + t);
            }
        }
        System.out.println(passed + " passed, " + failed + " failed");
        System.exit(failed == 0 ? 0 : 1);
    }
}
