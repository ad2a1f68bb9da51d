//! The persistent catalog: table and view definitions under the data directory, written
//! atomically (temporary file + rename) so that a crash leaves the old or the new catalog,
//! never half of one. Tables Quiver writes are lists of committed segment directories; a write
//! becomes visible in one step, when its segment is added here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::catalog::MemTable;
use datafusion::catalog::TableProvider;
use datafusion::common::tree_node::{Transformed, TreeNodeRecursion};
use datafusion::common::{plan_err, Constraint, Constraints, DFSchema, DataFusionError, Result, TableReference};
use datafusion::catalog::view::ViewTable;
use datafusion::datasource::{provider_as_source, source_as_provider};
use datafusion::logical_expr::TableSource;
use datafusion::logical_expr::{DdlStatement, Expr, LogicalPlan};
use datafusion::sql::unparser::expr_to_sql;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl};
use datafusion::prelude::SessionContext;
use serde::{Deserialize, Serialize};

use super::stores::Stores;

const CATALOG_FILE: &str = "catalog.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TableDef {
    /// A table over files Quiver does not own; replayed from its CREATE statement.
    External { name: String, sql: String },
    /// A view; replayed from its CREATE statement.
    View { name: String, sql: String },
    /// A table whose Parquet files Quiver wrote: in the data directory, one directory per
    /// committed write (`segments`); or in an object store under `location`, which cannot
    /// rename a directory, as the list of committed objects (`files`).
    Managed {
        name: String,
        #[serde(with = "ipc_schema")]
        schema: Schema,
        segments: Vec<String>,
        /// The table's prefix in an object store (`s3://bucket/warehouse/t/`); None: the table
        /// lives in the data directory.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        location: Option<String>,
        /// The committed objects, relative to `location` (`<query id>/part-1-0-a1.parquet`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        files: Vec<String>,
        /// PRIMARY KEY and UNIQUE constraints, which DataFusion plans with (functional
        /// dependencies) and enforces as NOT NULL.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        keys: Vec<KeyDef>,
        /// Column DEFAULTs an INSERT that leaves the column out writes: (column, SQL expression).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        defaults: Vec<(String, String)>,
    },
}

/// A PRIMARY KEY (`unique` false) or UNIQUE constraint over columns by index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyDef {
    pub unique: bool,
    pub columns: Vec<usize>,
}

impl KeyDef {
    pub fn from_constraints(constraints: &Constraints) -> Vec<KeyDef> {
        constraints
            .iter()
            .map(|c| match c {
                Constraint::PrimaryKey(columns) => KeyDef { unique: false, columns: columns.clone() },
                Constraint::Unique(columns) => KeyDef { unique: true, columns: columns.clone() },
            })
            .collect()
    }

    fn to_constraints(keys: &[KeyDef]) -> Constraints {
        let each = keys.iter().map(|k| match k.unique {
            false => Constraint::PrimaryKey(k.columns.clone()),
            true => Constraint::Unique(k.columns.clone()),
        });
        Constraints::new_unverified(each.collect())
    }
}

/// Column defaults as SQL text, to be stored.
pub fn defaults_to_sql(defaults: &[(String, Expr)]) -> Result<Vec<(String, String)>> {
    defaults.iter().map(|(column, expr)| Ok((column.clone(), expr_to_sql(expr)?.to_string()))).collect()
}

impl TableDef {
    pub fn name(&self) -> &str {
        match self {
            TableDef::External { name, .. } | TableDef::View { name, .. } | TableDef::Managed { name, .. } => name,
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CatalogFile {
    tables: Vec<TableDef>,
}

/// The catalog on disk. Callers serialise changes (the coordinator holds a lock around them).
#[derive(Debug)]
pub struct Catalog {
    data_dir: PathBuf,
}

impl Catalog {
    pub fn new(data_dir: &Path) -> Self {
        Self { data_dir: data_dir.to_path_buf() }
    }

    pub fn tables_dir(&self) -> PathBuf {
        self.data_dir.join("tables")
    }

    /// The directory of managed table `name`. A quoted name may hold any character, `/` and
    /// `..` included: only letters, digits and `_` go into the path as they are, every other
    /// byte as `%XX`, so that a table's files stay under its own directory.
    pub fn table_dir(&self, name: &str) -> PathBuf {
        self.tables_dir().join(dir_name(name))
    }

    pub fn load(&self) -> Result<Vec<TableDef>> {
        let path = self.data_dir.join(CATALOG_FILE);
        if !path.exists() {
            return Ok(vec![]);
        }
        let text = std::fs::read_to_string(&path)?;
        let file: CatalogFile = serde_json::from_str(&text)
            .map_err(|e| DataFusionError::Execution(format!("corrupt catalog {}: {e}", path.display())))?;
        Ok(file.tables)
    }

    pub fn get(&self, name: &str) -> Result<Option<TableDef>> {
        Ok(self.load()?.into_iter().find(|t| t.name() == name))
    }

    /// Adds or replaces a definition.
    pub fn put(&self, def: TableDef) -> Result<()> {
        let mut tables = self.load()?;
        tables.retain(|t| t.name() != def.name());
        tables.push(def);
        self.store(tables)
    }

    /// Plans every view again over the tables as they are now. DataFusion keeps the plan a
    /// view was created with, its tables' sources included: without this, a view goes on
    /// reading a table as it was (missing rows inserted since, or the files of a table dropped
    /// or replaced since). Each view is replaced where it is (`CREATE OR REPLACE VIEW`: no wait
    /// between taking the old one out and putting the new one in), so a Query planned meanwhile
    /// finds it; a view over another comes after it. A view that cannot
    /// be planned now (a table it reads was dropped) is unregistered, so a Query naming it
    /// fails, until a later change can plan it again. Never fails: the change that called it
    /// has happened; what could not be planned is logged.
    pub async fn replan_views(&self, ctx: &SessionContext) {
        let views = match self.load() {
            Ok(defs) => defs.into_iter().filter_map(|d| if let TableDef::View { name, sql } = d { Some((name, sql)) } else { None }).collect(),
            Err(e) => return tracing::warn!("cannot read the catalog to plan its views again: {e}"),
        };
        for (name, sql) in views_in_order(ctx, views).await {
            if let Err(e) = replace_view(ctx, &sql).await {
                tracing::warn!(view = %name, "the view cannot be planned over the tables as they are now: {e}");
                let _ = ctx.deregister_table(TableReference::bare(name.as_str()));
            }
        }
    }

    pub fn remove(&self, name: &str) -> Result<Option<TableDef>> {
        let mut tables = self.load()?;
        let removed = tables.iter().position(|t| t.name() == name).map(|i| tables.remove(i));
        self.store(tables)?;
        Ok(removed)
    }

    fn store(&self, tables: Vec<TableDef>) -> Result<()> {
        std::fs::create_dir_all(&self.data_dir)?;
        let text = serde_json::to_string_pretty(&CatalogFile { tables })
            .map_err(|e| DataFusionError::Execution(format!("cannot write the catalog: {e}")))?;
        let tmp = self.data_dir.join(format!("{CATALOG_FILE}.tmp"));
        // Readable by the coordinator's user alone: a table's OPTIONS may hold store keys.
        let _ = std::fs::remove_file(&tmp);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp)?;
        std::io::Write::write_all(&mut file, text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, self.data_dir.join(CATALOG_FILE))?;
        // The rename itself is on disk only once its directory is.
        sync_dir(&self.data_dir)
    }

    /// Registers a definition with DataFusion, replacing any table of the same name. The name
    /// is taken as it is, never parsed again: a quoted `"T1"` or `"a.b"` stays itself.
    pub async fn register(&self, ctx: &SessionContext, stores: &Stores, def: &TableDef) -> Result<()> {
        match def {
            TableDef::External { sql, .. } => {
                let mut plan = ctx.state().create_logical_plan(sql).await?;
                let opened = match &mut plan {
                    LogicalPlan::Ddl(DdlStatement::CreateExternalTable(create)) => Some(stores.open_for(ctx, create)?),
                    _ => None,
                };
                ctx.execute_logical_plan(plan).await?;
                if let Some(opened) = opened {
                    opened.keep();
                }
            }
            TableDef::View { sql, .. } => {
                ctx.sql(sql).await?;
            }
            TableDef::Managed { name, schema, segments, location, files, keys, defaults } => {
                let schema = Arc::new(schema.clone());
                let provider = match location {
                    Some(location) => {
                        stores.open_location(ctx, location)?;
                        let urls = files.iter().map(|f| ListingTableUrl::parse(format!("{location}{f}"))).collect::<Result<Vec<_>>>()?;
                        listing_provider(urls, schema.clone())?
                    }
                    None => self.managed_provider(name, Arc::clone(&schema), segments)?,
                };
                let defaults = parse_defaults(ctx, &schema, defaults)?;
                let provider = provider.with_constraints(KeyDef::to_constraints(keys)).with_column_defaults(defaults);
                let provider: Arc<dyn TableProvider> = provider.into();
                ctx.deregister_table(TableReference::bare(name.as_str()))?;
                ctx.register_table(TableReference::bare(name.as_str()), provider)?;
            }
        }
        Ok(())
    }

    /// A table over its committed segments (read as one listing of their Parquet files).
    fn managed_provider(&self, name: &str, schema: SchemaRef, segments: &[String]) -> Result<ManagedProvider> {
        let urls = segments
            .iter()
            .map(|s| {
                let dir = self.table_dir(name).join(s);
                ListingTableUrl::parse(format!("{}/", dir.to_string_lossy()))
            })
            .collect::<Result<Vec<_>>>()?;
        listing_provider(urls, schema)
    }
}

/// A table over Parquet directories or files: empty (a `MemTable`) when there are none.
fn listing_provider(urls: Vec<ListingTableUrl>, schema: SchemaRef) -> Result<ManagedProvider> {
    if urls.is_empty() {
        return Ok(ManagedProvider::Empty(MemTable::try_new(schema, vec![vec![]])?));
    }
    let options = ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
    let config = ListingTableConfig::new_with_multi_paths(urls).with_listing_options(options).with_schema(schema);
    Ok(ManagedProvider::Files(ListingTable::try_new(config)?))
}

/// The prefix of table `name` under `warehouse` (an object store URL): the name as it is when
/// it holds only letters, digits and `_`, else `~` and its bytes in hex (a store path has its
/// own rules for other characters, and `~` is in no plain name).
pub fn store_table_location(warehouse: &str, name: &str) -> String {
    let plain = name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    let part = if plain { name.to_string() } else { format!("~{}", name.bytes().map(|b| format!("{b:02x}")).collect::<String>()) };
    format!("{}/{part}/", warehouse.trim_end_matches('/'))
}

/// A managed table's provider: an empty table before its first write, its files after.
enum ManagedProvider {
    Empty(MemTable),
    Files(ListingTable),
}

impl ManagedProvider {
    fn with_constraints(self, constraints: Constraints) -> Self {
        match self {
            Self::Empty(t) => Self::Empty(t.with_constraints(constraints)),
            Self::Files(t) => Self::Files(t.with_constraints(constraints)),
        }
    }

    fn with_column_defaults(self, defaults: HashMap<String, Expr>) -> Self {
        match self {
            Self::Empty(t) => Self::Empty(t.with_column_defaults(defaults)),
            Self::Files(t) => Self::Files(t.with_column_defaults(defaults)),
        }
    }
}

impl From<ManagedProvider> for Arc<dyn TableProvider> {
    fn from(p: ManagedProvider) -> Self {
        match p {
            ManagedProvider::Empty(t) => Arc::new(t),
            ManagedProvider::Files(t) => Arc::new(t),
        }
    }
}

fn parse_defaults(ctx: &SessionContext, schema: &SchemaRef, defaults: &[(String, String)]) -> Result<HashMap<String, Expr>> {
    let schema = DFSchema::try_from(Arc::clone(schema))?;
    defaults.iter().map(|(column, sql)| Ok((column.clone(), ctx.parse_sql_expr(sql, &schema)?))).collect()
}

/// Schemas are stored as Arrow IPC bytes: the exact Arrow types survive, metadata included.
/// (An IPC message: continuation marker, length, the flatbuffer Schema message.)
mod ipc_schema {
    use datafusion::arrow::datatypes::Schema;
    use datafusion::arrow::ipc::convert::try_schema_from_ipc_buffer;
    use datafusion::arrow::ipc::writer::{write_message, DictionaryTracker, IpcDataGenerator, IpcWriteOptions};
    use serde::{de::Error as _, ser::Error as _, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(schema: &Schema, s: S) -> Result<S::Ok, S::Error> {
        let options = IpcWriteOptions::default();
        let encoded = IpcDataGenerator::default().schema_to_bytes_with_dictionary_tracker(
            schema,
            &mut DictionaryTracker::new(false),
            &options,
        );
        let mut message = Vec::new();
        write_message(&mut message, encoded, &options).map_err(S::Error::custom)?;
        s.serialize_bytes(&message)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Schema, D::Error> {
        let bytes = Vec::<u8>::deserialize(d)?;
        try_schema_from_ipc_buffer(&bytes).map_err(D::Error::custom)
    }
}

/// `name` as one path component: letters, digits and `_` as they are, every other byte `%XX`.
fn dir_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'_' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Puts a directory's entries (renames, new and removed files) on disk.
pub(super) fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// `views` ordered so that a view comes after the views its statement names.
async fn views_in_order(ctx: &SessionContext, views: Vec<(String, String)>) -> Vec<(String, String)> {
    let names: Vec<String> = views.iter().map(|(name, _)| name.clone()).collect();
    let mut reads: Vec<Vec<String>> = Vec::with_capacity(views.len());
    // From the statement's text: a planned view has the views it reads inlined already.
    let state = ctx.state();
    let dialect = state.config().options().sql_parser.dialect;
    for (_, sql) in &views {
        let named = state.sql_to_statement(sql, &dialect).and_then(|statement| state.resolve_table_references(&statement));
        // Views live in the default schema: `quiver.queries` is no view `queries`.
        let default_schema = |t: &TableReference| t.schema().is_none_or(|s| s == "public");
        let named: Vec<String> = named.unwrap_or_default().iter().filter(|t| default_schema(t)).map(|t| t.table().to_string()).collect();
        reads.push(named.into_iter().filter(|t| names.contains(t)).collect());
    }
    let mut ordered = Vec::with_capacity(views.len());
    let mut left: Vec<((String, String), Vec<String>)> = views.into_iter().zip(reads).collect();
    while !left.is_empty() {
        let placed: Vec<String> = ordered.iter().map(|(name, _): &(String, String)| name.clone()).collect();
        let ready = left.iter().position(|((name, _), reads)| reads.iter().all(|r| r == name || placed.contains(r)));
        // No view is ready only in a cycle, which DataFusion cannot create: take the first.
        let (view, _) = left.remove(ready.unwrap_or(0));
        ordered.push(view);
    }
    ordered
}

/// Runs a stored `CREATE VIEW` statement as `CREATE OR REPLACE VIEW`.
async fn replace_view(ctx: &SessionContext, sql: &str) -> Result<()> {
    let plan = match ctx.state().create_logical_plan(sql).await? {
        LogicalPlan::Ddl(DdlStatement::CreateView(mut create)) => {
            create.or_replace = true;
            LogicalPlan::Ddl(DdlStatement::CreateView(create))
        }
        other => other,
    };
    ctx.execute_logical_plan(plan).await?;
    Ok(())
}

/// `plan` with each table of the catalog it scans bound to that table as it is now. A plan
/// stored by SQL `PREPARE` holds the sources its tables had then: without this, `EXECUTE` would
/// miss rows inserted since, or read the files of a table dropped or replaced since. A table
/// that is gone, or whose columns changed (the table scanned, or the one an INSERT writes),
/// fails the statement: it must be prepared again. Other scans (table functions, a recursive
/// CTE's work table, system tables) are left as they are: they are told apart by their
/// provider, since a CTE's work table may share a table's name.
pub async fn bind_current_tables(ctx: &SessionContext, plan: LogicalPlan) -> Result<LogicalPlan> {
    // The kinds of provider the catalog registers (`Catalog::register`): files, an empty
    // managed table, a view.
    let of_catalog = |source: &Arc<dyn TableSource>| {
        source_as_provider(source).is_ok_and(|p| p.is::<ListingTable>() || p.is::<MemTable>() || p.is::<ViewTable>())
    };
    let mut names = Vec::new();
    plan.apply_with_subqueries(|node| {
        match node {
            LogicalPlan::TableScan(scan) if of_catalog(&scan.source) => names.push(scan.table_name.clone()),
            LogicalPlan::Dml(dml) if of_catalog(&dml.target) => names.push(dml.table_name.clone()),
            _ => {}
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    let mut current = HashMap::new();
    for name in names {
        let provider = ctx.table_provider(name.clone()).await?;
        current.insert(name, provider);
    }
    let changed = |name: &TableReference| plan_err!("table {name} changed since the statement was prepared: prepare it again");
    let bound = plan.transform_up_with_subqueries(|node| match node {
        // By provider again: a recursive CTE's work table may share a scanned table's name.
        LogicalPlan::TableScan(mut scan) if of_catalog(&scan.source) && current.contains_key(&scan.table_name) => {
            let provider = &current[&scan.table_name];
            if provider.schema().fields() != scan.source.schema().fields() {
                return changed(&scan.table_name);
            }
            scan.source = provider_as_source(Arc::clone(provider));
            Ok(Transformed::yes(LogicalPlan::TableScan(scan)))
        }
        LogicalPlan::Dml(dml) if of_catalog(&dml.target) && current.contains_key(&dml.table_name) => {
            if current[&dml.table_name].schema().fields() != dml.target.schema().fields() {
                return changed(&dml.table_name);
            }
            Ok(Transformed::no(LogicalPlan::Dml(dml)))
        }
        other => Ok(Transformed::no(other)),
    })?;
    Ok(bound.data)
}

#[cfg(test)]
mod tests {
    use super::dir_name;

    #[test]
    fn a_table_name_never_leaves_its_directory() {
        assert_eq!(dir_name("lineitem_2"), "lineitem_2");
        assert_eq!(dir_name("../../etc"), "%2E%2E%2F%2E%2E%2Fetc");
        assert_eq!(dir_name("a.b"), "a%2Eb");
        assert!(!dir_name("/").contains('/'));
    }
}
