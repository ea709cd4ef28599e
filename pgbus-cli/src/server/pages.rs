//! The pages: the dashboard at `/` (a summary of the whole system, redrawn from every
//! snapshot) and the console at `/console` (find a job, see its story, act on it), with
//! the style and helpers both load from `/assets/`. Static files included at build time;
//! no build step.

use axum::http::header;
use axum::response::Html;
use axum::routing::get;
use axum::Router;

use super::app::App;

const DASHBOARD: &str = include_str!("dashboard.html");
const CONSOLE: &str = include_str!("console.html");
const STYLE: &str = include_str!("pgbus.css");
const SCRIPT: &str = include_str!("pgbus.js");

pub(crate) fn routes() -> Router<App> {
    Router::new()
        .route("/", get(|| async { Html(DASHBOARD) }))
        .route("/console", get(|| async { Html(CONSOLE) }))
        .route(
            "/assets/pgbus.css",
            get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE) }),
        )
        .route(
            "/assets/pgbus.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    SCRIPT,
                )
            }),
        )
}
