//! Python clients, unmodified, against a real `quiver local --serve`: the ADBC Flight SQL driver
//! (DBAPI) and pyarrow.flight. The script is tests/python/flight_sql_e2e.py; `.ci/run` installs
//! its packages.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, quiver_binary, tpch_dir, KillOnDrop};

/// Waits until the server answers a query over Flight SQL (TPC-H generation comes first).
fn wait_until_serving(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = Command::new(quiver_binary())
            .args(["sql", "--coordinator", url, "--format", "csv", "-c", "SELECT count(*) FROM region"])
            .output()
            .expect("quiver sql runs");
        if out.status.success() && String::from_utf8_lossy(&out.stdout).contains('5') {
            return;
        }
        assert!(Instant::now() < deadline, "quiver local did not serve: {}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn adbc_and_pyarrow_flight_clients_work_against_quiver_local() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let server = Command::new(quiver_binary())
        .args(["local", "--serve", "--workers", "2", "--tpch", "0.01", "--listen", &listen])
        .args(["--data-dir", dir.path().to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("quiver local starts");
    let _server = KillOnDrop(server);
    wait_until_serving(&format!("http://{listen}"));

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/flight_sql_e2e.py");
    let out = Command::new("python3")
        .args([script, &format!("grpc://{listen}"), tpch_dir().to_str().unwrap()])
        .output()
        .expect("python3 runs (CI installs it with pyarrow and adbc-driver-flightsql)");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the Python end-to-end test failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("all passed"), "{stdout}");
    eprintln!("{stdout}");
}
