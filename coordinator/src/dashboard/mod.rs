//! The web dashboard every coordinator serves on its HTTP port: `/` (the
//! page, plain ES modules embedded in the binary: no Node.js to run or
//! build Talon), `/dashboard/api/snapshot` (the document it draws, JSON)
//! and `/dashboard/api/events` (the same document once a second, as
//! server-sent events, so the page follows the fleet without a reload).
//!
//! The page and its scripts hold no data and are served to anyone; the
//! two API routes need a key whose role may read (viewer and up), sent as
//! `authorization: Bearer <key>` like every other API call. The page asks
//! for it once and keeps it in the tab's session storage (or takes it from
//! the `#key=` fragment, which browsers never send to a server). The
//! events stream checks the key again at every update, so a revoked key
//! stops it.

pub mod snapshot;
pub mod traffic;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::admin::Admin;
use crate::auth::{self, AuthError};
use crate::context::AdminContext;
use crate::state::Permission;
use traffic::Traffic;

/// How often the events stream sends the document.
pub const UPDATE_EVERY: Duration = Duration::from_secs(1);

const INDEX: &str = include_str!("assets/index.html");
const ASSETS: [(&str, &str, &str); 5] = [
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/app.js"),
    ),
    (
        "chart.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/chart.js"),
    ),
    (
        "forecast.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/forecast.js"),
    ),
    (
        "fleet.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/fleet.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("assets/style.css"),
    ),
];

/// Scripts only from this origin, nothing inline, no framing.
const POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

#[derive(Clone)]
struct Dashboard {
    admin: Arc<Admin>,
    ctx: Arc<AdminContext>,
    traffic: Arc<Traffic>,
    stop: tokio::sync::watch::Receiver<bool>,
}

/// The dashboard's routes. `stop` ends the events streams at shutdown.
pub fn router(
    ctx: Arc<AdminContext>,
    traffic: Arc<Traffic>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Router {
    let admin = Arc::new(Admin::new(ctx.clone()));
    Router::new()
        .route("/", get(index))
        .route("/dashboard", get(|| async { Redirect::permanent("/") }))
        .route("/dashboard/assets/{name}", get(asset))
        .route("/dashboard/api/snapshot", get(snapshot_handler))
        .route("/dashboard/api/events", get(events))
        .with_state(Dashboard {
            admin,
            ctx,
            traffic,
            stop,
        })
}

fn guarded(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

async fn index() -> Response {
    guarded(([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX).into_response())
}

async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, kind, body)) => guarded(
            (
                [
                    (header::CONTENT_TYPE, *kind),
                    (header::CACHE_CONTROL, "no-cache"),
                ],
                *body,
            )
                .into_response(),
        ),
        None => (
            StatusCode::NOT_FOUND,
            format!(
                "no dashboard asset {name:?}; the assets are {}\n",
                ASSETS.map(|a| a.0).join(", ")
            ),
        )
            .into_response(),
    }
}

impl Dashboard {
    /// The caller's `authorization` value, once it may read.
    fn check(&self, headers: &HeaderMap) -> Result<Option<String>, AuthError> {
        let value = match headers.get(header::AUTHORIZATION) {
            None => None,
            Some(v) => Some(v.to_str().map_err(|_| {
                AuthError::Unauthenticated("the authorization header must be ASCII".into())
            })?),
        };
        self.allowed(value)?;
        Ok(value.map(str::to_string))
    }

    fn allowed(&self, value: Option<&str>) -> Result<(), AuthError> {
        self.ctx
            .authorize(auth::bearer(value), Permission::Read, "the dashboard")
            .map(|_| ())
    }

    async fn document(&self, value: Option<&str>) -> Result<serde_json::Value, tonic::Status> {
        snapshot::build(&self.admin, &self.ctx, &self.traffic, value).await
    }
}

fn no_store(mut r: Response) -> Response {
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

async fn snapshot_handler(State(d): State<Dashboard>, headers: HeaderMap) -> Response {
    let value = match d.check(&headers) {
        Ok(v) => v,
        Err(e) => return crate::gateway::auth::refusal(&e),
    };
    no_store(match d.document(value.as_deref()).await {
        Ok(doc) => Json(doc).into_response(),
        Err(status) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                serde_json::json!({"error": {"message": status.message(), "type": "unavailable"}}),
            ),
        )
            .into_response(),
    })
}

/// What the stream carries between two updates.
struct Follow {
    d: Dashboard,
    value: Option<String>,
    tick: tokio::time::Interval,
    over: bool,
}

async fn events(State(d): State<Dashboard>, headers: HeaderMap) -> Response {
    let value = match d.check(&headers) {
        Ok(v) => v,
        Err(e) => return crate::gateway::auth::refusal(&e),
    };
    let follow = Follow {
        d,
        value,
        tick: tokio::time::interval(UPDATE_EVERY),
        over: false,
    };
    let stream = futures_util::stream::unfold(follow, |mut f| async move {
        if f.over {
            return None;
        }
        let mut stop = f.d.stop.clone();
        tokio::select! {
            _ = f.tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return None,
        }
        let event = match f.d.allowed(f.value.as_deref()) {
            Err(_) => {
                // revoked, or the role changed: the stream ends here
                f.over = true;
                Event::default()
                    .event("refused")
                    .data("the key no longer allows reading; enter another")
            }
            Ok(()) => match f.d.document(f.value.as_deref()).await {
                Ok(doc) => Event::default().event("snapshot").data(doc.to_string()),
                Err(status) => Event::default()
                    .event("problem")
                    .data(status.message().replace('\n', " ")),
            },
        };
        Some((Ok::<_, Infallible>(event), f))
    });
    no_store(
        Sse::new(stream)
            .keep_alive(KeepAlive::default())
            .into_response(),
    )
}
