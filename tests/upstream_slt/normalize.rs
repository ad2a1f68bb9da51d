//! Results as DataFusion's own sqllogictest runner writes them, so that the expected results in
//! its files compare, for either engine: NULL as `NULL`, the empty string as `(empty)`, floats
//! rounded half to even to 12 decimals and decimals to their scale, both without trailing zeros
//! (`NaN`, `Infinity`, `-Infinity` as words), other types as Arrow displays them with
//! DataFusion's format options, a last cell with several lines cut into one row per line, and
//! the repository's path written `WORKSPACE_ROOT`. Column types are the letters of its files
//! (`B`, `D`, `I`, `P`, `R`, `T`, `?` for the rest).
//!
//! Written from the rules of `datafusion-sqllogictest`'s `normalize.rs` and `conversion.rs`.

use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Float16Type, Float32Type, Float64Type, Schema};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};

const NULL_TEXT: &str = "NULL";
const EMPTY_TEXT: &str = "(empty)";
/// Decimal places floats are rounded to.
const FLOAT_DIGITS: usize = 12;

/// A column's type as a letter of an upstream `query` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    Boolean,
    DateTime,
    Integer,
    Float,
    Text,
    Timestamp,
    Another,
}

impl sqllogictest::ColumnType for ColumnKind {
    fn from_char(value: char) -> Option<Self> {
        Some(match value {
            'B' => Self::Boolean,
            'D' => Self::DateTime,
            'I' => Self::Integer,
            'P' => Self::Timestamp,
            'R' => Self::Float,
            'T' => Self::Text,
            _ => Self::Another,
        })
    }

    fn to_char(&self) -> char {
        match self {
            Self::Boolean => 'B',
            Self::DateTime => 'D',
            Self::Integer => 'I',
            Self::Timestamp => 'P',
            Self::Float => 'R',
            Self::Text => 'T',
            Self::Another => '?',
        }
    }
}

pub fn column_kinds(schema: &Schema) -> Vec<ColumnKind> {
    schema.fields().iter().map(|f| column_kind(f.data_type())).collect()
}

pub fn column_kind(t: &DataType) -> ColumnKind {
    match t {
        DataType::Boolean => ColumnKind::Boolean,
        t if t.is_integer() => ColumnKind::Integer,
        t if t.is_floating() => ColumnKind::Float,
        DataType::Decimal32(..) | DataType::Decimal64(..) | DataType::Decimal128(..) | DataType::Decimal256(..) => ColumnKind::Float,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => ColumnKind::Text,
        DataType::Date32 | DataType::Date64 | DataType::Time32(_) | DataType::Time64(_) => ColumnKind::DateTime,
        DataType::Timestamp(..) => ColumnKind::Timestamp,
        // Dictionary-encoded strings are text; any other dictionary (of dictionaries too) is not.
        DataType::Dictionary(key, value)
            if key.is_integer() && matches!(value.as_ref(), DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View) =>
        {
            ColumnKind::Text
        }
        _ => ColumnKind::Another,
    }
}

/// Every row as cells of text; `workspace_root` is written `WORKSPACE_ROOT`.
pub fn rows(batches: &[RecordBatch], workspace_root: &str) -> Result<Vec<Vec<String>>, ArrowError> {
    let mut options = datafusion::config::FormatOptions::default();
    options.null = NULL_TEXT.to_string();
    let options: FormatOptions = (&options).try_into().map_err(|e| ArrowError::ExternalError(Box::new(e)))?;
    let mut out = Vec::new();
    for batch in batches {
        let columns: Vec<ArrayRef> = batch.columns().iter().map(decoded).collect();
        // A type Arrow cannot display fails only when one of its values is printed.
        let formatters: Vec<_> = columns.iter().map(|c| ArrayFormatter::try_new(c.as_ref(), &options)).collect();
        for row in 0..batch.num_rows() {
            let cells = columns.iter().zip(&formatters).map(|(c, f)| cell(c, f, row)).collect::<Result<Vec<_>, _>>()?;
            let cells = cells.into_iter().map(|c| c.replace(workspace_root, "WORKSPACE_ROOT")).collect();
            out.extend(split_lines(cells));
        }
    }
    Ok(out)
}

/// A dictionary column as its values (formatted by their own type's rules); anything else as is.
fn decoded(column: &ArrayRef) -> ArrayRef {
    match column.data_type() {
        DataType::Dictionary(_, value) => {
            datafusion::arrow::compute::cast(column, value).unwrap_or_else(|_| column.clone())
        }
        _ => column.clone(),
    }
}

type Formatter<'a> = Result<ArrayFormatter<'a>, ArrowError>;

fn cell(column: &ArrayRef, formatter: &Formatter, row: usize) -> Result<String, ArrowError> {
    if column.is_null(row) {
        return Ok(NULL_TEXT.to_string());
    }
    Ok(match column.data_type() {
        DataType::Null => NULL_TEXT.to_string(),
        DataType::Boolean => column.as_boolean().value(row).to_string(),
        DataType::Float16 => {
            let v = column.as_primitive::<Float16Type>().value(row).to_f32();
            float_text(f64::from(v), &v.to_string())
        }
        DataType::Float32 => {
            let v = column.as_primitive::<Float32Type>().value(row);
            float_text(f64::from(v), &v.to_string())
        }
        DataType::Float64 => {
            let v = column.as_primitive::<Float64Type>().value(row);
            float_text(v, &v.to_string())
        }
        // Arrow prints a decimal with exactly its scale's digits: only trailing zeros go.
        DataType::Decimal32(..) | DataType::Decimal64(..) | DataType::Decimal128(..) | DataType::Decimal256(..) => {
            round_plain(&displayed(formatter, row)?, usize::MAX)
        }
        DataType::Utf8 => string_text(column.as_string::<i32>().value(row)),
        DataType::LargeUtf8 => string_text(column.as_string::<i64>().value(row)),
        DataType::Utf8View => string_text(column.as_string_view().value(row)),
        _ => displayed(formatter, row)?,
    })
}

/// How Arrow displays a value with DataFusion's format options (NULL inside nested values too).
fn displayed(formatter: &Formatter, row: usize) -> Result<String, ArrowError> {
    match formatter {
        Ok(f) => Ok(f.value(row).to_string()),
        Err(e) => Err(ArrowError::InvalidArgumentError(e.to_string())),
    }
}

/// Trailing newlines go (a test can show them with another column after); NUL is escaped.
fn string_text(value: &str) -> String {
    if value.is_empty() {
        EMPTY_TEXT.to_string()
    } else {
        value.trim_end_matches('\n').replace('\u{0}', "\\0")
    }
}

/// NaN's sign differs between platforms, so it has none.
fn float_text(value: f64, shortest: &str) -> String {
    if value.is_nan() {
        "NaN".to_string()
    } else if value.is_infinite() {
        if value > 0.0 { "Infinity" } else { "-Infinity" }.to_string()
    } else {
        round_plain(shortest, FLOAT_DIGITS)
    }
}

/// A plain decimal (`-`, digits, `.`, digits: how Rust displays floats and Arrow decimals)
/// rounded half to even to `digits` decimals, without trailing fractional zeros; zero is `0`.
pub fn round_plain(text: &str, digits: usize) -> String {
    let (negative, unsigned) = text.strip_prefix('-').map_or((false, text), |rest| (true, rest));
    let (int, frac) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    let kept_frac = frac.len().min(digits);
    let mut kept: Vec<u8> = int.bytes().chain(frac.bytes().take(kept_frac)).collect();
    if rounds_up(&frac[kept_frac..], kept.last().copied()) {
        increment(&mut kept);
    }
    let (int_digits, frac_digits) = kept.split_at(kept.len() - kept_frac);
    let int_text = std::str::from_utf8(int_digits).unwrap().trim_start_matches('0');
    let frac_text = std::str::from_utf8(frac_digits).unwrap().trim_end_matches('0');
    let int_text = if int_text.is_empty() { "0" } else { int_text };
    let body = if frac_text.is_empty() { int_text.to_string() } else { format!("{int_text}.{frac_text}") };
    if negative && body != "0" { format!("-{body}") } else { body }
}

/// Half to even: more than half rounds up, exactly half rounds to an even last digit.
fn rounds_up(dropped: &str, last_kept: Option<u8>) -> bool {
    let mut rest = dropped.bytes();
    match rest.next() {
        None | Some(b'0'..=b'4') => false,
        Some(b'5') => rest.any(|d| d != b'0') || last_kept.is_some_and(|d| (d - b'0') % 2 == 1),
        Some(_) => true,
    }
}

fn increment(digits: &mut Vec<u8>) {
    for d in digits.iter_mut().rev() {
        if *d == b'9' {
            *d = b'0';
        } else {
            *d += 1;
            return;
        }
    }
    digits.insert(0, b'1');
}

/// A last cell of several lines (plans) becomes one row per line, numbered, its indentation
/// written as dashes (sqllogictest does not compare runs of spaces).
fn split_lines(mut cells: Vec<String>) -> Vec<Vec<String>> {
    let Some(last) = cells.pop() else { return vec![cells] };
    if !last.contains('\n') {
        cells.push(last);
        return vec![cells];
    }
    let lines = last.split('\n').enumerate().map(|(i, line)| {
        let content = line.trim_start();
        vec![format!("{:02}){}{content}", i + 1, "-".repeat(line.len() - content.len()))]
    });
    std::iter::once(cells).chain(lines).collect()
}

#[cfg(test)]
mod tests {
    use super::round_plain;

    #[test]
    fn floats_round_half_to_even_and_lose_trailing_zeros() {
        assert_eq!(round_plain("0.110", 12), "0.11");
        assert_eq!(round_plain("1.0000000000011", 12), "1.000000000001");
        assert_eq!(round_plain("1.0000000000005", 12), "1");
        assert_eq!(round_plain("1.0000000000015", 12), "1.000000000002");
        assert_eq!(round_plain("9.9999999999999", 12), "10");
        assert_eq!(round_plain("-0.0000000000001", 12), "0");
        assert_eq!(round_plain("-12.50", usize::MAX), "-12.5");
        assert_eq!(round_plain("0.00", usize::MAX), "0");
        assert_eq!(round_plain("1200", usize::MAX), "1200");
        assert_eq!(round_plain("-0", 12), "0");
    }
}
