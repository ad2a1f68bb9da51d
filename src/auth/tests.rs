
use super::*;
use std::path::PathBuf;

fn store_with(user: &str, role: Role) -> (tempfile::TempDir, Arc<UserStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = UserStore::open(dir.path()).unwrap();
    store.add_user(user, role, "correct horse").unwrap();
    (dir, Arc::new(store))
}

#[test]
fn basic_credentials_are_read_with_and_without_padding() {
    // "ab:cd" is 5 bytes: base64 pads it with one '='.
    for header in ["Basic YWI6Y2Q=", "Basic YWI6Y2Q", "basic YWI6Y2Q="] {
        let got = presented(Some(header.as_bytes())).unwrap();
        assert_eq!(got, Presented::Basic { user: "ab".into(), password: "cd".into() }, "{header}");
    }
    assert_eq!(presented(Some(b"Bearer xyz")).unwrap(), Presented::Bearer("xyz".into()));
    assert!(presented(Some(b"Digest abc")).is_err());
    assert!(presented(Some(b"Basic !!!")).is_err());
}

#[test]
fn a_password_is_stored_hashed_and_checked() {
    let (dir, store) = store_with("ann", Role::Reader);
    let file = std::fs::read_to_string(dir.path().join(AUTH_DIR).join("users.json")).unwrap();
    assert!(!file.contains("correct horse") && file.contains("$argon2"), "{file}");
    assert_eq!(store.verify_password("ann", "correct horse").unwrap().role, Role::Reader);
    assert!(store.verify_password("ann", "wrong horse").is_err());
    assert!(store.verify_password("bob", "correct horse").is_err());
    assert!(store.add_user("x y", Role::Admin, "long enough").is_err());
    assert!(store.add_user("carl", Role::Admin, "short").is_err());
}

#[test]
fn tokens_are_stored_as_digests_expire_and_can_be_revoked() {
    let (dir, store) = store_with("ann", Role::Admin);
    let (token, info) = store.create_token("ann", None).unwrap();
    let file = std::fs::read_to_string(dir.path().join(AUTH_DIR).join("tokens.json")).unwrap();
    assert!(!file.contains(&token), "the token itself must not be stored");
    assert_eq!(store.verify_token(&token).unwrap(), Caller { name: "ann".into(), role: Role::Admin });
    // Another process (the `quiver token` command) sees the same files.
    let other = UserStore::open(dir.path()).unwrap();
    other.revoke_token(&info.id).unwrap();
    assert!(store.verify_token(&token).is_err(), "a revoked token must be refused at once");
    let (short, _) = store.create_token("ann", Some(1)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    assert!(store.verify_token(&short).is_err(), "an expired token must be refused");
    assert!(store.create_token("nobody", None).is_err());
    let (kept, _) = store.create_token("ann", None).unwrap();
    store.remove_user("ann").unwrap();
    assert!(store.verify_token(&kept).is_err(), "a removed user's tokens must be refused");
}

#[test]
fn a_closed_coordinator_refuses_anonymous_callers_and_accepts_sessions() {
    let (_dir, store) = store_with("ann", Role::Reader);
    let auth = Authenticator::new(Some(store), Some(ClusterKey::random()));
    assert!(auth.authenticate(None).is_err());
    assert!(auth.authenticate(Some(b"Bearer qvt_made_up")).is_err());
    assert!(auth.login("ann", "nope").is_err());
    let (caller, session) = auth.login("ann", "correct horse").unwrap();
    assert_eq!(caller.role, Role::Reader);
    let header = format!("Bearer {session}");
    assert_eq!(auth.authenticate(Some(header.as_bytes())).unwrap(), caller);
    // HTTP Basic on every request: accepted from the cache of verified pairs.
    let basic = basic_header("ann", "correct horse");
    assert_eq!(auth.authenticate(Some(basic.as_bytes())).unwrap(), caller);
    assert!(!caller.is_node() && !caller.may_write() && caller.may_query());
}

#[test]
fn node_tokens_need_the_cluster_secret() {
    let key = ClusterKey::new(b"0123456789abcdef-secret").unwrap();
    let auth = Authenticator::new(None, Some(key.clone()));
    let node = Credentials::Node { key, name: "w1".into() }.header().unwrap();
    assert_eq!(auth.authenticate(Some(node.as_bytes())).unwrap(), Caller { name: "w1".into(), role: Role::Node });
    let stranger = Credentials::Node { key: ClusterKey::random(), name: "w1".into() }.header().unwrap();
    assert!(auth.authenticate(Some(stranger.as_bytes())).is_err());
    // Renaming the node in a token breaks its signature.
    let forged = node.replacen("w1", "w2", 1);
    assert!(auth.authenticate(Some(forged.as_bytes())).is_err());
    // Without a token a client is served, but never as a node.
    assert!(!auth.authenticate(None).unwrap().is_node());
    assert!(ClusterKey::new(b"short").is_err());
}

#[test]
fn an_open_server_lets_everyone_do_everything() {
    let caller = Authenticator::open().authenticate(None).unwrap();
    assert!(caller.is_node() && caller.may_write() && caller.owns("someone else"));
}

#[test]
fn table_paths_must_stay_under_the_allowed_roots() {
    let root = tempfile::tempdir().unwrap();
    let allowed = AllowedPaths::under(&[root.path().to_path_buf()]);
    let inside = root.path().join("t/part.parquet");
    allowed.check(&inside.display().to_string()).unwrap();
    allowed.check(&format!("file://{}", inside.display())).unwrap();
    let encoded = format!("file://{}/%2e%2e/%2E%2E/etc/passwd", root.path().display());
    let upper = "FILE:///etc/passwd".to_string();
    for outside in ["/etc", "/etc/passwd", "file:///etc/passwd", &encoded, &upper, "s3://bucket/x", "file:/etc/passwd"] {
        assert!(allowed.check(outside).is_err(), "{outside}");
    }
    let escape = root.path().join("../../etc/passwd");
    assert!(allowed.check(&escape.display().to_string()).is_err());
    #[cfg(unix)]
    {
        let link = root.path().join("link");
        std::os::unix::fs::symlink("/etc", &link).unwrap();
        assert!(allowed.check(&link.join("passwd").display().to_string()).is_err(), "a link out of the root");
    }
    AllowedPaths::any().check("/etc").unwrap();
}

#[test]
fn store_locations_must_stay_under_an_allowed_prefix() {
    let allowed = AllowedPaths::under(&[PathBuf::from("/data"), PathBuf::from("s3://bucket/tables/")]);
    for inside in ["s3://bucket/tables/t/", "s3://bucket/tables", "S3://bucket/tables/a%20b/x.parquet"] {
        allowed.check(inside).unwrap_or_else(|e| panic!("{inside}: {e:?}"));
    }
    for outside in [
        "s3://bucket/tablesX/t",
        "s3://bucket/other/t",
        "s3://other/tables/t",
        "gs://bucket/tables/t",
        "s3://bucket/tables/../other",
        "s3://bucket/tables/%2e%2e/other",
        "s3://bucket/tables/a%2Fb",
        "https://bucket/tables/t",
    ] {
        assert!(allowed.check(outside).is_err(), "{outside}");
    }
}

#[test]
fn durations_read_as_users_write_them() {
    assert_eq!(parse_duration("30d").unwrap(), 30 * 86_400_000);
    assert_eq!(parse_duration("12h").unwrap(), 12 * 3_600_000);
    assert_eq!(parse_duration("45").unwrap(), 45_000);
    assert!(parse_duration("3w").is_err() && parse_duration("0d").is_err() && parse_duration("d").is_err());
}
