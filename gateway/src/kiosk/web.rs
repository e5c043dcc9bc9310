//! The kiosk's web server: the patient page and the staff page (issue 12 items 3 and 4).
//!
//! PLACEHOLDER so the kiosk's state and its web server can be built side by side: the kiosk-web branch
//! replaces this file. Until then the server accepts nothing and returns when `shutdown` fires.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{KioskControl, StaffToken};

/// Serves the kiosk pages on `listener` until `shutdown`.
///
/// # Errors
///
/// An I/O error of the listener.
pub async fn serve<K: KioskControl>(
    listener: tokio::net::TcpListener,
    kiosk: Arc<K>,
    staff: Vec<StaffToken>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let _ = (listener, kiosk, staff);
    shutdown.cancelled().await;
    Ok(())
}
