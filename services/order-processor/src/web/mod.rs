//! The processor's web face: the shared `/healthz`, `/readyz` and `/metrics`, this replica's
//! `/stats`, the group's `/stats/global`, the status page on `/` ([`status`]) and the pause
//! switch ([`pause`]).

pub mod pause;
pub mod status;

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use order_runtime::http::Probe;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::durability::{Durability, GroupTotals, TotalsError};
use crate::partition::worker::Processing;

/// The routes: shared health and metrics, `/stats`, `/stats/global` and the status page,
/// whose throughput history is kept from now until `shutdown`.
pub fn router<D: Durability>(
    processing: Arc<Processing<D>>,
    totals: Arc<dyn GroupTotals>,
    config: &Config,
    probe: Arc<Probe>,
    registry: Registry,
    shutdown: &CancellationToken,
) -> Router {
    let stats = Router::new()
        .route(
            "/stats",
            get(|State(p): State<Arc<Processing<D>>>| async move {
                // this replica's share, plus its end-to-end latency since start-up: of every
                // order, and of those that needed no retry
                let mut doc = serde_json::to_value(p.durability.report()).unwrap_or_default();
                let (all, first_attempt) = p.metrics.end_to_end_summary();
                if let (Some(map), Ok(all), Ok(first_attempt)) = (
                    doc.as_object_mut(),
                    serde_json::to_value(all),
                    serde_json::to_value(first_attempt),
                ) {
                    map.insert("end_to_end_latency_ms".to_owned(), all);
                    map.insert(
                        "end_to_end_latency_first_attempt_ms".to_owned(),
                        first_attempt,
                    );
                }
                Json(doc)
            }),
        )
        .with_state(processing.clone());
    let global = Router::new()
        .route("/stats/global", get(global_stats))
        .with_state(totals.clone());
    let durability = processing.durability.clone();
    let own: status::OwnCount = Box::new(move || durability.report().processed);
    let status_page = Arc::new(status::StatusPage::new(config.clone(), totals, own));
    tokio::spawn(status_page.clone().keep_history(shutdown.clone()));
    let page = Router::new()
        .route("/", get(status::page))
        .route("/status.json", get(status::status))
        .with_state(status_page);
    let pause = pause::router(processing.pause.clone(), config.common.operations.clone());
    order_runtime::http::router(probe, registry)
        .merge(pause)
        .merge(stats)
        .merge(global)
        .merge(page)
}

/// `GET /stats/global`: the whole group's committed totals (exactly-once only).
async fn global_stats(State(totals): State<Arc<dyn GroupTotals>>) -> axum::response::Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    match tokio::task::spawn_blocking(move || totals.report()).await {
        Ok(Ok(report)) => Json(report).into_response(),
        Ok(Err(e @ TotalsError::NotKept(_))) => {
            (StatusCode::CONFLICT, e.to_string()).into_response()
        }
        Ok(Err(e @ TotalsError::Unavailable(_))) => {
            (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
