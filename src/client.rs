//! The SQL client: speaks Flight SQL to a coordinator, like any other Flight SQL client, and
//! receives Arrow batches.

use datafusion::common::{DataFusionError, Result};
use datafusion::sql::parser::DFParser;
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::tokenizer::{Location, Token, Tokenizer};

pub use crate::protocol::QueryProgress;
/// The SQL client is the transport's Flight SQL client: start, fetch, follow, cancel, collect.
pub use crate::transport::{SqlClient as Client, Statement};

/// Splits a script into statements as DataFusion's parser sees them, each sent as the user
/// wrote it: cut at the semicolons between statements, never re-rendered from the parse (which
/// loses what the parser's printer does not quote again, such as COPY's target path).
pub fn split_statements(sql: &str) -> Result<Vec<String>> {
    // The parser's own words, as the coordinator reports them, not its Debug form.
    let parser_error = |e: DataFusionError| match e {
        DataFusionError::SQL(parser, _) => DataFusionError::Plan(parser.to_string()),
        other => other,
    };
    DFParser::parse_sql(sql).map_err(parser_error)?;
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize_with_location()
        .map_err(|e| DataFusionError::Plan(format!("sql parser error: {e}")))?;
    let offsets = LineOffsets::new(sql);
    let mut statements = Vec::new();
    let mut start = 0;
    for token in tokens.iter().filter(|t| t.token == Token::SemiColon) {
        let end = offsets.byte(sql, token.span.start);
        statements.push(&sql[start..end]);
        start = end + 1;
    }
    statements.push(&sql[start..]);
    Ok(statements.into_iter().map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect())
}

/// Byte offsets of line starts, to turn the tokenizer's (line, column) into an offset.
struct LineOffsets(Vec<usize>);

impl LineOffsets {
    fn new(text: &str) -> Self {
        Self(std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect())
    }

    /// The byte offset of a location; columns count characters from 1.
    fn byte(&self, text: &str, at: Location) -> usize {
        let line_start = self.0.get((at.line as usize).saturating_sub(1)).copied().unwrap_or(text.len());
        let column = (at.column as usize).saturating_sub(1);
        text[line_start..].char_indices().nth(column).map_or(text.len(), |(i, _)| line_start + i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_sent_as_written() {
        let script = "COPY (SELECT 1) TO '/tmp/o.parquet' STORED AS PARQUET;\nSELECT 'a;b', 'it''s' -- c;\n;  SELECT\n 2";
        let statements = split_statements(script).unwrap();
        assert_eq!(
            statements,
            ["COPY (SELECT 1) TO '/tmp/o.parquet' STORED AS PARQUET", "SELECT 'a;b', 'it''s' -- c;\n", "SELECT\n 2"]
                .map(|s| s.trim().to_string())
        );
    }

    #[test]
    fn a_bad_statement_is_the_parsers_error() {
        let error = split_statements("SELEC 1").unwrap_err().to_string();
        assert!(error.contains("sql parser error"), "{error}");
    }
}
