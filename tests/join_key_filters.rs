//! Join key filters across Stages: the probe Stage of a join between two Stages drops the rows
//! whose keys the build side lacks. Answers must be those of single-node DataFusion for every
//! join type (the filter may only drop rows the join would), with NULL keys, duplicates and an
//! empty build side; and the filter must really drop rows.

mod common;

use common::*;

const TABLES: [&str; 3] = [
    // Every third id of `big` has a partner in `small`; both have NULL keys and duplicates.
    "CREATE TABLE kf_big AS SELECT CASE WHEN value % 101 = 0 THEN NULL ELSE value END AS id, value % 7 AS g FROM generate_series(1, 30000) \
     UNION ALL SELECT value AS id, 8 AS g FROM generate_series(1, 3000)",
    "CREATE TABLE kf_small AS SELECT CASE WHEN value % 50 = 0 THEN NULL ELSE value * 3 END AS id, value % 5 AS h FROM generate_series(1, 4000) \
     UNION ALL SELECT value * 3 AS id, 9 AS h FROM generate_series(1, 200)",
    "CREATE TABLE kf_pairs AS SELECT value % 3000 AS a, value % 11 AS b, value AS v FROM generate_series(1, 20000)",
];

/// The build sides drop rows (a filter): a whole table as a build side is not linked, its keys
/// would drop nothing.
const QUERIES: [&str; 28] = [
    "SELECT b.g, count(*), sum(s.h) FROM kf_big b JOIN (SELECT * FROM kf_small WHERE h <> 3) s ON b.id = s.id GROUP BY b.g",
    "SELECT s.h, count(*), count(b.id) FROM (SELECT * FROM kf_small WHERE h <> 3) s JOIN kf_big b ON b.id = s.id GROUP BY s.h",
    "SELECT b.g, count(*), count(s.id) FROM kf_big b LEFT JOIN (SELECT * FROM kf_small WHERE h <> 3) s ON b.id = s.id GROUP BY b.g",
    "SELECT s.h, count(*), count(b.id) FROM kf_big b RIGHT JOIN (SELECT * FROM kf_small WHERE h <> 3) s ON b.id = s.id GROUP BY s.h",
    "SELECT count(*), count(b.id), count(s.id) FROM kf_big b FULL JOIN (SELECT * FROM kf_small WHERE h <> 3) s ON b.id = s.id",
    "SELECT g, count(*) FROM kf_big WHERE id IN (SELECT id FROM kf_small WHERE h <> 3) GROUP BY g",
    "SELECT g, count(*) FROM kf_big b WHERE EXISTS (SELECT 1 FROM kf_small s WHERE s.id = b.id AND s.h <> 3) GROUP BY g",
    "SELECT g, count(*) FROM kf_big b WHERE NOT EXISTS (SELECT 1 FROM kf_small s WHERE s.id = b.id AND s.h <> 3) GROUP BY g",
    "SELECT g, count(*) FROM kf_big WHERE id NOT IN (SELECT id FROM kf_small WHERE h <> 3) GROUP BY g",
    "SELECT g, count(*) FROM kf_big WHERE id NOT IN (SELECT id FROM kf_small WHERE id IS NOT NULL) GROUP BY g",
    "SELECT h, count(*) FROM kf_small s WHERE NOT EXISTS (SELECT 1 FROM kf_big b WHERE s.id = b.id AND b.g <> 2) GROUP BY h",
    "SELECT h, count(*) FROM (SELECT * FROM kf_small WHERE h <> 3) s WHERE NOT EXISTS (SELECT 1 FROM kf_big b WHERE s.id = b.id) GROUP BY h",
    "SELECT b.g, count(*) FROM kf_big b JOIN (SELECT * FROM kf_small WHERE h > 100) n ON b.id = n.id GROUP BY b.g",
    "SELECT n.h, count(*) FROM kf_big b RIGHT JOIN (SELECT * FROM kf_small WHERE h > 100) n ON b.id = n.id GROUP BY n.h",
    "SELECT p.b, count(*), sum(q.v) FROM kf_pairs p JOIN kf_pairs q ON p.a = q.a AND p.b = q.b AND q.v < 2000 GROUP BY p.b",
    // The probe side is an aggregate grouped by its join keys (as in TPC-H q17 and q20).
    AGGREGATE_PROBE,
    AGGREGATE_PROBES_LINKED[0],
    AGGREGATE_PROBES_LINKED[1],
    AGGREGATE_PROBES_LINKED[2],
    "SELECT s.h, count(*), sum(b.n) FROM (SELECT * FROM kf_small WHERE h <> 3) s JOIN (SELECT id, g, count(*) AS n FROM kf_big GROUP BY GROUPING SETS ((id, g), (id))) b ON s.id = b.id GROUP BY s.h",
    AGGREGATE_VALUE_KEY,
    LIMITED_PROBE,
    HAVING_BUILD,
    // A join of each kind under a semi join with a HAVING (which side DataFusion builds on
    // decides whether they link; `key_filter`'s unit tests pin which inputs a filter may reach).
    "SELECT count(*), sum(x.v) FROM (SELECT p.a, p.v FROM kf_pairs p LEFT JOIN kf_big b ON p.a = b.id) x WHERE x.a IN (SELECT id FROM kf_big GROUP BY id HAVING count(*) > 1)",
    "SELECT count(*), count(x.bid) FROM (SELECT p.a, b.id AS bid FROM kf_pairs p LEFT JOIN kf_big b ON p.a = b.id) x WHERE x.bid IN (SELECT id FROM kf_big GROUP BY id HAVING count(*) > 1)",
    "SELECT count(*), count(x.bid) FROM (SELECT p.a, b.id AS bid FROM kf_pairs p FULL JOIN kf_big b ON p.a = b.id) x WHERE x.bid IN (SELECT id FROM kf_big GROUP BY id HAVING count(*) > 1)",
    "SELECT count(*), sum(x.v) FROM (SELECT * FROM kf_pairs p WHERE NOT EXISTS (SELECT 1 FROM kf_small s WHERE s.id = p.a)) x WHERE x.a IN (SELECT id FROM kf_big GROUP BY id HAVING count(*) > 1)",
    "SELECT count(*), sum(x.v) FROM (SELECT * FROM kf_pairs p WHERE EXISTS (SELECT 1 FROM kf_small s WHERE s.id = p.a AND s.h <> 2)) x WHERE x.a IN (SELECT id FROM kf_big GROUP BY id HAVING count(*) > 1)",
];

/// As TPC-H q18: the build side is a HAVING over an aggregate (in the join's Stage, until it
/// is cut into its own), the probe side an inner join of two Stages.
const HAVING_BUILD: &str = "SELECT x.g, count(*), sum(x.v) FROM (SELECT p.a, p.v, b.g FROM kf_pairs p JOIN kf_big b ON p.a = b.id) x \
     WHERE x.a IN (SELECT id FROM kf_big WHERE id % 10 = 0 GROUP BY id HAVING count(*) > 1) GROUP BY x.g";

/// Probe sides that reach their Stage with the join keys intact: through an aggregate grouped
/// by an expression (filtered above it), by two keys in another order, and under a HAVING.
const AGGREGATE_PROBES_LINKED: [&str; 3] = [
    "SELECT s.h, count(*), sum(b.n) FROM (SELECT * FROM kf_small WHERE h <> 3) s JOIN (SELECT id % 1000 AS k, count(*) AS n FROM kf_big GROUP BY id % 1000) b ON s.id = b.k GROUP BY s.h",
    "SELECT count(*), sum(q.s) FROM (SELECT * FROM kf_pairs WHERE v < 2000) p JOIN (SELECT b, a, sum(v) AS s FROM kf_pairs GROUP BY b, a) q ON p.a = q.a AND p.b = q.b",
    "SELECT count(*), sum(q.s) FROM (SELECT * FROM kf_pairs WHERE v < 2000) p JOIN (SELECT b, a, sum(v) AS s FROM kf_pairs GROUP BY b, a HAVING sum(v) > 20000) q ON p.a = q.a AND p.b = q.b",
];

/// The join key is an aggregate's value, which no row below it holds: its Stage's output is
/// filtered, never the rows it aggregates.
const AGGREGATE_VALUE_KEY: &str =
    "SELECT s.h, count(*) FROM (SELECT * FROM kf_small WHERE h <> 3) s JOIN (SELECT g, count(*) AS n FROM kf_big GROUP BY g) b ON s.id = b.n GROUP BY s.h";

/// A join whose probe side aggregates `kf_pairs` grouped by its join key: 20000 rows in 11
/// groups, of which the build side holds 5.
const AGGREGATE_PROBE: &str = "SELECT s.h, count(*), sum(p.n), sum(p.t) FROM (SELECT * FROM kf_small WHERE h <> 3) s \
     JOIN (SELECT b, count(*) AS n, sum(v) AS t FROM kf_pairs GROUP BY b) p ON s.h = p.b GROUP BY s.h";

/// Its probe side keeps the first groups: which ones depends on every row below the limit.
const LIMITED_PROBE: &str = "SELECT s.h, count(*), sum(b.n) FROM (SELECT * FROM kf_small WHERE h <> 3) s \
     JOIN (SELECT id % 1000 AS k, count(*) AS n FROM kf_big GROUP BY id % 1000 ORDER BY k LIMIT 300) b ON s.id = b.k GROUP BY s.h ORDER BY s.h";

async fn cluster_with_tables(workers: usize, slots: usize) -> TestCluster {
    let t = TestCluster::start_with_http(workers, quiver::config::WorkerConfig { slots, memory_limit_bytes: 1 << 30, ..Default::default() }).await;
    for sql in TABLES {
        t.both(sql).await;
    }
    t.run_all(&SHUFFLE_JOINS).await;
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_join_type_gives_the_single_node_answer_with_key_filters_on_and_off() {
    let t = cluster_with_tables(2, 2).await;
    for on in [true, false] {
        t.run_all(&[&format!("SET quiver.join_key_filters = {on}")]).await;
        for sql in QUERIES {
            t.check_same(sql).await;
        }
    }
}

/// Also with every adaptive mechanism acting everywhere: split and coalesced partitions, scan
/// slices cut at dispatch and speculative Attempts all report their keys or filter their rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_filters_agree_with_every_adaptive_mechanism() {
    let t = cluster_with_tables(2, 2).await;
    t.run_all(&ADAPTIVE_EVERYWHERE).await;
    for sql in QUERIES {
        t.check_same(sql).await;
    }
}

fn filtered_stage(dag: &str) -> Option<(u64, u64)> {
    let line = dag.lines().find(|l| l.starts_with("Stage ") && l.contains("key_filter_rows="))?;
    let counts = line.split("key_filter_rows=").nth(1)?.split(' ').next()?;
    let (kept, seen) = counts.split_once('/')?;
    Some((kept.parse().ok()?, seen.parse().ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_probe_stage_drops_the_rows_whose_keys_the_build_side_lacks() {
    let t = cluster_with_tables(2, 2).await;
    let sql = "SELECT b.g, count(*) FROM kf_big b JOIN (SELECT * FROM kf_small WHERE h <> 3) s ON b.id = s.id GROUP BY b.g";
    let explain = t.cluster_rows(&format!("EXPLAIN {sql}")).await;
    let dag = &explain[2][1];
    assert!(dag.contains("summarizes its join keys") && dag.contains("keeps only rows whose join keys stage"), "{dag}");
    let analyze = t.cluster_rows(&format!("EXPLAIN ANALYZE {sql}")).await;
    let (kept, seen) = filtered_stage(&analyze[0][1]).unwrap_or_else(|| panic!("no Stage filtered its rows:\n{}", analyze[0][1]));
    // 33000 probe rows, of which about 3300 have a partner; a Bloom filter lets a few percent
    // of the others through.
    assert!(seen == 33000 && kept < seen / 4 && kept >= 3000, "kept {kept} of {seen}");
    // quiver.tasks shows each probe Attempt's share: the counted ones add up to the Stage's,
    // and Attempts of Stages without a filter show none.
    let analyzed = "SELECT query_id FROM quiver.queries WHERE sql LIKE 'EXPLAIN ANALYZE%' ORDER BY started DESC LIMIT 1";
    let tasks = t
        .cluster_rows(&format!(
            "SELECT sum(key_filter_rows_kept), sum(key_filter_rows_seen), count(*) FILTER (WHERE key_filter_rows_seen IS NULL) \
             FROM quiver.tasks WHERE state = 'succeeded' AND cause IS NULL AND query_id = ({analyzed})"
        ))
        .await;
    assert_eq!(tasks[0][..2], [kept.to_string(), seen.to_string()], "quiver.tasks against EXPLAIN ANALYZE");
    assert_ne!(tasks[0][2], "0", "the build Stage's Attempts show no key filter");
    // So does the web UI's API.
    let id = &t.cluster_rows(analyzed).await[0][0];
    let (_, detail) = get_json(t.cluster.http_addr().unwrap(), &format!("/api/queries/{id}")).await;
    let counted = detail["tasks"].as_array().unwrap().iter().filter(|t| t["state"] == "succeeded" && t["cause"].is_null());
    let api = counted.fold((0, 0), |(k, s), t| (k + t["key_filter_rows_kept"].as_u64().unwrap_or(0), s + t["key_filter_rows_seen"].as_u64().unwrap_or(0)));
    assert_eq!(api, (kept, seen), "the API's Tasks against EXPLAIN ANALYZE");
    // And the UI's Tasks table, rendered in Chromium, shows each Attempt's as "kept / seen".
    let listed: Vec<(u64, u64)> = detail["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| Some((t["key_filter_rows_kept"].as_u64()?, t["key_filter_rows_seen"].as_u64()?)))
        .collect();
    let url = format!("http://{}/#/queries/{id}", t.cluster.http_addr().unwrap());
    let page = tokio::task::spawn_blocking(move || rendered_dom(&url, 3_000)).await.unwrap();
    let mut shown: Vec<&str> = page.split("data-key-filter=\"").skip(1).filter_map(|cell| cell.split("</td>").next()).collect();
    shown.retain(|cell| !cell.starts_with('"'));
    let mut expected: Vec<String> = listed.iter().map(|(k, s)| format!("{s}\">{} / {}", thousands(*k), thousands(*s))).collect();
    shown.sort_unstable();
    expected.sort_unstable();
    assert!(!expected.is_empty());
    assert_eq!(shown, expected, "key filter cells of the Tasks table in:\n{page}");

    // A whole table as the build side holds every key: no link.
    let whole = "SELECT b.g, count(*) FROM kf_big b JOIN kf_small s ON b.id = s.id GROUP BY b.g";
    let explain = t.cluster_rows(&format!("EXPLAIN {whole}")).await;
    assert!(!explain[2][1].contains("keeps only rows"), "{}", explain[2][1]);

    // Probe Tasks that do not wait for the build Stage may start unfiltered, never wrong.
    t.run_all(&["SET quiver.join_key_filter_wait = false"]).await;
    for sql in QUERIES {
        t.check_same(sql).await;
    }

    t.run_all(&["SET quiver.join_key_filters = false"]).await;
    let explain = t.cluster_rows(&format!("EXPLAIN {sql}")).await;
    assert!(!explain[2][1].contains("keeps only rows"), "{}", explain[2][1]);
    let analyze = t.cluster_rows(&format!("EXPLAIN ANALYZE {sql}")).await;
    assert_eq!(filtered_stage(&analyze[0][1]), None, "{}", analyze[0][1]);
}

/// The probe and build Stages of the key filter link an `EXPLAIN`'s distributed plan shows.
fn linked_stages(dag: &str) -> (u64, u64) {
    let line = dag.lines().find(|l| l.contains("keeps only rows whose join keys stage")).unwrap_or_else(|| panic!("no link:\n{dag}"));
    let number = |text: &str| text.chars().take_while(char::is_ascii_digit).collect::<String>().parse::<u64>().unwrap();
    let probe = number(line.split("Stage ").nth(1).unwrap());
    let build = number(line.split("join keys stage ").nth(1).unwrap());
    (probe, build)
}

/// A probe Stage that does not wait for its filter starts beside its build Stage; its Attempts
/// that run when the filter is decided get it where they run and drop the rest of their rows
/// the build side lacks (before, an Attempt assigned without a filter never filtered).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn probe_attempts_that_start_before_their_filter_apply_it_when_it_arrives() {
    let t = cluster_with_tables(2, 2).await;
    t.run_all(&["SET quiver.join_key_filter_wait = false"]).await;
    let sql = QUERIES[0];
    let (probe, build) = linked_stages(&t.cluster_rows(&format!("EXPLAIN {sql}")).await[2][1]);
    let http = t.cluster.http_addr().unwrap();
    let mut early_seen = Vec::new();
    // Which Attempts start before the build Stage ends, and how long they run, is up to timing:
    // a few runs give Attempts that run when the filter arrives.
    for _ in 0..5 {
        t.check_same(sql).await;
        let last = "SELECT query_id FROM quiver.queries WHERE sql LIKE 'SELECT b.g, count(*), sum(s.h)%' ORDER BY started DESC LIMIT 1";
        let id = t.cluster_rows(last).await[0][0].clone();
        let (_, detail) = get_json(http, &format!("/api/queries/{id}")).await;
        let tasks = detail["tasks"].as_array().unwrap();
        let build_end = tasks.iter().filter(|t| t["stage"] == build).filter_map(|t| t["ended_ms"].as_u64()).max().unwrap();
        // Assigned before the build Stage ended, hence before its filter was decided.
        let early = tasks.iter().filter(|t| t["stage"] == probe && t["started_ms"].as_u64().is_some_and(|s| s < build_end));
        early_seen.extend(early.map(|t| t["key_filter_rows_seen"].as_u64().unwrap_or(0)));
        if early_seen.iter().any(|&seen| seen > 0) {
            return;
        }
    }
    panic!("no probe Attempt assigned before its filter was decided applied it: rows its filter saw {early_seen:?}");
}

/// A probe side that aggregates by its join keys is filtered under the aggregate, where its
/// Tasks drop the rows of the groups the join would drop before grouping them (before, such a
/// join was not linked: q17 and q20 shuffled about a million groups the join dropped).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_probe_side_aggregated_by_its_join_keys_is_filtered_below_the_aggregate() {
    let t = cluster_with_tables(2, 2).await;
    let explain = t.cluster_rows(&format!("EXPLAIN {AGGREGATE_PROBE}")).await;
    let (probe, _) = linked_stages(&explain[2][1]);
    let analyze = t.cluster_rows(&format!("EXPLAIN ANALYZE {AGGREGATE_PROBE}")).await;
    let (kept, seen) = filtered_stage(&analyze[0][1]).unwrap_or_else(|| panic!("no Stage filtered its rows:\n{}", analyze[0][1]));
    // The filter sees every row of kf_pairs, not the few groups each probe Task outputs.
    assert!(seen == 20000 && kept < seen * 6 / 10, "kept {kept} of {seen}:\n{}", analyze[0][1]);
    t.check_same(AGGREGATE_PROBE).await;
    for sql in AGGREGATE_PROBES_LINKED {
        linked_stages(&t.cluster_rows(&format!("EXPLAIN {sql}")).await[2][1]);
    }
    // Below a limit the groups a join would drop decide which others are kept: no link.
    let explain = t.cluster_rows(&format!("EXPLAIN {LIMITED_PROBE}")).await;
    assert!(!explain[2][1].contains("keeps only rows"), "{}", explain[2][1]);
    // Without the filter, the probe Stage's Tasks output more groups.
    let groups = |analyze: &str| -> u64 {
        let stage = analyze.lines().find(|l| l.starts_with(&format!("Stage {probe} "))).unwrap();
        stage.split("rows=").nth(1).unwrap().split(',').next().unwrap().parse().unwrap()
    };
    let filtered = groups(&analyze[0][1]);
    t.run_all(&["SET quiver.join_key_filters = false"]).await;
    let unfiltered = groups(&t.cluster_rows(&format!("EXPLAIN ANALYZE {AGGREGATE_PROBE}")).await[0][1]);
    assert!(filtered < unfiltered, "the probe Stage output {filtered} groups with its filter, {unfiltered} without");
}

/// A build side that drops rows inside the join's Stage becomes a Stage of its own, and its keys
/// filter both inputs of the inner join on the probe side (q18: 57 keys of a HAVING filter the
/// orders and the lineitem Stages, which otherwise shuffled 345 MB for the join to drop).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_having_build_side_filters_both_inputs_of_the_join_it_probes() {
    let t = cluster_with_tables(2, 2).await;
    let dag = t.cluster_rows(&format!("EXPLAIN {HAVING_BUILD}")).await[2][1].clone();
    let build_line = dag.lines().find(|l| l.contains("summarizes its join keys")).unwrap_or_else(|| panic!("no build Stage:\n{dag}"));
    let build = build_line.split("Stage ").nth(1).unwrap().split(' ').next().unwrap().to_string();
    // The build Stage's fragment is the HAVING over the aggregate.
    let fragment: Vec<&str> = dag.lines().skip_while(|l| *l != build_line).skip(1).take_while(|l| l.starts_with(' ')).collect();
    assert!(fragment.iter().any(|l| l.contains("FilterExec")) && fragment.iter().any(|l| l.contains("AggregateExec")), "{dag}");
    let probes = dag.lines().filter(|l| l.contains(&format!("keeps only rows whose join keys stage {build} holds"))).count();
    assert_eq!(probes, 2, "both inputs of the inner join are filtered:\n{dag}");
    let analyze = t.cluster_rows(&format!("EXPLAIN ANALYZE {HAVING_BUILD}")).await;
    let (kept, seen) = filtered_stage(&analyze[0][1]).unwrap_or_else(|| panic!("no Stage filtered its rows:\n{}", analyze[0][1]));
    // About one key in ten has a partner.
    assert!(kept < seen / 4, "kept {kept} of {seen}:\n{}", analyze[0][1]);
    t.check_same(HAVING_BUILD).await;
    // Switched off, the build side stays in the join's Stage.
    t.run_all(&["SET quiver.join_key_filters = false"]).await;
    let dag = &t.cluster_rows(&format!("EXPLAIN {HAVING_BUILD}")).await[2][1];
    assert!(!dag.contains("summarizes"), "{dag}");
    t.check_same(HAVING_BUILD).await;
}

/// `n` as the UI writes it: `33,000`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
