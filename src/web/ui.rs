//! The web UI's files, compiled into the binary: one HTML page, its script and its style sheet.
//! No framework, no build step and nothing fetched from elsewhere, so the UI works wherever the
//! coordinator runs, offline included.

use axum::extract::Path;
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};

use super::api::ApiError;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// The assets by file name, with their content types.
const ASSETS: [(&str, &str, &str); 2] =
    [("app.js", "text/javascript; charset=utf-8", APP_JS), ("style.css", "text/css; charset=utf-8", STYLE_CSS)];

pub async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
}

pub async fn asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        // The UI changes with the binary: browsers revalidate instead of running a stale script.
        Some((_, content_type, body)) => {
            ([(header::CONTENT_TYPE, *content_type), (header::CACHE_CONTROL, "no-cache")], *body).into_response()
        }
        None => ApiError::not_found(format!("no asset '{file}'")).into_response(),
    }
}
