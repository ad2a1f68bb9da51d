//! The Flight SQL front door, spoken to by arrow-flight's own Flight SQL client: the metadata
//! calls clients make on connect, prepared statements with parameters, and cancellation.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::sql::{CommandGetDbSchemas, CommandGetPrimaryKeys, CommandGetTables, SqlInfo};
use arrow_flight::FlightInfo;
use common::*;
use datafusion::arrow::array::{BinaryArray, Int64Array, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::ipc::convert::try_schema_from_ipc_buffer;
use futures::TryStreamExt;
use tonic::transport::Channel;

/// How long a test waits for the cluster to reach a state before it fails.
const POLL_DEADLINE: Duration = Duration::from_secs(60);

async fn flight_sql(t: &TestCluster) -> FlightSqlServiceClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(t.cluster.url()).unwrap().connect().await.unwrap();
    FlightSqlServiceClient::new(channel)
}

/// Fetches every endpoint of a `FlightInfo`.
async fn fetch(client: &mut FlightSqlServiceClient<Channel>, info: FlightInfo) -> Vec<RecordBatch> {
    let mut batches = vec![];
    for endpoint in info.endpoint {
        let stream = client.do_get(endpoint.ticket.expect("endpoint has a ticket")).await.unwrap();
        batches.extend(stream.try_collect::<Vec<_>>().await.unwrap());
    }
    batches
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metadata_calls_list_catalogs_schemas_tables_with_their_schemas_and_server_info() {
    let t = TestCluster::start(1).await;
    t.run_all(&["CREATE TABLE meta_items (id BIGINT, name VARCHAR)", "CREATE VIEW meta_view AS SELECT id FROM meta_items"]).await;
    let mut client = flight_sql(&t).await;

    let info = client.get_catalogs().await.unwrap();
    assert_eq!(rows(&fetch(&mut client, info).await), vec![vec!["datafusion".to_string()]]);

    let info = client.get_db_schemas(CommandGetDbSchemas { catalog: None, db_schema_filter_pattern: None }).await.unwrap();
    let schemas = rows(&fetch(&mut client, info).await);
    for schema in ["public", "quiver"] {
        assert!(schemas.contains(&vec!["datafusion".to_string(), schema.to_string()]), "{schemas:?}");
    }

    let request = CommandGetTables {
        catalog: Some("datafusion".into()),
        db_schema_filter_pattern: Some("public".into()),
        table_name_filter_pattern: Some("meta%".into()),
        table_types: vec![],
        include_schema: true,
    };
    let info = client.get_tables(request).await.unwrap();
    let batches = fetch(&mut client, info).await;
    let listed: Vec<Vec<String>> = rows(&batches).into_iter().map(|r| r[..4].to_vec()).collect();
    let expected = [["datafusion", "public", "meta_items", "TABLE"], ["datafusion", "public", "meta_view", "VIEW"]];
    assert_eq!(listed, expected.map(|r| r.map(String::from).to_vec()).to_vec());
    let schemas = batches[0].column_by_name("table_schema").unwrap().as_any().downcast_ref::<BinaryArray>().unwrap();
    let items = try_schema_from_ipc_buffer(schemas.value(0)).unwrap();
    let names: Vec<&str> = items.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["id", "name"]);
    assert_eq!(items.field(0).data_type(), &DataType::Int64);

    let info = client.get_table_types().await.unwrap();
    let types = rows(&fetch(&mut client, info).await);
    assert!(types.contains(&vec!["TABLE".to_string()]) && types.contains(&vec!["VIEW".to_string()]), "{types:?}");

    let keys = CommandGetPrimaryKeys { catalog: None, db_schema: None, table: "meta_items".into() };
    let info = client.get_primary_keys(keys).await.unwrap();
    assert_eq!(info.clone().try_decode_schema().unwrap().field(5).name(), "key_sequence");
    let batches = fetch(&mut client, info).await;
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 0, "Quiver tables have no keys");

    let info = client.get_sql_info(vec![SqlInfo::FlightSqlServerName, SqlInfo::FlightSqlServerCancel]).await.unwrap();
    let server = rows(&fetch(&mut client, info).await);
    assert_eq!(server.len(), 2, "{server:?}");
    assert!(server.iter().any(|r| r[1].contains("Quiver")), "{server:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prepared_statements_take_parameters_and_run_distributed() {
    let t = TestCluster::start(2).await;
    t.run_all(&["CREATE TABLE prep AS SELECT value AS v, value % 7 AS k FROM generate_series(1, 20000)"]).await;
    let mut client = flight_sql(&t).await;
    let sql = "SELECT count(*) AS n, sum(v) AS total FROM prep WHERE k = $1 AND v > $2";
    let mut prepared = client.prepare(sql.to_string(), None).await.unwrap();
    assert_eq!(prepared.parameter_schema().unwrap().fields().len(), 2);
    let result_fields: Vec<String> = prepared.dataset_schema().unwrap().fields().iter().map(|f| f.name().clone()).collect();
    assert_eq!(result_fields, ["n", "total"]);

    let schema = Arc::new(Schema::new(vec![Field::new("$1", DataType::Int64, false), Field::new("$2", DataType::Int64, false)]));
    for (k, v) in [(3, 100), (5, 15000)] {
        let columns = vec![Arc::new(Int64Array::from(vec![k])) as _, Arc::new(Int64Array::from(vec![v])) as _];
        prepared.set_parameters(RecordBatch::try_new(Arc::clone(&schema), columns).unwrap()).unwrap();
        let info = prepared.execute().await.unwrap();
        let actual = rows(&fetch(&mut client, info).await);
        let literal = format!("SELECT count(*) AS n, sum(v) AS total FROM prep WHERE k = {k} AND v > {v}");
        assert_eq!(actual, t.single_rows_after_copy(&literal, "prep").await, "k={k}, v={v}");
    }
    prepared.close().await.unwrap();
    let modes = t.cluster_rows(&format!("SELECT DISTINCT mode FROM quiver.queries WHERE sql = '{sql}'")).await;
    assert_eq!(modes, vec![vec!["distributed".to_string()]]);

    let err = client.prepare("SELECT * FROM no_such_table WHERE x = $1".into(), None).await.err().expect("unknown table");
    assert!(err.to_string().contains("no_such_table"), "{err}");
}

/// States of a Query's Tasks, from `quiver.tasks`.
async fn task_states(t: &TestCluster, query_id: &str) -> Vec<String> {
    let sql = format!("SELECT state FROM quiver.tasks WHERE query_id = '{query_id}'");
    t.cluster_rows(&sql).await.into_iter().map(|r| r[0].clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_flight_info_stops_the_querys_tasks_on_every_worker_and_frees_their_memory() {
    let t = TestCluster::start(2).await;
    t.run_all(&["CREATE TABLE cancel_big AS SELECT value AS v, value % 5 AS k FROM generate_series(1, 20000)"]).await;
    t.run_all(&SHUFFLE_JOINS).await;
    // 20k x 4000 join rows: far too long to be over when the cancel arrives.
    let sql = "SELECT a.k, count(*), sum(b.v) FROM cancel_big a JOIN cancel_big b ON a.k = b.k GROUP BY a.k";
    let statement = t.client.start(sql).await.unwrap();
    let stream = t.client.fetch(&statement).await.unwrap();
    let reader = tokio::spawn(stream.try_collect::<Vec<_>>());
    let (client, started) = (&t.client, &statement);
    wait_for("a task of the query to start", POLL_DEADLINE, move || async move {
        (client.progress(started).await.unwrap().tasks_running > 0).then_some(())
    })
    .await;

    let cancelled_at = Instant::now();
    assert!(t.client.cancel(&statement).await.unwrap(), "the query was running, so the cancel must take");
    let err = reader.await.unwrap().expect_err("a cancelled result must end in an error, never short");
    assert!(err.to_string().contains("cancelled"), "{err}");
    assert_workers_idle(&t, "CancelFlightInfo").await;
    eprintln!("workers idle {} ms after the cancel", cancelled_at.elapsed().as_millis());

    let states = task_states(&t, &statement.handle).await;
    assert!(states.iter().all(|s| s == "succeeded" || s == "cancelled"), "{states:?}");
    assert!(states.iter().any(|s| s == "cancelled"), "{states:?}");
    let progress = t.client.progress(&statement).await.unwrap();
    assert_eq!((progress.state.as_str(), progress.tasks_running), ("cancelled", 0));
    assert!(t.client.cancel(&statement).await.unwrap(), "cancelling is idempotent");
    let done = t.client.start("SELECT 1").await.unwrap();
    t.client.fetch(&done).await.unwrap().try_collect::<Vec<_>>().await.unwrap();
    assert!(!t.client.cancel(&done).await.unwrap(), "a query that succeeded cannot be cancelled");
    assert_eq!(t.cluster_rows("SELECT count(*) FROM cancel_big").await, vec![vec!["20000".to_string()]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_started_result_nobody_fetches_holds_no_worker_and_can_be_cancelled() {
    let t = TestCluster::start(2).await;
    t.run_all(&["CREATE TABLE unfetched AS SELECT value AS v FROM generate_series(1, 50000)"]).await;
    let statement = t.client.start("SELECT v FROM unfetched ORDER BY v DESC").await.unwrap();
    // Until its result is fetched, a query holds no worker: nothing is queued.
    assert_eq!(task_states(&t, &statement.handle).await, Vec::<String>::new());
    assert!(t.client.cancel(&statement).await.unwrap());
    let err = t.client.fetch(&statement).await.err().expect("a cancelled result cannot be fetched");
    assert!(err.to_string().contains("no result waits"), "{err}");
    assert_workers_idle(&t, "cancelling an unfetched result").await;
    assert_eq!(t.client.progress(&statement).await.unwrap().state, "cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn updates_through_do_put_return_the_rows_they_wrote() {
    let t = TestCluster::start(2).await;
    let mut client = flight_sql(&t).await;
    assert_eq!(client.execute_update("CREATE TABLE upd (v BIGINT)".into(), None).await.unwrap(), 0);
    let written = client.execute_update("INSERT INTO upd SELECT value FROM generate_series(1, 300)".into(), None).await.unwrap();
    assert_eq!(written, 300);
    // Regression: a result without columns panicked the handler, which read column 0 first.
    assert_eq!(client.execute_update("SELECT FROM (VALUES (1), (2)) t".into(), None).await.unwrap(), 2);
    let mut prepared = client.prepare("INSERT INTO upd VALUES ($1)".into(), None).await.unwrap();
    let schema = Arc::new(Schema::new(vec![Field::new("$1", DataType::Int64, false)]));
    prepared.set_parameters(RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![1000]))]).unwrap()).unwrap();
    assert_eq!(prepared.execute_update().await.unwrap(), 1);
    assert_eq!(t.cluster_rows("SELECT count(*), sum(v) FROM upd").await, vec![vec!["301".to_string(), "46150".to_string()]]);
    let err = client.execute_update("INSERT INTO nowhere VALUES (1)".into(), None).await.err().expect("unknown table");
    assert!(err.to_string().contains("nowhere"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flight_info_announces_the_schema_do_get_delivers_even_for_dictionaries() {
    let t = TestCluster::start(1).await;
    let statement = t.client.start("SELECT arrow_cast('a', 'Dictionary(Int32, Utf8)') AS d, 1 AS n").await.unwrap();
    let stream = t.client.fetch(&statement).await.unwrap();
    let batches: Vec<RecordBatch> = stream.try_collect().await.unwrap();
    assert_eq!(statement.schema.field(0).data_type(), &DataType::Utf8, "{:?}", statement.schema);
    assert_eq!(batches[0].schema().fields(), statement.schema.fields());
    assert_eq!(rows(&batches), vec![vec!["a".to_string(), "1".to_string()]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_goes_away_while_its_write_runs_cancels_it_and_leaves_nothing() {
    // Regression: a statement whose start (a write, planning) was dropped stayed `running`
    // forever, with its Tasks holding the workers.
    let t = TestCluster::start(2).await;
    t.run_all(&["CREATE TABLE gone_src AS SELECT value AS v FROM generate_series(1, 20000)"]).await;
    let sql = "CREATE TABLE gone AS SELECT a.v FROM gone_src a, gone_src b WHERE a.v + b.v < 0";
    let client = t.client.clone();
    let call = tokio::spawn(async move { client.start(sql).await });
    let running = format!(
        "SELECT count(*) > 0 FROM quiver.tasks t JOIN quiver.queries q ON t.query_id = q.query_id \
         WHERE q.sql = '{sql}' AND t.state = 'running'"
    );
    t.wait_for_rows(&running, &["true"]).await;
    call.abort();
    t.wait_for_rows(&format!("SELECT state FROM quiver.queries WHERE sql = '{sql}'"), &["cancelled"]).await;
    assert_workers_idle(&t, "an abandoned write").await;
    let err = t.client.collect("SELECT * FROM gone").await.unwrap_err();
    assert!(err.to_string().contains("gone"), "{err}");
    let table_dir = t.dir.path().join("data").join("tables").join("gone");
    let left: Vec<_> = std::fs::read_dir(&table_dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "the abandoned write left {left:?}");
}
