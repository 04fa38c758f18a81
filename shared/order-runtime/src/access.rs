//! The start-up check of a service's access: the registry's and the Kafka cluster's refusal of
//! its settings (credentials, TLS, ACLs) stop it with what to fix; a dependency that does not
//! answer yet is waited out later, as `/readyz` says.

use crate::config::CommonConfig;
use crate::kafka::{ClusterRefused, check_cluster_access};

/// The registry or the Kafka cluster refused the service's settings at start-up.
#[derive(Debug, thiserror::Error)]
pub enum AccessRefused {
    #[error(transparent)]
    Registry(#[from] order_schema::AccessError),
    #[error(transparent)]
    Cluster(#[from] ClusterRefused),
}

/// At start-up: the registry's refusal (401, 403) or a TLS failure stops the service with
/// what to fix; no answer is waited out (the service stays unready, as for the broker).
pub async fn check_registry(common: &CommonConfig) -> Result<(), order_schema::AccessError> {
    match common.registry.check().await {
        Err(order_schema::AccessError::Unreachable { url, reason }) => {
            tracing::info!(%url, %reason, "the schema registry does not answer yet; waiting for it");
            Ok(())
        }
        other => other,
    }
}

/// At start-up, side by side: the registry's and the Kafka cluster's refusal of this
/// service's settings stop it (see [`check_registry`] and
/// [`check_cluster_access`]); no answer is waited out later.
/// `topic` is the one the service reads or writes first.
pub async fn check_access(common: &CommonConfig, topic: &str) -> Result<(), AccessRefused> {
    let (c, topic) = (common.clone(), topic.to_owned());
    let cluster = tokio::task::spawn_blocking(move || {
        check_cluster_access(&c, &topic, std::time::Duration::from_secs(10))
    });
    let (registry, cluster) = tokio::join!(check_registry(common), cluster);
    registry?;
    match cluster {
        Ok(result) => Ok(result?),
        // the check itself panicked or was cancelled: the service's own waits take over
        Err(e) => {
            tracing::warn!(error = %e, "the Kafka access check did not finish");
            Ok(())
        }
    }
}
