//! Writes to tables in an object store (the warehouse): committing the objects of the Attempts
//! that counted, and removing every other object a write left.
//!
//! A store cannot rename a directory, and an Attempt that was cancelled (or lost a speculation
//! race) may still complete an upload after its write ended. So each write puts its objects
//! under a prefix of its own (`<table>/<query id>/`), the catalog lists the committed ones (a
//! reader reads exactly those, never a listing of the prefix), and whatever else appears under
//! the prefix is removed: at once, and again by sweeps spread over the time an upload may
//! still take.

use std::sync::Arc;
use std::time::Duration;

use datafusion::common::{DataFusionError, Result};
use datafusion::prelude::SessionContext;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as StorePath;
use object_store::ObjectStore;

use crate::storage::{object_location, STORE_REQUEST_TIMEOUT_MS};

/// When the objects a write did not commit are removed again after it ended: an upload in
/// flight ends at the latest one request timeout later.
const SWEEP_DELAYS_MS: [u64; 3] = [2_000, 20_000, STORE_REQUEST_TIMEOUT_MS + 5_000];

/// The objects of one write: its store and its prefix there.
#[derive(Clone)]
pub(super) struct WritePrefix {
    store: Arc<dyn ObjectStore>,
    prefix: StorePath,
    /// The prefix as a location (`s3://bucket/warehouse/t/<query id>`), for messages.
    location: String,
}

impl WritePrefix {
    /// The prefix at `location` (a URL in a store the coordinator has opened).
    pub(super) fn open(ctx: &SessionContext, location: &str) -> Result<Self> {
        let Some(located) = object_location(location) else {
            return Err(DataFusionError::Internal(format!("'{location}' is not in an object store")));
        };
        let (url, prefix) = located?;
        Ok(Self { store: ctx.runtime_env().object_store(&url)?, prefix, location: location.to_string() })
    }

    /// The object names (relative to the prefix) under it.
    async fn list(&self) -> Result<Vec<String>> {
        let listed: Vec<_> = self.store.list(Some(&self.prefix)).try_collect().await.map_err(|e| self.failed("list", e))?;
        let prefix = format!("{}/", self.prefix);
        Ok(listed.into_iter().filter_map(|m| m.location.as_ref().strip_prefix(prefix.as_str()).map(str::to_string)).collect())
    }

    /// Keeps the objects named in `counted` (the files of the Attempts whose counts the write
    /// returned) and removes the others; returns the kept names.
    pub(super) async fn commit(&self, counted: &[String]) -> Result<Vec<String>> {
        let (kept, extra): (Vec<String>, Vec<String>) = self.list().await?.into_iter().partition(|n| counted.contains(n));
        self.remove(&extra).await?;
        Ok(kept)
    }

    /// Removes every object under the prefix except `keep`, now and after each sweep delay.
    pub(super) fn sweep(&self, keep: Vec<String>) {
        let prefix = self.clone();
        tokio::spawn(async move {
            for delay_ms in [0].into_iter().chain(SWEEP_DELAYS_MS) {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                let extra = match prefix.list().await {
                    Ok(names) => names.into_iter().filter(|n| !keep.contains(n)).collect::<Vec<_>>(),
                    Err(e) => {
                        tracing::warn!("{e}");
                        continue;
                    }
                };
                if let Err(e) = prefix.remove(&extra).await {
                    tracing::warn!("{e}");
                }
            }
        });
    }

    async fn remove(&self, names: &[String]) -> Result<()> {
        let paths: Vec<_> = names.iter().map(|n| StorePath::parse(format!("{}/{n}", self.prefix)).map_err(object_store::Error::from)).collect();
        let removed = self.store.delete_stream(futures::stream::iter(paths).boxed());
        removed.try_collect::<Vec<_>>().await.map_err(|e| self.failed("remove objects under", e))?;
        Ok(())
    }

    fn failed(&self, what: &str, e: object_store::Error) -> DataFusionError {
        DataFusionError::IoError(std::io::Error::other(format!("cannot {what} '{}': {e}", self.location)))
    }
}

/// Lists one page of `location`: whether the store answers and accepts this coordinator's keys.
pub(super) async fn probe(ctx: &SessionContext, location: &str) -> Result<()> {
    let prefix = WritePrefix::open(ctx, location.trim_end_matches('/'))?;
    prefix.store.list_with_delimiter(Some(&prefix.prefix)).await.map_err(|e| prefix.failed("list", e))?;
    Ok(())
}

/// Removes the given objects of a table in a store (files of a dropped or replaced table),
/// in the background: the catalog no longer lists them, and no Query that read them runs.
pub(super) fn remove_files(ctx: &SessionContext, location: &str, files: Vec<String>) {
    if files.is_empty() {
        return;
    }
    if tokio::runtime::Handle::try_current().is_err() {
        tracing::warn!("cannot remove {} files of '{location}' outside the runtime", files.len());
        return;
    }
    match WritePrefix::open(ctx, location.trim_end_matches('/')) {
        Ok(table) => {
            tokio::spawn(async move {
                if let Err(e) = table.remove(&files).await {
                    tracing::warn!("{e}");
                }
            });
        }
        Err(e) => tracing::warn!("cannot remove the files of '{location}': {e}"),
    }
}

/// Removes everything under a write's prefix when dropped (the write failed, or its statement
/// was dropped half-way), unless disarmed by a commit.
pub(super) struct SweepOnDrop(pub(super) Option<WritePrefix>);

impl Drop for SweepOnDrop {
    fn drop(&mut self) {
        if let Some(prefix) = self.0.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                prefix.sweep(Vec::new());
            }
        }
    }
}
