//! The analyzer's web face beside the shared `/healthz`, `/readyz` and `/metrics`: the
//! `/report` of the dead letters so far, and `POST /redrive` / `GET /redrive`.

use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use order_runtime::operations::{self, JsonBody};
use order_schema::OrderCodec;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::Config;
use crate::redrive;
use crate::report::Report;

/// `/report` (with the redrives' records) and `/redrive`.
pub fn router(report: Arc<Mutex<Report>>, redrives: Arc<Redrives>) -> Router {
    let runs = redrives.clone();
    Router::new()
        .route(
            "/report",
            get(move || {
                let (r, runs) = (report.clone(), runs.clone());
                async move {
                    let mut report = r.lock().map(|r| r.clone()).unwrap_or_default();
                    report.redrives = runs.list();
                    Json(report)
                }
            }),
        )
        .merge(redrives.router())
}

/// The redrives this analyzer ran or runs (`POST /redrive`, `GET /redrive`).
pub struct Redrives {
    config: Config,
    codec: Arc<OrderCodec>,
    runs: Mutex<Vec<Arc<Mutex<redrive::RedriveRun>>>>,
    shutdown: CancellationToken,
}

impl Redrives {
    pub fn new(config: Config, codec: Arc<OrderCodec>, shutdown: CancellationToken) -> Self {
        Redrives {
            config,
            codec,
            runs: Mutex::default(),
            shutdown,
        }
    }

    /// Every run's record, the running ones as they are now.
    pub fn list(&self) -> Vec<redrive::RedriveRun> {
        self.runs
            .lock()
            .map(|runs| {
                runs.iter()
                    .filter_map(|r| r.lock().ok().map(|r| r.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `POST /redrive` with [`redrive::Options`] as JSON: a dry run answers with what it
    /// found; a real run starts and answers 202 with its record, which `GET /redrive` and
    /// `/report` keep up to date.
    async fn start(self: Arc<Self>, options: redrive::Options) -> axum::response::Response {
        use axum::http::StatusCode;
        use axum::response::IntoResponse;
        let run = Arc::new(Mutex::new(redrive::new_run(&options)));
        if let Ok(mut runs) = self.runs.lock() {
            runs.push(run.clone());
        }
        let this = self.clone();
        let job = {
            let run = run.clone();
            async move {
                let result = redrive::run(
                    &this.config.common,
                    &this.config.redrive(),
                    &this.codec,
                    &options,
                    &run,
                    &this.shutdown,
                )
                .await;
                if let Err(e) = &result
                    && let Ok(mut r) = run.lock()
                {
                    warn!(error = %e, id = %r.id, "redrive failed");
                    r.status = format!("failed: {e}");
                    r.finished_at = Some(order_runtime::dead_letter::now_rfc3339());
                }
                result
            }
        };
        let snapshot = |run: &Mutex<redrive::RedriveRun>| run.lock().map(|r| r.clone()).ok();
        if run.lock().is_ok_and(|r| r.dry_run) {
            return match job.await {
                Ok(()) => Json(snapshot(&run)).into_response(),
                Err(e @ redrive::RedriveError::BadRequest(_)) => {
                    (StatusCode::BAD_REQUEST, e.to_string()).into_response()
                }
                Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
            };
        }
        tokio::spawn(job);
        (StatusCode::ACCEPTED, Json(snapshot(&run))).into_response()
    }

    /// `POST /redrive` (an operation: it needs the credential) and `GET /redrive`. A request
    /// is checked whole before any run is made of it: a bad one is refused with 400, the field
    /// and the reason.
    fn router(self: Arc<Self>) -> Router {
        let credential = self.config.common.operations.clone();
        let routes =
            Router::new()
                .route(
                    "/redrive",
                    axum::routing::post(
                        |State(r): State<Arc<Self>>,
                         JsonBody(options): JsonBody<redrive::Options>| async move {
                            match redrive::check(&options) {
                                Err(e) => {
                                    operations::refused(StatusCode::BAD_REQUEST, e.to_string())
                                }
                                Ok(_) => r.start(options).await,
                            }
                        },
                    )
                    .get(|State(r): State<Arc<Self>>| async move { Json(r.list()) }),
                )
                .with_state(self);
        operations::guarded(routes, credential)
    }
}
