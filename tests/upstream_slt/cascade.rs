//! Consequences of a listed record. When a statement fails on the cluster for a listed reason
//! (a table Quiver cannot store, a write it does not take), the records after it that use what
//! it should have made fail too; they are counted under the same listing, as consequences,
//! instead of each being listed. A record is a consequence only when its cluster run failed and
//! it names a table, or a path, that a listed failure left missing or short, and only until a
//! later statement makes that table again.

use std::collections::HashMap;

use super::skips::Listed;

#[derive(Default)]
pub struct Broken {
    /// Tables (unqualified, lower case) and paths a listed failure left wrong, by its listing.
    names: HashMap<String, Listed>,
    paths: HashMap<String, Listed>,
    /// Where each external table of the file reads, to break its files with it.
    locations: HashMap<String, String>,
}

impl Broken {
    /// The listing of the earlier failure that `sql` depends on, if any.
    pub fn cause_of(&self, sql: &str) -> Option<Listed> {
        let sql = normal(sql);
        let by_name = words(&sql).find_map(|w| self.names.get(w).copied());
        by_name.or_else(|| self.paths.iter().find(|(p, _)| sql.contains(p.as_str())).map(|(_, l)| *l))
    }

    /// Records what `sql` made: broken when its cluster run failed as `listed`, whole again
    /// when it created the table as it should.
    pub fn update(&mut self, sql: &str, listed: Option<Listed>) {
        let sql = normal(sql);
        let table = defined_table(&sql);
        let path = quoted_after(&sql, " to ").or_else(|| quoted_after(&sql, "location"));
        if let (Some(table), Some(path)) = (table, path) {
            self.locations.insert(table.to_string(), path.to_string());
        }
        match listed {
            Some(listed) => {
                let location = table.and_then(|t| self.locations.get(t)).cloned();
                for p in path.map(str::to_string).into_iter().chain(location) {
                    self.paths.insert(p, listed);
                }
                if let Some(t) = table {
                    self.names.insert(t.to_string(), listed);
                }
            }
            // Only a CREATE makes a table anew; rows inserted into a broken table leave it broken.
            None if sql.starts_with("create") => {
                if let Some(t) = table {
                    // A table made whole again, unless it reads files a listed failure left out.
                    match path.and_then(|p| self.paths.iter().find(|(b, _)| p.starts_with(b.as_str())).map(|(_, l)| *l)) {
                        Some(listed) => self.names.insert(t.to_string(), listed),
                        None => self.names.remove(t),
                    };
                }
            }
            None => {}
        }
    }
}

/// Lower case, with every run of whitespace one space.
fn normal(sql: &str) -> String {
    sql.split_whitespace().collect::<Vec<_>>().join(" ").to_ascii_lowercase()
}

fn words(sql: &str) -> impl Iterator<Item = &str> {
    sql.split(|c: char| !c.is_ascii_alphanumeric() && c != '_').filter(|w| !w.is_empty())
}

/// The table a statement creates or writes: `create … table|view [if not exists] <name>`,
/// `insert into [table] <name>`; unqualified, without quotes.
pub fn defined_table(sql: &str) -> Option<&str> {
    let head: Vec<&str> = sql.split_whitespace().take(8).collect();
    let at = match head.first().copied()? {
        "create" => head.iter().position(|w| *w == "table" || *w == "view")? + 1,
        "insert" => head.iter().position(|w| *w == "into")? + 1 + usize::from(head.get(2) == Some(&"table")),
        _ => return None,
    };
    let at = if head.get(at..at + 3) == Some(&["if", "not", "exists"]) { at + 3 } else { at };
    let name = head.get(at)?.split('(').next()?;
    Some(name.rsplit('.').next()?.trim_matches(|c| c == '"' || c == '`' || c == ';'))
}

/// The first quoted string after `keyword`.
pub fn quoted_after<'a>(sql: &'a str, keyword: &str) -> Option<&'a str> {
    let rest = &sql[sql.find(keyword)? + keyword.len()..];
    let rest = &rest[rest.find('\'')? + 1..];
    Some(&rest[..rest.find('\'')?])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_table_a_statement_makes() {
        assert_eq!(defined_table("create table t (a int) as values (1)"), Some("t"));
        assert_eq!(defined_table("create or replace table if not exists s.t2 as select 1"), Some("t2"));
        assert_eq!(defined_table("create external table x stored as csv location 'a'"), Some("x"));
        assert_eq!(defined_table("insert into table y values (1)"), Some("y"));
        assert_eq!(defined_table("create table \"t1\"(c int)"), Some("t1"));
        assert_eq!(defined_table("select 1"), None);
    }

    #[test]
    fn a_listed_failure_breaks_what_it_made_until_made_again() {
        let mut broken = Broken::default();
        broken.update("CREATE TABLE t AS VALUES (interval '1 day')", Some(Listed::Difference));
        assert_eq!(broken.cause_of("select * from T"), Some(Listed::Difference));
        assert_eq!(broken.cause_of("select * from t2"), None);
        broken.update("insert into t values (1)", None);
        assert_eq!(broken.cause_of("select * from t"), Some(Listed::Difference));
        broken.update("create table t (a int)", None);
        assert_eq!(broken.cause_of("select * from t"), None);
        broken.update("COPY (SELECT 1)\nTO 'scratch/a.arrow' STORED AS ARROW", Some(Listed::KnownBug));
        assert_eq!(broken.cause_of("create external table v stored as arrow location 'scratch/a.arrow'"), Some(Listed::KnownBug));
        broken.update("create external table w stored as arrow location 'scratch/a.arrow/part'", None);
        assert_eq!(broken.cause_of("select * from w"), Some(Listed::KnownBug));
    }
}
