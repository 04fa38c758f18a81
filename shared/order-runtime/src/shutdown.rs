//! Shutdown on SIGTERM (Kubernetes, `docker stop`) or Ctrl-C.
//!
//! Services take a [`CancellationToken`] rather than listening for signals themselves, so
//! tests stop them exactly as production does, without signals.

use tokio_util::sync::CancellationToken;

/// Waits for SIGTERM or Ctrl-C and returns which one came.
pub async fn signal() -> &'static str {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            // without a handler we can only wait for SIGTERM
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => "SIGINT",
        () = term => "SIGTERM",
    }
}

/// A token cancelled when the process receives SIGTERM or Ctrl-C.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let which = signal().await;
        tracing::info!(signal = which, "shutdown requested");
        t.cancel();
    });
    token
}
