//! `POST /pause` and `POST /resume` (each with an optional `?partition=N`), and `GET /pause`:
//! the web side of the replica's [`PauseControl`].

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;

use crate::partition::pause::{PauseControl, Paused};

#[derive(Debug, Deserialize)]
struct Target {
    partition: Option<i32>,
}

/// The new state, or a 409 with the reason the change was refused.
fn answer(changed: Result<Paused, &'static str>) -> Response {
    match changed {
        Ok(now) => Json(now).into_response(),
        Err(why) => (StatusCode::CONFLICT, why).into_response(),
    }
}

pub fn router(control: Arc<PauseControl>) -> Router {
    Router::new()
        .route(
            "/pause",
            post(
                |State(c): State<Arc<PauseControl>>, Query(t): Query<Target>| async move {
                    answer(c.pause(t.partition))
                },
            )
            .get(|State(c): State<Arc<PauseControl>>| async move { Json(c.state()) }),
        )
        .route(
            "/resume",
            post(
                |State(c): State<Arc<PauseControl>>, Query(t): Query<Target>| async move {
                    answer(c.resume(t.partition))
                },
            ),
        )
        .with_state(control)
}
