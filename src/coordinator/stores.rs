//! The object stores the coordinator's tables live in: opened when an external table is created
//! (or the catalog is replayed), kept by URL, and named in each Query's Task assignments so that
//! every worker opens the same stores the coordinator planned with.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use datafusion::common::Result;
use datafusion::execution::object_store::ObjectStoreUrl;
use object_store::ObjectStore;
use datafusion::logical_expr::CreateExternalTable;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;

use crate::protocol::StoreConfig;
use crate::storage::{object_location, scanned_stores, take_store_options, StoreDefaults, StoreSpec};

/// The stores a table's creation opened, with those they replaced. Dropped without
/// [`Opened::keep`] (the table was not created, or its statement was dropped half-way), it puts
/// the replaced stores back, so the tables already in them read on as before.
#[must_use]
pub struct Opened<'a> {
    stores: &'a Stores,
    ctx: &'a SessionContext,
    replaced: Vec<(ObjectStoreUrl, Option<Arc<dyn ObjectStore>>, Option<StoreSpec>)>,
}

impl Opened<'_> {
    /// The table was created: its stores stay open.
    pub fn keep(mut self) {
        self.replaced.clear();
    }
}

impl Drop for Opened<'_> {
    fn drop(&mut self) {
        let mut opened = self.stores.opened.lock().expect("stores lock");
        for (url, store, spec) in self.replaced.drain(..).rev() {
            match (store, spec) {
                (Some(store), Some(spec)) => {
                    self.ctx.runtime_env().register_object_store(url.as_ref(), store);
                    opened.insert(url.as_str().to_string(), spec);
                }
                _ => {
                    let _ = self.ctx.runtime_env().object_store_registry.deregister_store(url.as_ref());
                    opened.remove(url.as_str());
                }
            }
        }
    }
}

#[derive(Debug, Default)]
pub struct Stores {
    defaults: StoreDefaults,
    /// By DataFusion's name for each store (`s3://bucket/`).
    opened: Mutex<HashMap<String, StoreSpec>>,
}

impl Stores {
    pub fn new(defaults: StoreDefaults) -> Self {
        Self { defaults, opened: Mutex::default() }
    }

    /// Takes the store options out of an external table's `OPTIONS` (DataFusion would refuse
    /// them) and opens the store its locations are in, for `ctx` and for the Queries that read
    /// it. A store opened again (another table in the same bucket) is opened with the newer
    /// options, as DataFusion keeps one store per bucket, until the returned [`Opened`] is
    /// dropped without being kept.
    pub fn open_for<'a>(&'a self, ctx: &'a SessionContext, create: &mut CreateExternalTable) -> Result<Opened<'a>> {
        // A format DataFusion does not know fails there first, with DataFusion's own words.
        if !ctx.state().table_factories().contains_key(create.file_type.to_uppercase().as_str()) {
            return Ok(Opened { stores: self, ctx, replaced: Vec::new() });
        }
        let table_options = take_store_options(&mut create.options);
        let mut specs = Vec::new();
        for location in &create.locations {
            if let Some(spec) = StoreSpec::resolve(location, &table_options, &self.defaults)? {
                specs.push((spec.object_store_url()?, spec.build()?, spec));
            }
        }
        let mut replaced = Opened { stores: self, ctx, replaced: Vec::new() };
        let mut opened = self.opened.lock().expect("stores lock");
        for (url, store, spec) in specs {
            tracing::debug!(store = ?spec, "object store opened");
            let previous_store = ctx.runtime_env().register_object_store(url.as_ref(), store);
            let previous_spec = opened.insert(url.as_str().to_string(), spec);
            replaced.replaced.push((url, previous_store, previous_spec));
        }
        Ok(replaced)
    }

    /// Opens the store `location` is in with the coordinator's options (the environment and
    /// `--store-option`), unless a table opened it already: the warehouse Quiver writes tables
    /// to, and the tables written there.
    pub fn open_location(&self, ctx: &SessionContext, location: &str) -> Result<()> {
        let Some(spec) = StoreSpec::resolve(location, &[], &self.defaults)? else { return Ok(()) };
        let url = spec.object_store_url()?;
        let mut opened = self.opened.lock().expect("stores lock");
        if !opened.contains_key(url.as_str()) {
            tracing::debug!(store = ?spec, "object store opened");
            ctx.runtime_env().register_object_store(url.as_ref(), spec.build()?);
            opened.insert(url.as_str().to_string(), spec);
        }
        Ok(())
    }

    /// The store `location` is in, as Task assignments carry it; None for a local path.
    pub fn for_location(&self, location: &str) -> Option<StoreConfig> {
        let (url, _) = object_location(location)?.ok()?;
        self.opened.lock().expect("stores lock").get(url.as_str()).map(StoreConfig::from)
    }

    /// The stores `plan` reads, as Task assignments carry them.
    pub fn for_plan(&self, plan: &Arc<dyn ExecutionPlan>) -> Vec<StoreConfig> {
        let opened = self.opened.lock().expect("stores lock");
        scanned_stores(plan).iter().filter_map(|url| opened.get(url)).map(StoreConfig::from).collect()
    }
}
