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
use crate::storage::{scanned_stores, take_store_options, StoreDefaults, StoreSpec};

/// The stores a table's creation replaced, by URL: what [`Stores::undo`] puts back.
#[must_use]
pub struct Replaced(Vec<(ObjectStoreUrl, Option<Arc<dyn ObjectStore>>, Option<StoreSpec>)>);

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
    /// options, as DataFusion keeps one store per bucket; if the table then cannot be created,
    /// [`Stores::undo`] puts the stores that were open back.
    pub fn open_for(&self, ctx: &SessionContext, create: &mut CreateExternalTable) -> Result<Replaced> {
        // A format DataFusion does not know fails there first, with DataFusion's own words.
        if !ctx.state().table_factories().contains_key(create.file_type.to_uppercase().as_str()) {
            return Ok(Replaced(Vec::new()));
        }
        let table_options = take_store_options(&mut create.options);
        let mut specs = Vec::new();
        for location in &create.locations {
            if let Some(spec) = StoreSpec::resolve(location, &table_options, &self.defaults)? {
                specs.push((spec.object_store_url()?, spec.build()?, spec));
            }
        }
        let mut replaced = Replaced(Vec::new());
        let mut opened = self.opened.lock().expect("stores lock");
        for (url, store, spec) in specs {
            tracing::debug!(store = ?spec, "object store opened");
            let previous_store = ctx.runtime_env().register_object_store(url.as_ref(), store);
            let previous_spec = opened.insert(url.as_str().to_string(), spec);
            replaced.0.push((url, previous_store, previous_spec));
        }
        Ok(replaced)
    }

    /// Puts back the stores an [`Stores::open_for`] replaced: its table was not created, and
    /// the tables already in those stores keep reading them as before.
    pub fn undo(&self, ctx: &SessionContext, replaced: Replaced) {
        let mut opened = self.opened.lock().expect("stores lock");
        for (url, store, spec) in replaced.0.into_iter().rev() {
            match (store, spec) {
                (Some(store), Some(spec)) => {
                    ctx.runtime_env().register_object_store(url.as_ref(), store);
                    opened.insert(url.as_str().to_string(), spec);
                }
                _ => {
                    let _ = ctx.runtime_env().object_store_registry.deregister_store(url.as_ref());
                    opened.remove(url.as_str());
                }
            }
        }
    }

    /// The stores `plan` reads, as Task assignments carry them.
    pub fn for_plan(&self, plan: &Arc<dyn ExecutionPlan>) -> Vec<StoreConfig> {
        let opened = self.opened.lock().expect("stores lock");
        scanned_stores(plan).iter().filter_map(|url| opened.get(url)).map(StoreConfig::from).collect()
    }
}
