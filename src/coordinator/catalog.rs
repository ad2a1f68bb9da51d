//! The persistent catalog: table and view definitions under the data directory, written
//! atomically (temporary file + rename) so that a crash leaves the old or the new catalog,
//! never half of one. Tables Quiver writes are lists of committed segment directories; a write
//! becomes visible in one step, when its segment is added here.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::catalog::MemTable;
use datafusion::common::{DataFusionError, Result, TableReference};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl};
use datafusion::prelude::SessionContext;
use serde::{Deserialize, Serialize};

const CATALOG_FILE: &str = "catalog.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TableDef {
    /// A table over files Quiver does not own; replayed from its CREATE statement.
    External { name: String, sql: String },
    /// A view; replayed from its CREATE statement.
    View { name: String, sql: String },
    /// A table whose Parquet files Quiver wrote, one directory per committed write.
    Managed {
        name: String,
        #[serde(with = "ipc_schema")]
        schema: Schema,
        segments: Vec<String>,
    },
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
        std::fs::write(&tmp, text)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, self.data_dir.join(CATALOG_FILE))?;
        Ok(())
    }

    /// Registers a definition with DataFusion, replacing any table of the same name. The name
    /// is taken as it is, never parsed again: a quoted `"T1"` or `"a.b"` stays itself.
    pub async fn register(&self, ctx: &SessionContext, def: &TableDef) -> Result<()> {
        match def {
            TableDef::External { sql, .. } | TableDef::View { sql, .. } => {
                ctx.sql(sql).await?;
            }
            TableDef::Managed { name, schema, segments } => {
                let provider = self.managed_provider(ctx, name, Arc::new(schema.clone()), segments).await?;
                ctx.deregister_table(TableReference::bare(name.as_str()))?;
                ctx.register_table(TableReference::bare(name.as_str()), provider)?;
            }
        }
        Ok(())
    }

    async fn managed_provider(
        &self,
        ctx: &SessionContext,
        name: &str,
        schema: SchemaRef,
        segments: &[String],
    ) -> Result<Arc<dyn datafusion::catalog::TableProvider>> {
        if segments.is_empty() {
            return Ok(Arc::new(MemTable::try_new(schema, vec![vec![]])?));
        }
        let urls = segments
            .iter()
            .map(|s| {
                let dir = self.table_dir(name).join(s);
                ListingTableUrl::parse(format!("{}/", dir.to_string_lossy()))
            })
            .collect::<Result<Vec<_>>>()?;
        let options = ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
        let config = ListingTableConfig::new_with_multi_paths(urls).with_listing_options(options).with_schema(schema);
        let _ = ctx;
        Ok(Arc::new(ListingTable::try_new(config)?))
    }
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
