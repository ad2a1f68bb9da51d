//! Where a command's flags come from besides its command line: `QUIVER_*` environment variables
//! and a `quiver.toml` file, so that a deployment needs no long command lines. Every long flag of
//! `coordinator`, `worker`, `local` and `sql` may come from either.
//!
//! Precedence, first wins: the command line; the environment, `QUIVER_` and the flag's name in
//! capitals with `_` for `-` (`--data-dir` is `QUIVER_DATA_DIR`); the file's section for the
//! command (`[coordinator]` with `data_dir = "/var/lib/quiver"`); the built-in default. The file
//! is `--config FILE` (or `QUIVER_CONFIG`), else `quiver.toml` in the working directory when
//! there is one. A flag that may repeat takes a list in the file (`allow_path = ["/a", "/b"]`).
//! A key the command does not know is an error, so a typo is never silently ignored.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Command};

/// The commands whose flags a file may set: one section each.
pub const SECTIONS: [&str; 4] = ["coordinator", "worker", "local", "sql"];
/// The file read when no `--config` is given, if it exists in the working directory.
pub const DEFAULT_FILE: &str = "quiver.toml";
/// Prefix of the environment variables that set flags.
pub const ENV_PREFIX: &str = "QUIVER_";
/// Largest config file read.
pub const CONFIG_FILE_BYTES_MAX: u64 = 1024 * 1024;

/// `argv` with the flags its command line leaves out filled in from the environment and the
/// config file, for `cli` (the program's clap definition, with a global `config` argument) to
/// parse. A command line clap cannot parse is returned as it is: the real parse reports it.
pub fn complete(cli: &Command, argv: Vec<OsString>) -> Result<Vec<OsString>, String> {
    let Ok(matches) = cli.clone().try_get_matches_from(&argv) else { return Ok(argv) };
    let Some((name, sub)) = matches.subcommand() else { return Ok(argv) };
    let explicit = matches.get_one::<PathBuf>("config").cloned();
    let file = match &explicit {
        Some(path) => Some(read_file(path)?),
        None if Path::new(DEFAULT_FILE).exists() => Some(read_file(Path::new(DEFAULT_FILE))?),
        None => None,
    };
    let mut section = match file {
        Some(table) => section_of(table, name)?,
        None => BTreeMap::new(),
    };
    let Some(command) = cli.find_subcommand(name).filter(|_| SECTIONS.contains(&name)) else {
        return Ok(argv);
    };
    let mut completed = argv;
    for arg in command.get_arguments() {
        let (Some(long), false) = (arg.get_long(), arg.is_positional()) else { continue };
        let key = long.replace('-', "_");
        let from_file = section.remove(&key);
        if given(sub, arg.get_id().as_str()) {
            continue;
        }
        let env = std::env::var(format!("{ENV_PREFIX}{}", key.to_ascii_uppercase())).ok();
        let values = match (env, from_file) {
            (Some(value), _) => vec![Value::Text(value)],
            (None, Some(value)) => from_toml(&key, value)?,
            (None, None) => continue,
        };
        completed.extend(flag_args(long, arg.get_action(), values)?);
    }
    match section.keys().next() {
        Some(unknown) => Err(format!("unknown setting '{unknown}' in [{name}] of the config file")),
        None => Ok(completed),
    }
}

/// Did the command line (or the flag's own environment variable) set it?
fn given(matches: &ArgMatches, id: &str) -> bool {
    matches!(matches.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable))
}

fn read_file(path: &Path) -> Result<toml::Table, String> {
    let fail = |e: &dyn std::fmt::Display| format!("cannot read the config file {}: {e}", path.display());
    let size = std::fs::metadata(path).map_err(|e| fail(&e))?.len();
    if size > CONFIG_FILE_BYTES_MAX {
        return Err(fail(&format!("{size} bytes, over {CONFIG_FILE_BYTES_MAX}")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| fail(&e))?;
    text.parse::<toml::Table>().map_err(|e| fail(&e))
}

/// The settings of section `name`, after checking that every section is one of [`SECTIONS`].
fn section_of(mut table: toml::Table, name: &str) -> Result<BTreeMap<String, toml::Value>, String> {
    if let Some(unknown) = table.keys().find(|k| !SECTIONS.contains(&k.as_str())) {
        return Err(format!("unknown section '{unknown}' in the config file (sections: {})", SECTIONS.join(", ")));
    }
    match table.remove(name) {
        Some(toml::Value::Table(section)) => Ok(section.into_iter().collect()),
        Some(_) => Err(format!("'{name}' in the config file must be a section: [{name}]")),
        None => Ok(BTreeMap::new()),
    }
}

/// A setting's value as text, or a switch.
enum Value {
    Text(String),
    Switch(bool),
}

fn from_toml(key: &str, value: toml::Value) -> Result<Vec<Value>, String> {
    Ok(match value {
        toml::Value::String(s) => vec![Value::Text(s)],
        toml::Value::Integer(n) => vec![Value::Text(n.to_string())],
        toml::Value::Float(x) => vec![Value::Text(x.to_string())],
        toml::Value::Boolean(b) => vec![Value::Switch(b)],
        toml::Value::Array(items) => {
            let mut values = Vec::with_capacity(items.len());
            for item in items {
                values.extend(from_toml(key, item)?);
            }
            values
        }
        other => return Err(format!("setting '{key}': a {} is not a flag's value", other.type_str())),
    })
}

/// The command-line words that give flag `--long` these values.
fn flag_args(long: &str, action: &ArgAction, values: Vec<Value>) -> Result<Vec<OsString>, String> {
    let mut words = Vec::new();
    for value in values {
        match (action, value) {
            (ArgAction::SetTrue, Value::Switch(on)) => words.extend(on.then(|| format!("--{long}").into())),
            (ArgAction::SetTrue, Value::Text(text)) => match text.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => words.push(format!("--{long}").into()),
                "false" | "0" | "no" | "" => {}
                _ => return Err(format!("--{long} is a switch: true or false, not '{text}'")),
            },
            (_, Value::Switch(b)) => words.push(format!("--{long}={b}").into()),
            (_, Value::Text(text)) => words.push(format!("--{long}={text}").into()),
        }
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Arg;

    fn cli() -> Command {
        let worker = Command::new("worker")
            .arg(Arg::new("slots").long("slots"))
            .arg(Arg::new("memory_limit").long("memory-limit").default_value("2GiB"))
            .arg(Arg::new("insecure").long("insecure").action(ArgAction::SetTrue))
            .arg(Arg::new("allow_path").long("allow-path").action(ArgAction::Append));
        Command::new("quiver")
            .args_override_self(true)
            .arg(Arg::new("config").long("config").global(true).value_parser(clap::value_parser!(PathBuf)))
            .subcommand(worker)
            .subcommand(Command::new("user"))
    }

    fn completed(file: &str, args: &[&str]) -> Result<Vec<String>, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.toml");
        std::fs::write(&path, file).unwrap();
        let mut argv: Vec<OsString> = vec!["quiver".into(), "worker".into(), "--config".into(), path.clone().into()];
        argv.extend(args.iter().map(OsString::from));
        let out = complete(&cli(), argv)?;
        Ok(out[4..].iter().map(|a| a.to_string_lossy().into_owned()).collect())
    }

    #[test]
    fn the_file_fills_what_the_command_line_leaves_out() {
        let file = "[worker]\nslots = 4\nmemory_limit = \"1GiB\"\ninsecure = true\nallow_path = [\"/a\", \"/b\"]\n";
        let words = completed(file, &["--slots", "8"]).unwrap();
        assert_eq!(words, ["--slots", "8", "--memory-limit=1GiB", "--insecure", "--allow-path=/a", "--allow-path=/b"]);
        assert_eq!(completed("[worker]\ninsecure = false\n", &[]).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn unknown_keys_sections_and_values_are_errors() {
        assert!(completed("[worker]\nslot = 4\n", &[]).unwrap_err().contains("unknown setting 'slot'"));
        assert!(completed("[wroker]\nslots = 4\n", &[]).unwrap_err().contains("unknown section 'wroker'"));
        assert!(completed("[worker]\ninsecure = \"maybe\"\n", &[]).unwrap_err().contains("switch"));
        assert!(completed("[worker\n", &[]).unwrap_err().contains("cannot read the config file"));
    }
}
