//! Differential fuzzing in the style of SQLancer and SQLsmith: random queries over the TPC-H
//! tables — joins along their keys (inner, outer, semi and anti), filters, aggregates with
//! HAVING, window functions, set operations, scalar and IN subqueries, ORDER BY and LIMIT — run
//! on the cluster (cut into many small Tasks, every join shuffled in half of them) and on
//! single-node DataFusion, which must agree. Each seed makes one query, so a failure names the
//! seed that reproduces it; `QUIVER_FUZZ_QUERIES` runs more of them.

mod common;

use common::*;
use quiver::tpch::{self, Layout};

/// Queries per run in CI.
const FUZZ_QUERIES: u64 = 150;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Int,
    Decimal,
    Text,
    Date,
}

struct Table {
    name: &'static str,
    columns: &'static [(&'static str, Kind)],
}

const TABLES: &[Table] = &[
    Table { name: "nation", columns: &[("n_nationkey", Kind::Int), ("n_name", Kind::Text), ("n_regionkey", Kind::Int)] },
    Table { name: "region", columns: &[("r_regionkey", Kind::Int), ("r_name", Kind::Text)] },
    Table {
        name: "supplier",
        columns: &[("s_suppkey", Kind::Int), ("s_name", Kind::Text), ("s_nationkey", Kind::Int), ("s_acctbal", Kind::Decimal)],
    },
    Table {
        name: "customer",
        columns: &[
            ("c_custkey", Kind::Int),
            ("c_nationkey", Kind::Int),
            ("c_acctbal", Kind::Decimal),
            ("c_mktsegment", Kind::Text),
        ],
    },
    Table {
        name: "orders",
        columns: &[
            ("o_orderkey", Kind::Int),
            ("o_custkey", Kind::Int),
            ("o_orderstatus", Kind::Text),
            ("o_totalprice", Kind::Decimal),
            ("o_orderdate", Kind::Date),
            ("o_orderpriority", Kind::Text),
        ],
    },
    Table {
        name: "lineitem",
        columns: &[
            ("l_orderkey", Kind::Int),
            ("l_partkey", Kind::Int),
            ("l_suppkey", Kind::Int),
            ("l_linenumber", Kind::Int),
            ("l_quantity", Kind::Decimal),
            ("l_extendedprice", Kind::Decimal),
            ("l_discount", Kind::Decimal),
            ("l_returnflag", Kind::Text),
            ("l_shipdate", Kind::Date),
            ("l_shipmode", Kind::Text),
        ],
    },
    Table {
        name: "part",
        columns: &[("p_partkey", Kind::Int), ("p_brand", Kind::Text), ("p_size", Kind::Int), ("p_retailprice", Kind::Decimal)],
    },
    Table {
        name: "partsupp",
        columns: &[("ps_partkey", Kind::Int), ("ps_suppkey", Kind::Int), ("ps_availqty", Kind::Int), ("ps_supplycost", Kind::Decimal)],
    },
];

/// Foreign keys: (table, column, referenced table, referenced column).
const KEYS: &[(&str, &str, &str, &str)] = &[
    ("nation", "n_regionkey", "region", "r_regionkey"),
    ("supplier", "s_nationkey", "nation", "n_nationkey"),
    ("customer", "c_nationkey", "nation", "n_nationkey"),
    ("orders", "o_custkey", "customer", "c_custkey"),
    ("lineitem", "l_orderkey", "orders", "o_orderkey"),
    ("lineitem", "l_partkey", "part", "p_partkey"),
    ("lineitem", "l_suppkey", "supplier", "s_suppkey"),
    ("partsupp", "ps_partkey", "part", "p_partkey"),
    ("partsupp", "ps_suppkey", "supplier", "s_suppkey"),
];

fn table(name: &str) -> &'static Table {
    TABLES.iter().find(|t| t.name == name).expect("a TPC-H table")
}

/// A column in scope: its SQL (qualified) and kind.
#[derive(Clone)]
struct Column {
    sql: String,
    kind: Kind,
}

/// A FROM clause with the columns it brings into scope.
struct From {
    sql: String,
    columns: Vec<Column>,
}

fn scan(name: &str, alias: &str) -> From {
    let columns = table(name).columns.iter().map(|(c, kind)| Column { sql: format!("{alias}.{c}"), kind: *kind }).collect();
    From { sql: format!("{name} {alias}"), columns }
}

/// One to three tables joined along their keys.
fn from_clause(rng: &mut Rng) -> (From, Vec<&'static str>) {
    let start = rng.pick(TABLES).name;
    let mut tables = vec![start];
    let mut from = scan(start, "t0");
    for n in 1..=rng.below(3) {
        let edges: Vec<_> = KEYS
            .iter()
            .filter_map(|&(a, ac, b, bc)| {
                let joined = tables.iter().position(|t| *t == a || *t == b)?;
                let (other, on_here, on_other) = if tables[joined] == a { (b, ac, bc) } else { (a, bc, ac) };
                (!tables.contains(&other)).then_some((joined, other, on_here, on_other))
            })
            .collect();
        if edges.is_empty() {
            break;
        }
        let (joined, other, on_here, on_other) = *rng.pick(&edges);
        let alias = format!("t{n}");
        let right = scan(other, &alias);
        let join = *rng.pick(&["JOIN", "JOIN", "LEFT JOIN", "RIGHT JOIN", "FULL JOIN"]);
        from.sql = format!("{} {join} {} ON t{joined}.{on_here} = {alias}.{on_other}", from.sql, right.sql);
        from.columns.extend(right.columns);
        tables.push(other);
    }
    (from, tables)
}

fn literal(rng: &mut Rng, kind: Kind) -> String {
    match kind {
        Kind::Int => rng.below(200).to_string(),
        Kind::Decimal => format!("{}.{:02}", rng.below(5000), rng.below(100)),
        Kind::Text => rng.pick(&["'A'", "'F'", "'N'", "'R'", "'MAIL'", "'SHIP'", "'BUILDING'", "'GERMANY'", "'ASIA'", "'1-URGENT'", "'Brand#13'"]).to_string(),
        Kind::Date => format!("DATE '199{}-0{}-1{}'", 2 + rng.below(6), 1 + rng.below(9), rng.below(10)),
    }
}

fn predicate(rng: &mut Rng, columns: &[Column]) -> String {
    let column = rng.pick(columns).clone();
    match rng.below(7) {
        0 => format!("{} IS NOT NULL", column.sql),
        1 if column.kind == Kind::Text => format!("{} LIKE '{}%'", column.sql, rng.pick(&["A", "B", "M", "S", "1", "Br"])),
        2 => format!("{} IN ({}, {})", column.sql, literal(rng, column.kind), literal(rng, column.kind)),
        3 => {
            let (a, b) = (literal(rng, column.kind), literal(rng, column.kind));
            format!("{} BETWEEN {a} AND {b}", column.sql)
        }
        _ => format!("{} {} {}", column.sql, rng.pick(&["<", "<=", ">", ">=", "=", "<>"]), literal(rng, column.kind)),
    }
}

fn where_clause(rng: &mut Rng, columns: &[Column], tables: &[&str]) -> String {
    let mut predicates: Vec<String> = (0..rng.below(3)).map(|_| predicate(rng, columns)).collect();
    if rng.chance(20) {
        // A semi or anti join through a subquery on a key.
        let (here, there_table, there) = *rng.pick(&[("o_custkey", "customer", "c_custkey"), ("l_suppkey", "supplier", "s_suppkey"), ("l_orderkey", "orders", "o_orderkey"), ("c_nationkey", "nation", "n_nationkey")]);
        if let Some(column) = columns.iter().find(|c| c.sql.ends_with(&format!(".{here}"))) {
            let inner = format!("SELECT {there} FROM {there_table} WHERE {}", predicate(rng, &scan(there_table, there_table).columns));
            let not = if rng.chance(50) { "NOT " } else { "" };
            predicates.push(format!("{} {not}IN ({inner})", column.sql));
        }
    }
    if rng.chance(15) {
        let numeric: Vec<&Column> = columns.iter().filter(|c| matches!(c.kind, Kind::Int | Kind::Decimal)).collect();
        if !numeric.is_empty() {
            let column = rng.pick(&numeric).sql.clone();
            let name = column.split('.').nth(1).unwrap_or(&column).to_string();
            let source = tables.iter().find(|t| table(t).columns.iter().any(|(c, _)| *c == name)).copied().unwrap_or("nation");
            predicates.push(format!("{column} > (SELECT avg({name}) FROM {source})"));
        }
    }
    if predicates.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", predicates.join(if rng.chance(80) { " AND " } else { " OR " }))
    }
}

/// A SELECT over the TPC-H tables; returns its SQL and how many columns it outputs.
fn select(rng: &mut Rng) -> (String, usize) {
    let (from, tables) = from_clause(rng);
    let filter = where_clause(rng, &from.columns, &tables);
    let groups: Vec<Column> = (0..rng.below(3)).map(|_| rng.pick(&from.columns).clone()).collect();
    if rng.chance(60) {
        let numeric: Vec<&Column> = from.columns.iter().filter(|c| matches!(c.kind, Kind::Int | Kind::Decimal)).collect();
        let mut outputs: Vec<String> = groups.iter().map(|g| g.sql.clone()).collect();
        for _ in 0..1 + rng.below(3) {
            let column = rng.pick(&numeric).sql.clone();
            let any = rng.pick(&from.columns).sql.clone();
            outputs.push(match rng.below(6) {
                0 => "count(*)".to_string(),
                1 => format!("count(DISTINCT {any})"),
                2 => format!("min({any})"),
                3 => format!("max({column})"),
                4 => format!("avg({column})"),
                _ => format!("sum({column})"),
            });
        }
        let group_by = if groups.is_empty() {
            String::new()
        } else {
            format!(" GROUP BY {}", groups.iter().map(|g| g.sql.as_str()).collect::<Vec<_>>().join(", "))
        };
        let having = if !groups.is_empty() && rng.chance(30) { " HAVING count(*) > 1".to_string() } else { String::new() };
        if rng.chance(25) && !groups.is_empty() {
            let window = format!("rank() OVER (PARTITION BY {} ORDER BY count(*), {})", groups[0].sql, groups.iter().map(|g| g.sql.as_str()).collect::<Vec<_>>().join(", "));
            outputs.push(window);
        }
        let count = outputs.len();
        let list = outputs.iter().enumerate().map(|(i, o)| format!("{o} AS c{i}")).collect::<Vec<_>>().join(", ");
        return (format!("SELECT {list} FROM {}{filter}{group_by}{having}", from.sql), count);
    }
    let mut outputs: Vec<String> = (0..1 + rng.below(4)).map(|_| rng.pick(&from.columns).sql.clone()).collect();
    if rng.chance(30) {
        let partition = rng.pick(&from.columns).sql.clone();
        let order = rng.pick(&from.columns).sql.clone();
        let function = rng.pick(&["row_number()", "rank()", "dense_rank()", "count(*)"]).to_string();
        outputs.push(format!("{function} OVER (PARTITION BY {partition} ORDER BY {order}, {})", outputs.join(", ")));
    }
    let distinct = if rng.chance(20) { "DISTINCT " } else { "" };
    let count = outputs.len();
    let list = outputs.iter().enumerate().map(|(i, o)| format!("{o} AS c{i}")).collect::<Vec<_>>().join(", ");
    (format!("SELECT {distinct}{list} FROM {}{filter}", from.sql), count)
}

/// A whole query: a SELECT, or two combined by a set operation, ordered by every output column
/// (a total order, so that a LIMIT keeps the same rows on both engines).
fn query(seed: u64) -> String {
    let mut rng = Rng::new(seed);
    let (mut sql, columns) = select(&mut rng);
    if rng.chance(25) {
        let (other, other_columns) = loop {
            let candidate = select(&mut rng);
            if candidate.1 == columns {
                break candidate;
            }
        };
        let op = *rng.pick(&["UNION ALL", "UNION", "INTERSECT", "EXCEPT"]);
        // Cast every column to text so that the two sides always have one type per column.
        let text = |sql: &str, n: usize| {
            let list = (0..n).map(|i| format!("CAST(c{i} AS VARCHAR) AS c{i}")).collect::<Vec<_>>().join(", ");
            format!("SELECT {list} FROM ({sql})")
        };
        sql = format!("{} {op} {}", text(&sql, columns), text(&other, other_columns));
    }
    let order = (1..=columns).map(|i| format!("{i} NULLS FIRST")).collect::<Vec<_>>().join(", ");
    let limit = if rng.chance(40) { format!(" LIMIT {}", 1 + rng.below(50)) } else { String::new() };
    format!("SELECT * FROM ({sql}) q ORDER BY {order}{limit}")
}

async fn fuzz_cluster(settings: &[&str]) -> TestCluster {
    let t = TestCluster::start(3).await;
    let dir = tpch::generate(t.dir.path(), 0.01, Layout { files: 2, row_group_rows: 1000 }).unwrap();
    for sql in tpch::create_tables_sql(&dir).iter().map(String::as_str).chain(settings.iter().copied()) {
        t.both(sql).await;
    }
    t
}

/// Runs the seeds `seeds` on both engines; a query single-node DataFusion rejects is skipped.
async fn check_seeds(t: &TestCluster, seeds: std::ops::Range<u64>) -> usize {
    let mut compared = 0;
    let mut failures = Vec::new();
    for seed in seeds {
        let sql = query(seed);
        let Ok(df) = t.single.sql(&sql).await else { continue };
        let Ok(stream) = df.execute_stream().await else { continue };
        let Ok(expected) = futures::TryStreamExt::try_collect::<Vec<_>>(stream).await else { continue };
        compared += 1;
        match t.client.collect(&sql).await {
            Ok((_, batches)) => {
                let (actual, expected) = (rows(&batches), rows(&expected));
                let same = actual.len() == expected.len()
                    && actual.iter().zip(&expected).all(|(a, e)| a.iter().zip(e).all(|(x, y)| cells_match(x, y, 1e-9)));
                if !same {
                    failures.push(format!("seed {seed}: {} rows, single node {}\n  {sql}", actual.len(), expected.len()));
                }
            }
            Err(e) => failures.push(format!("seed {seed}: {e}\n  {sql}")),
        }
    }
    eprintln!("{compared} random queries compared, {} differed", failures.len());
    assert!(failures.is_empty(), "{} of {compared} random queries differ from single-node DataFusion:\n{}", failures.len(), failures.join("\n"));
    compared
}

fn queries() -> u64 {
    std::env::var("QUIVER_FUZZ_QUERIES").ok().and_then(|n| n.parse().ok()).unwrap_or(FUZZ_QUERIES)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_queries_match_single_node_datafusion() {
    let t = fuzz_cluster(&[]).await;
    let compared = check_seeds(&t, 0..queries()).await;
    assert!(compared as u64 >= queries() * 8 / 10, "single-node DataFusion ran only {compared} of {} queries", queries());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_queries_with_every_join_shuffled_match_single_node_datafusion() {
    let t = fuzz_cluster(&SHUFFLE_JOINS).await;
    let (start, end) = (1_000_000, 1_000_000 + queries());
    let compared = check_seeds(&t, start..end).await;
    assert!(compared as u64 >= queries() * 8 / 10, "single-node DataFusion ran only {compared} of {} queries", queries());
}

#[test]
fn the_same_seed_makes_the_same_query() {
    assert_eq!(query(42), query(42));
    assert_ne!(query(1), query(2));
}
