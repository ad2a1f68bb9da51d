//! The module layering ARCHITECTURE.md states, checked on the source: dependencies point one
//! way (auth → planner → protocol → transport → coordinator / worker → web → cluster), and only the
//! transport layer knows gRPC.

use std::path::{Path, PathBuf};

fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
    found
}

/// Source files under `src/<module>` (or `src/<module>.rs`) that mention any of `names`.
fn offenders(module: &str, names: &[&str]) -> Vec<String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let dir = src.join(module);
    let mut files = if dir.is_dir() { sources(&dir) } else { Vec::new() };
    let single = src.join(format!("{module}.rs"));
    if single.exists() {
        files.push(single);
    }
    assert!(!files.is_empty(), "no source for module {module}");
    let mut found = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if names.iter().any(|name| code.contains(name)) {
                found.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
    found
}

#[test]
fn only_the_transport_layer_knows_grpc() {
    for module in ["auth", "storage", "planner", "protocol", "coordinator", "worker", "web", "cluster", "client", "cli", "bench", "main"] {
        let found = offenders(module, &["tonic", "arrow_flight"]);
        assert!(found.is_empty(), "gRPC outside src/transport:\n{}", found.join("\n"));
    }
}

#[test]
fn dependencies_point_one_way() {
    let rules: [(&str, &[&str]); 6] = [
        // Object stores are opened apart from who asks for them.
        ("storage", &["crate::auth", "crate::config", "crate::planner", "crate::protocol", "crate::transport", "crate::coordinator", "crate::worker", "crate::web", "crate::cluster"]),
        // Who may do what is decided apart from everything it guards.
        ("auth", &["crate::config", "crate::planner", "crate::protocol", "crate::transport", "crate::coordinator", "crate::worker", "crate::web", "crate::cluster"]),
        ("planner", &["crate::protocol", "crate::transport", "crate::coordinator", "crate::worker", "crate::web", "crate::cluster"]),
        ("protocol", &["crate::transport", "crate::coordinator", "crate::worker", "crate::web", "crate::cluster"]),
        ("transport", &["crate::coordinator", "crate::worker", "crate::web", "crate::cluster"]),
        ("coordinator", &["crate::worker", "crate::web", "crate::cluster"]),
    ];
    for (module, forbidden) in rules {
        let found = offenders(module, forbidden);
        assert!(found.is_empty(), "{module} depends on a later layer:\n{}", found.join("\n"));
    }
    let found = offenders("worker", &["crate::coordinator", "crate::web", "crate::cluster"]);
    assert!(found.is_empty(), "worker depends on a later layer:\n{}", found.join("\n"));
}
