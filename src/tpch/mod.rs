//! Built-in TPC-H data: generated once per scale factor with the tpchgen crates, written as
//! Parquet under the data directory, and registered as external tables.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::RecordBatchReader;
use datafusion::common::{DataFusionError, Result};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::Compression;
use datafusion::parquet::file::properties::WriterProperties;
use tpchgen::generators::*;
use tpchgen_arrow::*;

pub const TABLES: [&str; 8] = ["nation", "region", "part", "supplier", "partsupp", "customer", "orders", "lineitem"];

/// How generated data is laid out: more files and smaller row groups make more Tasks.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// Files per table (nation and region always have one).
    pub files: usize,
    pub row_group_rows: usize,
}

impl Layout {
    /// One file per table, row groups of 128K rows: Tasks split files by row-group ranges.
    /// (tpchgen's multi-part output does not reproduce the official answers' text columns, so
    /// generated data stays one part per table.)
    pub fn for_scale(_sf: f64) -> Self {
        Self { files: 1, row_group_rows: 128 * 1024 }
    }
}

/// Generates the tables under `root` unless a previous run finished them; returns their folder.
pub fn generate(root: &Path, sf: f64, layout: Layout) -> Result<PathBuf> {
    let dir = root.join(format!("tpch-sf{sf}-f{}-rg{}", layout.files, layout.row_group_rows));
    let done = dir.join("_SUCCESS");
    if done.exists() {
        return Ok(std::fs::canonicalize(&dir)?);
    }
    for table in TABLES {
        let parts = if matches!(table, "nation" | "region") { 1 } else { layout.files };
        let table_dir = dir.join(table);
        std::fs::create_dir_all(&table_dir)?;
        for part in 1..=parts {
            let path = table_dir.join(format!("part-{part}.parquet"));
            write_part(&path, table, sf, part as i32, parts as i32, layout.row_group_rows)?;
        }
    }
    File::create(&done)?;
    Ok(std::fs::canonicalize(&dir)?)
}

fn reader(table: &str, sf: f64, part: i32, parts: i32) -> Result<Box<dyn RecordBatchReader>> {
    Ok(match table {
        "nation" => Box::new(NationArrow::new(NationGenerator::new(sf, part, parts))),
        "region" => Box::new(RegionArrow::new(RegionGenerator::new(sf, part, parts))),
        "part" => Box::new(PartArrow::new(PartGenerator::new(sf, part, parts))),
        "supplier" => Box::new(SupplierArrow::new(SupplierGenerator::new(sf, part, parts))),
        "partsupp" => Box::new(PartSuppArrow::new(PartSuppGenerator::new(sf, part, parts))),
        "customer" => Box::new(CustomerArrow::new(CustomerGenerator::new(sf, part, parts))),
        "orders" => Box::new(OrderArrow::new(OrderGenerator::new(sf, part, parts))),
        "lineitem" => Box::new(LineItemArrow::new(LineItemGenerator::new(sf, part, parts))),
        other => return Err(DataFusionError::Plan(format!("unknown TPC-H table {other}"))),
    })
}

fn write_part(path: &Path, table: &str, sf: f64, part: i32, parts: i32, row_group_rows: usize) -> Result<()> {
    let batches = reader(table, sf, part, parts)?;
    let schema = batches.schema();
    let tmp = path.with_extension("parquet.tmp");
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(row_group_rows))
        .build();
    let mut writer = ArrowWriter::try_new(File::create(&tmp)?, Arc::clone(&schema), Some(props))?;
    for batch in batches {
        writer.write(&batch?)?;
    }
    writer.close()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The statements that register the generated tables.
pub fn create_tables_sql(dir: &Path) -> Vec<String> {
    TABLES
        .iter()
        .map(|t| format!("CREATE OR REPLACE EXTERNAL TABLE {t} STORED AS PARQUET LOCATION '{}/{t}/'", dir.display()))
        .collect()
}

/// The 22 TPC-H queries in DataFusion's dialect, compiled in: the demo and the benchmarks work
/// from any install, with no copy of the specification beside it.
const QUERIES: [&str; 22] = [
    include_str!("queries/q01.sql"),
    include_str!("queries/q02.sql"),
    include_str!("queries/q03.sql"),
    include_str!("queries/q04.sql"),
    include_str!("queries/q05.sql"),
    include_str!("queries/q06.sql"),
    include_str!("queries/q07.sql"),
    include_str!("queries/q08.sql"),
    include_str!("queries/q09.sql"),
    include_str!("queries/q10.sql"),
    include_str!("queries/q11.sql"),
    include_str!("queries/q12.sql"),
    include_str!("queries/q13.sql"),
    include_str!("queries/q14.sql"),
    include_str!("queries/q15.sql"),
    include_str!("queries/q16.sql"),
    include_str!("queries/q17.sql"),
    include_str!("queries/q18.sql"),
    include_str!("queries/q19.sql"),
    include_str!("queries/q20.sql"),
    include_str!("queries/q21.sql"),
    include_str!("queries/q22.sql"),
];

/// TPC-H query `n` (1 to 22).
pub fn query_sql(n: usize) -> Result<String> {
    match n.checked_sub(1).and_then(|i| QUERIES.get(i)) {
        Some(sql) => Ok(sql.to_string()),
        None => Err(DataFusionError::Plan(format!("TPC-H has queries 1 to 22, not {n}"))),
    }
}
