//! Flight servers of this same process, read without the network. `quiver local` runs the
//! coordinator and every worker in one process: a Task output fetched from a worker of the
//! same process would otherwise be encoded as Arrow IPC, framed by gRPC, sent over loopback
//! and decoded again, which costs CPU that the query itself needs (issue 13 measured about
//! 900 MB of such traffic per TPC-H SF1 run). A server registered here is asked directly: the
//! reader gets the batches the worker holds, shared, not copied.
//!
//! Registration lives exactly as long as the server: [`ServerHandle`](super::ServerHandle)
//! removes it when it stops or is aborted (a killed worker must be as unreadable in-process as
//! over the network), and a handler that was dropped is never reached.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};

use bytes::Bytes;
use datafusion::common::Result;
use datafusion::execution::SendableRecordBatchStream;

use super::server::FlightHandler;
use crate::auth::{Caller, Role};

/// Handlers by the URL their servers are reached at.
static SERVED: LazyLock<Mutex<HashMap<String, Weak<dyn FlightHandler>>>> = LazyLock::new(Mutex::default);

/// Reads served in-process since the process started.
static READS: AtomicU64 = AtomicU64::new(0);

/// How many Task output reads this process served without the network.
pub fn in_process_reads_total() -> u64 {
    READS.load(Ordering::Relaxed)
}

/// The registration of one server; dropping it removes the server from the registry.
pub(super) struct Registration {
    url: String,
    handler: Weak<dyn FlightHandler>,
}

impl Registration {
    pub(super) fn new(url: &str, handler: Arc<dyn FlightHandler>) -> Self {
        let handler = Arc::downgrade(&handler);
        SERVED.lock().expect("in-process lock").insert(url.to_string(), handler.clone());
        Self { url: url.to_string(), handler }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut served = SERVED.lock().expect("in-process lock");
        // Another server may have taken the URL since (a worker restarted on its port).
        if served.get(&self.url).is_some_and(|h| Weak::ptr_eq(h, &self.handler)) {
            served.remove(&self.url);
        }
    }
}

/// The handler serving `url` in this process, if any.
fn handler(url: &str) -> Option<Arc<dyn FlightHandler>> {
    SERVED.lock().expect("in-process lock").get(url).and_then(Weak::upgrade)
}

/// `do_get` of the server at `url` when it runs in this process, as the process itself calls
/// it: a cluster member, which is what a fetch over the network would present. `None`: the
/// server is elsewhere, fetch over the network.
pub(super) async fn do_get(url: &str, ticket: Bytes) -> Option<Result<SendableRecordBatchStream>> {
    let handler = handler(url)?;
    let caller = Caller { name: "this process".into(), role: Role::Node };
    READS.fetch_add(1, Ordering::Relaxed);
    Some(handler.do_get(&caller, ticket).await)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{OutputTicket, TaskKey};
    use crate::transport::fetch_output;
    use crate::transport::ClientSecurity;
    use datafusion::arrow::array::{Int64Array, RecordBatch};
    use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
    use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
    use futures::TryStreamExt;
    use prost::Message;

    /// Serves one batch for any ticket, and remembers the ticket.
    struct OneBatch {
        batch: RecordBatch,
        tickets: Mutex<Vec<OutputTicket>>,
    }

    #[async_trait::async_trait]
    impl FlightHandler for OneBatch {
        async fn do_get(&self, caller: &Caller, ticket: Bytes) -> Result<SendableRecordBatchStream> {
            assert!(caller.is_node(), "an in-process reader is a cluster member");
            self.tickets.lock().unwrap().push(OutputTicket::decode(ticket).unwrap());
            let batch = self.batch.clone();
            Ok(Box::pin(RecordBatchStreamAdapter::new(batch.schema(), futures::stream::iter([Ok(batch)]))))
        }

        async fn do_action(&self, _caller: &Caller, _name: &str, _body: Bytes) -> Result<Bytes> {
            unreachable!("outputs are only read")
        }
    }

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]))
    }

    /// Nothing listens at the URL: a read that succeeds went through the registry, and once
    /// the registration is dropped the same read is a network fetch, and fails.
    #[tokio::test]
    async fn a_registered_server_is_read_without_the_network_until_it_stops() {
        let url = "http://127.0.0.1:9";
        let batch = RecordBatch::try_new(schema(), vec![Arc::new(Int64Array::from(vec![1, 2, 3]))]).unwrap();
        let handler = Arc::new(OneBatch { batch: batch.clone(), tickets: Mutex::default() });
        let registration = Registration::new(url, Arc::clone(&handler) as Arc<dyn FlightHandler>);
        let key = TaskKey { query_id: "q".into(), stage: 1, task: 2, attempt: 0 };
        let read = fetch_output(&ClientSecurity::default(), url, key.clone(), 3, schema()).await.unwrap();
        let batches: Vec<RecordBatch> = read.try_collect().await.unwrap();
        assert_eq!(batches, vec![batch]);
        assert_eq!(*handler.tickets.lock().unwrap(), vec![OutputTicket { key: Some(key.clone()), partition: 3 }]);

        drop(registration);
        let over_network = async { fetch_output(&ClientSecurity::default(), url, key, 3, schema()).await?.try_collect::<Vec<_>>().await };
        assert!(over_network.await.is_err(), "a stopped server must not be read");
        assert_eq!(handler.tickets.lock().unwrap().len(), 1);
    }

    /// A server that took over a URL keeps it when an older registration of that URL ends.
    #[test]
    fn an_old_registration_does_not_remove_a_newer_one() {
        let url = "http://127.0.0.1:10";
        let batch = RecordBatch::new_empty(schema());
        let old = Arc::new(OneBatch { batch: batch.clone(), tickets: Mutex::default() });
        let new = Arc::new(OneBatch { batch, tickets: Mutex::default() });
        let first = Registration::new(url, Arc::clone(&old) as Arc<dyn FlightHandler>);
        let _second = Registration::new(url, Arc::clone(&new) as Arc<dyn FlightHandler>);
        drop(first);
        let found = handler(url).expect("the newer server is still registered");
        assert!(Arc::ptr_eq(&found, &(Arc::clone(&new) as Arc<dyn FlightHandler>)));
    }
}
