//! Object stores: table files at `s3://`, `gs://`, `az://` / `abfss://` and `https://`
//! locations. A [`StoreSpec`] is one store as the coordinator resolved it (its URL and the
//! options that open it); the coordinator and every worker build the same store from it, so a
//! worker never depends on its own environment to read a table. This module knows DataFusion
//! and `object_store`, nothing of the network or of the cluster.
//!
//! Options come, later ones winning, from the coordinator's environment (`AWS_*`, `GOOGLE_*`,
//! `AZURE_*`), from cluster configuration (`--store-option`), and from a table's `OPTIONS`
//! (`'aws.region' 'eu-west-1'`, as in datafusion-cli). Every request is bounded: a store that
//! does not answer, refuses credentials or lacks the bucket fails in seconds, without a storm of
//! retries.

pub mod pruning;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use datafusion::common::{plan_datafusion_err, plan_err, DataFusionError, Result};
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::tokenizer::{Location, Token, Tokenizer};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::http::HttpBuilder;
use object_store::{BackoffConfig, ClientConfigKey, ClientOptions, ObjectStore, RetryConfig};
use url::Url;

use bytes::Bytes;
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode};
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::parquet::{CachedParquetFileReaderFactory, ParquetFileReaderFactory};
use datafusion::datasource::physical_plan::ParquetSource;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::parquet;
use datafusion::parquet::arrow::arrow_reader::ArrowReaderOptions;
use datafusion::parquet::arrow::async_reader::AsyncFileReader;
use datafusion::parquet::file::metadata::{PageIndexPolicy, ParquetMetaData};
use datafusion::physical_plan::metrics::ExecutionPlanMetricsSet;
use futures::future::BoxFuture;
use std::ops::Range;

/// Retries of one request to a store (on a 5xx answer or a broken connection; never on a
/// refusal such as 403 or 404).
pub const STORE_RETRIES_MAX: usize = 3;
/// No request is retried after this long from its first try.
pub const STORE_RETRY_TIMEOUT_MS: u64 = 15_000;
/// Connecting to a store's endpoint.
pub const STORE_CONNECT_TIMEOUT_MS: u64 = 5_000;
/// One request, from sending it to the end of its answer's body.
pub const STORE_REQUEST_TIMEOUT_MS: u64 = 120_000;

/// The kinds of store, by the option prefix that configures them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    S3,
    Gcs,
    Azure,
    Http,
}

impl Kind {
    /// The store a location's scheme names; None for a local path.
    pub fn of(url: &Url) -> Option<Kind> {
        match url.scheme() {
            "s3" | "s3a" => Some(Kind::S3),
            "gs" | "gcs" => Some(Kind::Gcs),
            "az" | "adl" | "azure" | "abfs" | "abfss" => Some(Kind::Azure),
            "http" | "https" => Some(Kind::Http),
            _ => None,
        }
    }

    /// The prefix of its options in `OPTIONS` and `--store-option`.
    pub fn prefix(self) -> &'static str {
        match self {
            Kind::S3 => "aws",
            Kind::Gcs => "gcp",
            Kind::Azure => "azure",
            Kind::Http => "http",
        }
    }

    /// The prefix of its environment variables.
    fn env_prefix(self) -> Option<&'static str> {
        match self {
            Kind::S3 => Some("AWS_"),
            Kind::Gcs => Some("GOOGLE_"),
            Kind::Azure => Some("AZURE_"),
            Kind::Http => None,
        }
    }

    /// `key` (without prefix) in the store's canonical spelling, or None when the store has no
    /// such option. Canonical names let options from different sources override each other.
    fn canonical(self, key: &str) -> Option<String> {
        let key = key.to_ascii_lowercase();
        match self {
            Kind::S3 => AmazonS3ConfigKey::from_str(&key).ok().map(|k| k.as_ref().to_string()),
            Kind::Gcs => GoogleConfigKey::from_str(&key).ok().map(|k| k.as_ref().to_string()),
            Kind::Azure => AzureConfigKey::from_str(&key).ok().map(|k| k.as_ref().to_string()),
            Kind::Http => ClientConfigKey::from_str(&key).ok().map(|k| k.as_ref().to_string()),
        }
    }
}

/// Is `key` an option of some object store (`aws.…`, `gcp.…`, `azure.…`, `http.…`)? Such
/// options are taken out of a table's `OPTIONS` before DataFusion reads the rest.
pub fn is_store_option(key: &str) -> bool {
    ["aws.", "gcp.", "azure.", "http."].iter().any(|p| key.to_ascii_lowercase().starts_with(p))
}

/// May a table's `OPTIONS` carry `key` on a coordinator that confines tables to allowed roots?
/// Credentials, regions and client tuning, yes. Not an option that decides where a location's
/// store is (an endpoint, a bucket, an account, a proxy), nor one that makes the coordinator
/// read a local file or call another service for credentials (token and key files, metadata,
/// STS and MSI endpoints, the Azure CLI): with those, an allowed `s3://bucket/prefix` would
/// reach another bucket or host, signed with the coordinator's own credentials. Only the
/// coordinator's configuration (its environment, `--store-option`) sets them there.
pub fn confined_table_option(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    let Some((prefix, rest)) = key.split_once('.') else { return false };
    let client = |c: &ClientConfigKey| !matches!(c, ClientConfigKey::ProxyUrl | ClientConfigKey::ProxyCaCertificate | ClientConfigKey::ProxyExcludes);
    match prefix {
        "aws" => AmazonS3ConfigKey::from_str(rest).is_ok_and(|k| {
            use AmazonS3ConfigKey::*;
            match &k {
                Client(c) => client(c),
                AccessKeyId | SecretAccessKey | Token | Region | DefaultRegion | SkipSignature | UnsignedPayload | Checksum | RequestPayer | Encryption(_) => true,
                _ => false,
            }
        }),
        "gcp" => GoogleConfigKey::from_str(rest).is_ok_and(|k| match &k {
            GoogleConfigKey::Client(c) => client(c),
            GoogleConfigKey::ServiceAccountKey | GoogleConfigKey::SkipSignature => true,
            _ => false,
        }),
        "azure" => AzureConfigKey::from_str(rest).is_ok_and(|k| {
            use AzureConfigKey::*;
            match &k {
                Client(c) => client(c),
                AccessKey | SasKey | Token | ClientId | ClientSecret | AuthorityId | SkipSignature => true,
                _ => false,
            }
        }),
        "http" => ClientConfigKey::from_str(rest).is_ok_and(|c| client(&c)),
        _ => false,
    }
}

/// Does this option's value have to be kept secret (keys, tokens, passwords)?
pub fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["secret", "key", "token", "password", "credential", "sas", "signature"]
        .iter()
        .any(|word| key.contains(word))
        && !key.ends_with("skip_signature")
}

/// Takes a table's store options (`aws.…` and the like) out of its `OPTIONS`, leaving DataFusion
/// the rest (`format.…`).
pub fn take_store_options(options: &mut HashMap<String, String>) -> Vec<(String, String)> {
    let keys: Vec<String> = options.keys().filter(|k| is_store_option(k)).cloned().collect();
    let mut taken: Vec<(String, String)> = keys.into_iter().filter_map(|k| options.remove_entry(&k)).collect();
    taken.sort();
    taken
}

/// Options every store of its kind takes unless a table says otherwise: cluster configuration.
#[derive(Debug, Clone, Default)]
pub struct StoreDefaults {
    options: Vec<(String, String)>,
}

impl StoreDefaults {
    /// From `KEY=VALUE` pairs such as `aws.endpoint=http://minio:9000`.
    pub fn parse(pairs: &[String]) -> Result<Self> {
        let mut options = Vec::with_capacity(pairs.len());
        for pair in pairs {
            let Some((key, value)) = pair.split_once('=') else {
                return plan_err!("store option '{pair}' is not KEY=VALUE (for example aws.region=eu-west-1)");
            };
            if !is_store_option(key) {
                return plan_err!("store option '{key}' names no store: it starts with aws., gcp., azure. or http.");
            }
            options.push((key.trim().to_string(), value.trim().to_string()));
        }
        Ok(Self { options })
    }
}

/// One object store: the URL it serves (`s3://bucket`) and the options that open it, by
/// canonical name. Built the same way on the coordinator and on every worker.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreSpec {
    pub url: String,
    pub options: BTreeMap<String, String>,
}

impl fmt::Debug for StoreSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let options: BTreeMap<&str, &str> =
            self.options.iter().map(|(k, v)| (k.as_str(), if is_secret(k) { "***" } else { v.as_str() })).collect();
        f.debug_struct("StoreSpec").field("url", &self.url).field("options", &options).finish()
    }
}

impl StoreSpec {
    /// The store that holds `location`, with its options resolved from the environment,
    /// `defaults` and the table's store options (see [`take_store_options`]). None for a local
    /// path.
    pub fn resolve(location: &str, table_options: &[(String, String)], defaults: &StoreDefaults) -> Result<Option<Self>> {
        let Some((url, kind)) = remote(location) else {
            if let Some((key, _)) = table_options.first() {
                return plan_err!("option '{key}' is for object stores, but '{location}' is a local path");
            }
            return Ok(None);
        };
        let mut resolved = BTreeMap::new();
        if let Some(prefix) = kind.env_prefix() {
            for (name, value) in std::env::vars() {
                if name.starts_with(prefix) {
                    if let Some(key) = kind.canonical(&name) {
                        resolved.insert(key, value);
                    }
                }
            }
        }
        for (key, value) in defaults.options.iter().chain(table_options.iter()) {
            let Some(rest) = strip_prefix(key, kind.prefix()) else { continue };
            let Some(canonical) = kind.canonical(rest) else {
                return plan_err!("unknown option '{key}' for {}:// locations", url.scheme());
            };
            resolved.insert(canonical, value.clone());
        }
        let spec = StoreSpec { url: store_url(&url), options: resolved };
        spec.check(kind)?;
        Ok(Some(spec))
    }

    fn kind(&self) -> Result<Kind> {
        let url = Url::parse(&self.url).map_err(|e| plan_datafusion_err!("store URL '{}': {e}", self.url))?;
        Kind::of(&url).ok_or_else(|| plan_datafusion_err!("'{}' is not an object store", self.url))
    }

    /// What would make opening the store reach somewhere the user did not name.
    fn check(&self, kind: Kind) -> Result<()> {
        if kind == Kind::S3 {
            let has = |key: AmazonS3ConfigKey| self.options.contains_key(key.as_ref());
            let region = has(AmazonS3ConfigKey::Region) || has(AmazonS3ConfigKey::DefaultRegion);
            if !region && !has(AmazonS3ConfigKey::Endpoint) {
                return plan_err!(
                    "{}: no region is set; give OPTIONS ('aws.region' '…'), AWS_REGION, or --store-option aws.region=… \
                     (Quiver does not ask AWS where a bucket is), or aws.endpoint for an S3-compatible server",
                    self.url
                );
            }
        }
        Ok(())
    }

    /// DataFusion's name for the store, as scans name it.
    pub fn object_store_url(&self) -> Result<ObjectStoreUrl> {
        ObjectStoreUrl::parse(&self.url)
    }

    /// Opens the store. Nothing is sent over the network until it is used.
    pub fn build(&self) -> Result<Arc<dyn ObjectStore>> {
        let kind = self.kind()?;
        let retry = RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: STORE_RETRIES_MAX,
            retry_timeout: Duration::from_millis(STORE_RETRY_TIMEOUT_MS),
        };
        let client = ClientOptions::new()
            .with_connect_timeout(Duration::from_millis(STORE_CONNECT_TIMEOUT_MS))
            .with_timeout(Duration::from_millis(STORE_REQUEST_TIMEOUT_MS));
        let failed = |e: object_store::Error| DataFusionError::Plan(format!("cannot open {}: {e}", self.url));
        // The four builders take the same calls, each with its own key type.
        macro_rules! open {
            ($builder:ty, $key:ty) => {{
                let mut builder = <$builder>::new().with_url(&self.url).with_retry(retry).with_client_options(client);
                for (key, value) in &self.options {
                    builder = builder.with_config(<$key>::from_str(key).map_err(failed)?, value);
                }
                Arc::new(builder.build().map_err(failed)?) as Arc<dyn ObjectStore>
            }};
        }
        let store = match kind {
            Kind::S3 => open!(AmazonS3Builder, AmazonS3ConfigKey),
            Kind::Gcs => open!(GoogleCloudStorageBuilder, GoogleConfigKey),
            Kind::Azure => open!(MicrosoftAzureBuilder, AzureConfigKey),
            Kind::Http => open!(HttpBuilder, ClientConfigKey),
        };
        Ok(store)
    }
}

/// Where `location` is in an object store: DataFusion's name for the store (`s3://bucket/`)
/// and the object's path in it. None for a local path.
pub fn object_location(location: &str) -> Option<Result<(ObjectStoreUrl, object_store::path::Path)>> {
    let (url, _) = remote(location)?;
    let located = || -> Result<_> {
        let path = object_store::path::Path::from_url_path(url.path())
            .map_err(|e| plan_datafusion_err!("'{location}' is not a valid object path: {e}"))?;
        Ok((ObjectStoreUrl::parse(store_url(&url))?, path))
    };
    Some(located())
}

/// What to add to a store error that came from asking the EC2 instance metadata service for
/// credentials: `object_store` does so when no keys were given, which off EC2 fails with an
/// error about that service, not about the missing keys.
pub fn credentials_hint(message: &str) -> &'static str {
    if message.contains("169.254.169.254") {
        " (no keys were given, in OPTIONS, --store-option or AWS_ACCESS_KEY_ID, so the EC2 instance metadata service was asked for some)"
    } else {
        ""
    }
}

/// `location` as a URL of an object store, with the store's kind; None for a local path.
fn remote(location: &str) -> Option<(Url, Kind)> {
    if std::path::Path::new(location).is_absolute() {
        return None;
    }
    let url = Url::parse(location).ok()?;
    Kind::of(&url).map(|kind| (url, kind))
}

/// `key` without `prefix.`, compared without case.
fn strip_prefix<'a>(key: &'a str, prefix: &str) -> Option<&'a str> {
    let (head, rest) = key.split_once('.')?;
    head.eq_ignore_ascii_case(prefix).then_some(rest)
}

/// The part of a URL that names its store: scheme and authority, as DataFusion keys stores.
fn store_url(url: &Url) -> String {
    format!("{}://{}", url.scheme(), &url[url::Position::BeforeUsername..url::Position::AfterPort])
}

/// The stores a plan's file scans read, by DataFusion's name for each (`s3://bucket/`).
pub fn scanned_stores(plan: &Arc<dyn ExecutionPlan>) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![Arc::clone(plan)];
    while let Some(node) = stack.pop() {
        if let Some(scan) = node.downcast_ref::<DataSourceExec>() {
            if let Some(config) = scan.data_source().downcast_ref::<FileScanConfig>() {
                let url = config.object_store_url.as_str().to_string();
                if !found.contains(&url) {
                    found.push(url);
                }
            }
        }
        stack.extend(node.children().into_iter().cloned());
    }
    found
}

/// `plan` with each Parquet scan reading its files' metadata with their page index, so that
/// the process's metadata cache keeps the index too. DataFusion 55's opener asks for the footer
/// alone and then loads the page index itself, uncached, on every file open that has a
/// page-pruning predicate: one more request per Task and file, on every Query, which in an
/// object store is a round trip each time. With this, a process reads a file's footer and page
/// index once.
pub fn cache_page_indexes(plan: Arc<dyn ExecutionPlan>, runtime: &RuntimeEnv) -> Result<Arc<dyn ExecutionPlan>> {
    plan.transform_up(|node| {
        let Some(exec) = node.downcast_ref::<DataSourceExec>() else { return Ok(Transformed::no(node)) };
        let Some(config) = exec.data_source().downcast_ref::<FileScanConfig>() else { return Ok(Transformed::no(node)) };
        let Some(parquet) = config.file_source.downcast_ref::<ParquetSource>() else { return Ok(Transformed::no(node)) };
        let store = runtime.object_store(&config.object_store_url)?;
        let cached = CachedParquetFileReaderFactory::new(store, runtime.cache_manager.get_file_metadata_cache());
        let source = parquet.clone().with_parquet_file_reader_factory(Arc::new(WithPageIndex(Arc::new(cached))));
        let mut config = config.clone();
        config.file_source = Arc::new(source);
        let constraints = exec.properties().eq_properties.constraints().clone();
        let rebuilt = exec.clone().with_data_source(Arc::new(config)).with_constraints(constraints);
        Ok(Transformed::yes(Arc::new(rebuilt) as Arc<dyn ExecutionPlan>))
    })
    .data()
}

/// Makes readers whose metadata requests ask for the page index (see [`cache_page_indexes`]).
#[derive(Debug)]
struct WithPageIndex(Arc<dyn ParquetFileReaderFactory>);

impl ParquetFileReaderFactory for WithPageIndex {
    fn create_reader(
        &self,
        partition_index: usize,
        file: PartitionedFile,
        metadata_size_hint: Option<usize>,
        metrics: &ExecutionPlanMetricsSet,
    ) -> Result<Box<dyn AsyncFileReader + Send>> {
        Ok(Box::new(PageIndexReader(self.0.create_reader(partition_index, file, metadata_size_hint, metrics)?)))
    }
}

struct PageIndexReader(Box<dyn AsyncFileReader + Send>);

impl AsyncFileReader for PageIndexReader {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        self.0.get_bytes(range)
    }

    fn get_byte_ranges(&mut self, ranges: Vec<Range<u64>>) -> BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        self.0.get_byte_ranges(ranges)
    }

    fn get_metadata<'a>(&'a mut self, options: Option<&'a ArrowReaderOptions>) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        let options = options.cloned().unwrap_or_default().with_page_index_policy(PageIndexPolicy::Optional);
        Box::pin(async move { self.0.get_metadata(Some(&options)).await })
    }
}

/// `sql` with the values of secret options (keys, tokens, passwords) replaced by `'***'`, for
/// logs and `quiver.queries`. The statement is read by DataFusion's SQL tokenizer, so quoting
/// (`''`, `E'…\'…'`, comments) is read as the parser reads it; a literal that names a secret
/// option hides the token after it. A statement the tokenizer cannot read is hidden whole.
pub fn redact_sql(sql: &str) -> String {
    let Ok(tokens) = Tokenizer::new(&GenericDialect {}, sql).tokenize_with_location() else {
        return "(a statement that cannot be tokenized, hidden: it may hold secrets)".to_string();
    };
    let mut hidden = Vec::new();
    // The option key the tokens just read spell: a quoted literal, or words joined by dots
    // (`aws.secret_access_key`, which DataFusion's parser takes unquoted too).
    let mut key: Option<String> = None;
    let mut dotted = false;
    for token in tokens.iter().filter(|t| !matches!(t.token, Token::Whitespace(_))) {
        if key.as_deref().is_some_and(|k| is_store_option(k) && is_secret(k)) {
            hidden.push((byte_offset(sql, token.span.start), byte_offset(sql, token.span.end)));
            key = None;
            continue;
        }
        (key, dotted) = match &token.token {
            Token::SingleQuotedString(text)
            | Token::DoubleQuotedString(text)
            | Token::EscapedStringLiteral(text)
            | Token::NationalStringLiteral(text) => (Some(text.clone()), false),
            Token::Word(word) if dotted => (key.map(|k| k + &word.value), false),
            Token::Word(word) => (Some(word.value.clone()), false),
            Token::Period if key.is_some() && !dotted => (key.map(|k| k + "."), true),
            _ => (None, false),
        };
    }
    let mut out = String::with_capacity(sql.len());
    let mut from = 0;
    for (start, end) in hidden {
        out.push_str(&sql[from..start]);
        out.push_str("'***'");
        from = end;
    }
    out.push_str(&sql[from..]);
    out
}

/// The byte offset of a tokenizer location (1-based line and column, in characters).
fn byte_offset(sql: &str, location: Location) -> usize {
    let (mut line, mut column) = (1, 1);
    for (offset, c) in sql.char_indices() {
        if (line, column) >= (location.line, location.column) {
            return offset;
        }
        if c == '\n' {
            (line, column) = (line + 1, 1);
        } else {
            column += 1;
        }
    }
    sql.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_confined_table_names_credentials_never_where_its_store_is() {
        for allowed in ["aws.region", "AWS.ACCESS_KEY_ID", "aws.secret_access_key", "aws.token", "aws.skip_signature", "aws.timeout", "gcp.service_account_key", "azure.sas_key", "azure.client_secret", "http.connect_timeout"] {
            assert!(confined_table_option(allowed), "{allowed}");
        }
        for placing in [
            "aws.endpoint",
            "aws.bucket",
            "aws.virtual_hosted_style_request",
            "aws.proxy_url",
            "aws.sts_endpoint",
            "aws.web_identity_token_file",
            "aws.metadata_endpoint",
            "aws.container_credentials_full_uri",
            "gcp.bucket",
            "gcp.service_account",
            "gcp.application_credentials",
            "gcp.base_url",
            "azure.account_name",
            "azure.endpoint",
            "azure.use_emulator",
            "azure.federated_token_file",
            "azure.use_azure_cli",
            "azure.msi_endpoint",
            "http.proxy_url",
            "aws.no_such_option",
            "region",
        ] {
            assert!(!confined_table_option(placing), "{placing}");
        }
    }

    fn options(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_local_path_has_no_store() {
        let mut o = options(&[("format.has_header", "true")]);
        let taken = take_store_options(&mut o);
        assert_eq!(StoreSpec::resolve("/data/t", &taken, &StoreDefaults::default()).unwrap(), None);
        assert_eq!(StoreSpec::resolve("file:///data/t", &taken, &StoreDefaults::default()).unwrap(), None);
        assert!(o.contains_key("format.has_header"));
        let taken = take_store_options(&mut options(&[("aws.region", "x")]));
        assert!(StoreSpec::resolve("/data/t", &taken, &StoreDefaults::default()).is_err());
    }

    #[test]
    fn table_options_override_cluster_defaults_and_leave_the_rest_to_datafusion() {
        let defaults = StoreDefaults::parse(&["aws.region=us-east-2".into(), "aws.endpoint=http://s3:9000".into()]).unwrap();
        let mut o = options(&[("aws.region", "eu-west-1"), ("AWS.Access_Key_Id", "AK"), ("aws.secret_access_key", "SK"), ("format.compression", "zstd")]);
        let taken = take_store_options(&mut o);
        let spec = StoreSpec::resolve("s3://bucket/dir/", &taken, &defaults).unwrap().unwrap();
        assert_eq!(spec.url, "s3://bucket");
        assert_eq!(spec.options.get("aws_region").map(String::as_str), Some("eu-west-1"));
        assert_eq!(spec.options.get("aws_endpoint").map(String::as_str), Some("http://s3:9000"));
        assert_eq!(spec.options.get("aws_access_key_id").map(String::as_str), Some("AK"));
        assert_eq!(o.keys().collect::<Vec<_>>(), vec!["format.compression"]);
        spec.build().unwrap();
    }

    #[test]
    fn unknown_options_and_a_missing_region_are_errors() {
        let none = StoreDefaults::default();
        let e = StoreSpec::resolve("s3://b/x", &[("aws.regoin".into(), "x".into())], &none).unwrap_err();
        assert!(e.to_string().contains("unknown option 'aws.regoin'"), "{e}");
        if std::env::var_os("AWS_REGION").is_none() && std::env::var_os("AWS_DEFAULT_REGION").is_none() {
            let e = StoreSpec::resolve("s3://b/x", &[], &none).unwrap_err();
            assert!(e.to_string().contains("no region"), "{e}");
        }
        assert!(StoreDefaults::parse(&["region=x".into()]).is_err());
    }

    #[test]
    fn other_stores_resolve_and_build() {
        let none = StoreDefaults::default();
        let gcs = StoreSpec::resolve("gs://b/t", &take_store_options(&mut options(&[("gcp.skip_signature", "true")])), &none).unwrap().unwrap();
        assert_eq!(gcs.url, "gs://b");
        gcs.build().unwrap();
        let az = StoreSpec::resolve("az://c/t", &take_store_options(&mut options(&[("azure.account_name", "a"), ("azure.skip_signature", "true")])), &none)
            .unwrap()
            .unwrap();
        az.build().unwrap();
        let http = StoreSpec::resolve("https://example.com:8443/data/t.parquet", &[], &none).unwrap().unwrap();
        assert_eq!(http.url, "https://example.com:8443");
        http.build().unwrap();
    }

    #[test]
    fn secrets_are_redacted_in_sql_and_debug_output() {
        let sql = "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION 's3://b/t' OPTIONS \
                   ('aws.secret_access_key' 'S3CR''ET', 'aws.region' 'eu', 'aws.access_key_id' 'AKIA', 'note' 'aws.session_token')";
        let redacted = redact_sql(sql);
        assert!(!redacted.contains("S3CR") && !redacted.contains("AKIA"), "{redacted}");
        assert!(redacted.contains("'aws.region' 'eu'"), "{redacted}");
        assert!(redacted.contains("'note' 'aws.session_token'"), "{redacted}");
        let taken = take_store_options(&mut options(&[("aws.secret_access_key", "S3CRET"), ("aws.region", "eu")]));
        let spec = StoreSpec::resolve("s3://b/t", &taken, &StoreDefaults::default()).unwrap().unwrap();
        let debug = format!("{spec:?}");
        assert!(!debug.contains("S3CRET") && debug.contains("eu"), "{debug}");
        assert_eq!(redact_sql("SELECT 'it''s'"), "SELECT 'it''s'");
        // Escapes, comments and lines are read as the parser reads them.
        let escaped = "OPTIONS (\n  -- 'aws.secret_access_key' 'x'\n  'aws.secret_access_key' E'S3\\'CRET', 'aws.region' 'é')";
        let redacted = redact_sql(escaped);
        assert_eq!(redacted, "OPTIONS (\n  -- 'aws.secret_access_key' 'x'\n  'aws.secret_access_key' '***', 'aws.region' 'é')");
        assert!(!redact_sql("SELECT 'aws.secret_access_key' 'unterminated").contains("unterminated"));
        // Regression: keys DataFusion's parser takes unquoted or escaped were not recognised.
        for key in ["aws.secret_access_key", "AWS.SECRET_ACCESS_KEY", "E'aws.secret_access_key'", "\"aws.secret_access_key\""] {
            let sql = format!("CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION 's3://b/t' OPTIONS ({key} 'S3CRET', aws.region 'eu')");
            let redacted = redact_sql(&sql);
            assert!(!redacted.contains("S3CRET") && redacted.contains("aws.region 'eu'"), "{redacted}");
        }
        assert_eq!(redact_sql("SELECT t.v FROM t"), "SELECT t.v FROM t");
    }
}

#[cfg(test)]
mod page_index_tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, RecordBatch};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::parquet::arrow::ArrowWriter;
    use datafusion::parquet::file::properties::WriterProperties;
    use datafusion::physical_plan::collect;
    use datafusion::prelude::{ParquetReadOptions, SessionContext};

    /// Bytes the scans read through their file readers: data pages, and the page index when
    /// the opener loads it itself (the footer is read straight from the store). As on a worker,
    /// the plan is planned in one process (whose planning cached the page index) and decoded
    /// and run twice in another.
    async fn bytes_read(file: &str, rewrite: bool) -> (usize, usize) {
        let coordinator = SessionContext::new();
        coordinator.register_parquet("t", file, ParquetReadOptions::default()).await.unwrap();
        let planned = coordinator.sql("SELECT x FROM t WHERE x > 99000").await.unwrap().create_physical_plan().await.unwrap();
        let bytes = datafusion_proto::bytes::physical_plan_to_bytes(planned).unwrap();
        let worker = SessionContext::new();
        let (mut total, mut rows) = (0, 0);
        for _ in 0..2 {
            let plan = datafusion_proto::bytes::physical_plan_from_bytes(&bytes, &worker.task_ctx()).unwrap();
            let plan = if rewrite { cache_page_indexes(plan, worker.runtime_env().as_ref()).unwrap() } else { plan };
            rows = collect(Arc::clone(&plan), worker.task_ctx()).await.unwrap().iter().map(|b| b.num_rows()).sum();
            let mut stack = vec![plan];
            while let Some(node) = stack.pop() {
                total += node.metrics().and_then(|m| m.sum_by_name("bytes_scanned")).map_or(0, |v| v.as_usize());
                stack.extend(node.children().into_iter().cloned());
            }
        }
        (total, rows)
    }

    /// Regression: every scan of a file re-read its page index (an object store request per Task
    /// and file), because DataFusion's opener loads it past the metadata cache.
    #[tokio::test]
    async fn a_files_page_index_is_read_once_per_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let props = WriterProperties::builder().set_max_row_group_row_count(Some(50_000)).set_data_page_row_count_limit(1_000).build();
        let mut writer = ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), Arc::clone(&schema), Some(props)).unwrap();
        for chunk in 0..100 {
            let values = Int64Array::from_iter_values(chunk * 1_000..(chunk + 1) * 1_000);
            writer.write(&RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(values)]).unwrap()).unwrap();
        }
        writer.close().unwrap();
        let file = path.to_str().unwrap();
        let (uncached, rows) = bytes_read(file, false).await;
        let (cached, same_rows) = bytes_read(file, true).await;
        assert_eq!((rows, same_rows), (999, 999));
        assert!(cached < uncached, "the page index is read through the cache: {cached} bytes against {uncached}");
    }
}
