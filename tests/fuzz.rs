//! Bounded fuzzing of every decoder that takes bytes from the network: tickets, actions and
//! control messages, Flight SQL commands, and a worker decoding a Task's plan. Inputs are random
//! bytes and mutations of real messages (bits flipped, cut short, bytes inserted), from a fixed
//! seed so that a failure repeats. Every input must be answered with an error or a value, never
//! a panic, and the servers must keep serving.

mod common;

use std::panic::AssertUnwindSafe;

use common::Rng;

use arrow_flight::sql::{Any, CommandStatementQuery, ProstMessageExt, TicketStatementQuery};
use arrow_flight::{Action, FlightClient, FlightDescriptor, Ticket};
use datafusion::prelude::SessionContext;
use prost::Message;
use quiver::protocol::{
    decode_plan, encode_plan, Heartbeat, OutputTicket, PollTask, PollTaskResponse, QueryProgressRequest, RegisterWorker,
    KeyFilterSpec, ReleaseAttempt, ReleaseQuery, StageKeyFilter, TaskAssignment, TaskKey, TaskReport,
};

/// Inputs per decoder.
const CASES: usize = 400;
/// Longest random input.
const RANDOM_BYTES_MAX: usize = 300;

/// A random input, or a mutation of one of `seeds`: bits flipped, cut short, bytes inserted
/// or replaced.
fn input(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    if seeds.is_empty() || rng.below(4) == 0 {
        let n = rng.below(RANDOM_BYTES_MAX);
        return rng.bytes(n);
    }
    let mut bytes = rng.pick(seeds).clone();
    for _ in 0..=rng.below(4) {
        let at = rng.below(bytes.len() + 1);
        let last = bytes.len().saturating_sub(1);
        match rng.below(4) {
            0 if !bytes.is_empty() => bytes[at.min(last)] ^= 1 << rng.below(8),
            1 => bytes.truncate(at),
            2 => {
                let n = rng.below(8);
                let extra = rng.bytes(n);
                bytes.splice(at..at, extra);
            }
            _ if !bytes.is_empty() => bytes[at.min(last)] = rng.next() as u8,
            _ => {}
        }
    }
    bytes
}

fn key() -> TaskKey {
    TaskKey { query_id: "q-0123456789ab".into(), stage: 2, task: 5, attempt: 1 }
}

/// A Stage's key filter as the coordinator sends it to a worker: 1024 bits, as a Bloom filter
/// of few keys is sized.
fn stage_key_filter() -> Vec<u8> {
    let filter = KeyFilterSpec { keys: vec![0, 2], bits: vec![0b1010_0101; 128] };
    StageKeyFilter { query_id: "q-1".into(), stage: 1, filter: Some(filter) }.encode_to_vec()
}

#[test]
fn control_messages_and_tickets_decode_or_fail_without_panicking() {
    let seeds = vec![
        OutputTicket { key: Some(key()), partition: 3 }.encode_to_vec(),
        RegisterWorker { address: "http://127.0.0.1:1".into(), slots: 4, memory_limit_bytes: 1 << 30, express_slots: 1, version: quiver::protocol::build_version() }.encode_to_vec(),
        Heartbeat { worker_id: "w-1".into(), tasks: vec![key()], ..Default::default() }.encode_to_vec(),
        PollTask { worker_id: "w-1".into(), session: 7, max_tasks: 4, express_tasks: 1 }.encode_to_vec(),
        ReleaseAttempt { key: Some(key()) }.encode_to_vec(),
        ReleaseQuery { query_id: "q-1".into() }.encode_to_vec(),
        QueryProgressRequest { query_id: "q-1".into() }.encode_to_vec(),
        stage_key_filter(),
    ];
    let mut rng = Rng::new(1);
    for _ in 0..CASES * 4 {
        let input = input(&mut rng, &seeds);
        let _ = OutputTicket::decode(input.as_slice());
        let _ = RegisterWorker::decode(input.as_slice());
        let _ = Heartbeat::decode(input.as_slice());
        let _ = PollTask::decode(input.as_slice());
        let _ = PollTaskResponse::decode(input.as_slice());
        let _ = TaskAssignment::decode(input.as_slice());
        let _ = TaskReport::decode(input.as_slice());
        let _ = ReleaseAttempt::decode(input.as_slice());
        let _ = StageKeyFilter::decode(input.as_slice());
        let _ = Any::decode(input.as_slice()).map(|any| any.unpack::<CommandStatementQuery>());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_decoding_a_mangled_plan_gets_an_error_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = SessionContext::new().enable_url_table();
    let file = dir.path().join("t.parquet");
    ctx.sql(&format!("COPY (SELECT value AS a, value % 7 AS b, 'x' || value AS c FROM generate_series(1, 100)) TO '{}'", file.display()))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let sql = format!("SELECT b, sum(a), max(c) FROM '{}' WHERE a > 10 GROUP BY b ORDER BY b", file.display());
    let plan = ctx.sql(&sql).await.unwrap().create_physical_plan().await.unwrap();
    let seeds = vec![encode_plan(plan).unwrap()];
    let task_ctx = ctx.task_ctx();
    let mut rng = Rng::new(2);
    let mut panics = Vec::new();
    for case in 0..CASES * 5 {
        let input = input(&mut rng, &seeds);
        let decoded = std::panic::catch_unwind(AssertUnwindSafe(|| decode_plan(&input, &task_ctx, None)));
        if decoded.is_err() {
            panics.push(case);
        }
    }
    assert!(panics.is_empty(), "decoding panicked on cases {panics:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_from_the_network_is_answered_with_errors_and_the_servers_keep_serving() {
    let t = common::TestCluster::start(1).await;
    t.client.collect("CREATE TABLE f AS SELECT value AS v FROM generate_series(1, 100)").await.unwrap();
    let member = t.cluster.member_security("fuzzer").credentials.header().unwrap();
    let connect = |url: String| {
        let member = member.clone();
        async move {
            let channel = tonic::transport::Endpoint::from_shared(url).unwrap().connect().await.unwrap();
            let mut client = FlightClient::new(channel);
            client.add_header("authorization", &member).unwrap();
            client
        }
    };
    let mut coordinator = connect(t.cluster.url()).await;
    let worker_url = t.cluster.workers[0].as_ref().unwrap().url().to_string();
    let mut worker = connect(worker_url).await;
    let flight_sql_seeds = vec![
        CommandStatementQuery { query: "SELECT 1".into(), transaction_id: None }.as_any().encode_to_vec(),
        TicketStatementQuery { statement_handle: "q-0123456789ab".into() }.as_any().encode_to_vec(),
    ];
    let ticket_seeds = vec![OutputTicket { key: Some(key()), partition: 0 }.encode_to_vec()];
    let action_seeds = vec![
        PollTask { worker_id: "w-1".into(), session: 7, max_tasks: 4, express_tasks: 1 }.encode_to_vec(),
        TaskReport::default().encode_to_vec(),
        ReleaseQuery { query_id: "q-1".into() }.encode_to_vec(),
        stage_key_filter(),
    ];
    let mut rng = Rng::new(3);
    for case in 0..CASES / 2 {
        let command = input(&mut rng, &flight_sql_seeds);
        let _ = coordinator.get_flight_info(FlightDescriptor::new_cmd(command.clone())).await;
        let _ = coordinator.do_get(Ticket::new(command)).await;
        // Actions a worker sends; an unknown registration or report must change nothing.
        let name = ["heartbeat", "poll_task", "report_task", "query_progress", "CancelFlightInfo"][rng.below(5)];
        let _ = coordinator.do_action(Action::new(name, input(&mut rng, &action_seeds))).await;
        let _ = worker.do_get(Ticket::new(input(&mut rng, &ticket_seeds))).await;
        let name = ["release_query", "release_attempt", "stage_key_filter", "no_such_action"][rng.below(4)];
        let _ = worker.do_action(Action::new(name, input(&mut rng, &action_seeds))).await;
        if case % 50 == 0 {
            assert_eq!(t.cluster_rows("SELECT sum(v) FROM f").await, vec![vec!["5050".to_string()]], "after case {case}");
        }
    }
    assert_eq!(t.cluster_rows("SELECT sum(v) FROM f").await, vec![vec!["5050".to_string()]]);
    assert_eq!(t.cluster.coordinator.core.cluster.workers().iter().filter(|w| w.alive).count(), 1, "the worker is still there");
}
