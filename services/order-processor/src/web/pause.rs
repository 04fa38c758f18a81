//! `POST /pause` and `POST /resume` (each with an optional `?partition=N`), and `GET /pause`:
//! the web side of the replica's [`PauseControl`]. A change answers with the state after it
//! (what is paused now, and what this replica holds); a request that is not right is refused
//! before anything changes: 400 for a partition the topic does not have, an unknown query
//! parameter or a body, 409 for a partition that is not this replica's, with what is valid.
//! The two changes are operations ([`order_runtime::operations`]): they need the credential.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use order_runtime::operations::{self, Credential};
use serde::Deserialize;

use crate::partition::pause::{PauseControl, PauseState, Refusal};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Target {
    partition: Option<i32>,
}

/// The new state, or the refusal with its status.
fn answer(changed: Result<PauseState, Refusal>) -> Response {
    match changed {
        Ok(now) => Json(now).into_response(),
        Err(Refusal::NoSuchPartition(why)) => operations::refused(StatusCode::BAD_REQUEST, why),
        Err(Refusal::NotHere(why)) => operations::refused(StatusCode::CONFLICT, why),
    }
}

/// The routes, behind the operations guard (which lets the read through).
pub fn router(control: Arc<PauseControl>, credential: Credential) -> Router {
    let routes = Router::new()
        .route(
            "/pause",
            post(
                |State(c): State<Arc<PauseControl>>, Query(t): Query<Target>, body: Bytes| async move {
                    match operations::refuse_body(&body, "POST /pause") {
                        Some(refused) => refused,
                        None => answer(c.pause(t.partition)),
                    }
                },
            )
            .get(|State(c): State<Arc<PauseControl>>| async move { Json(c.state()) }),
        )
        .route(
            "/resume",
            post(
                |State(c): State<Arc<PauseControl>>, Query(t): Query<Target>, body: Bytes| async move {
                    match operations::refuse_body(&body, "POST /resume") {
                        Some(refused) => refused,
                        None => answer(c.resume(t.partition)),
                    }
                },
            ),
        )
        .with_state(control);
    operations::guarded(routes, credential)
}
