//! What the console asks of the process that runs the proxy: the running
//! configuration, a reload, a shutdown. The process (`authgres serve`)
//! answers on the other end of the channel set with
//! [`crate::Proxy::set_control`]; its HTTP admin API sends the same
//! requests.

use tokio::sync::oneshot;

/// A request to the process.
#[derive(Debug)]
pub enum ControlRequest {
    /// Reload the configuration: the answer names the changed settings
    /// that need a restart, or says why the file was refused.
    Reload(oneshot::Sender<Result<Vec<&'static str>, String>>),
    /// The running configuration, key by key.
    ShowConfig(oneshot::Sender<Vec<ConfigEntry>>),
    /// Drain and exit, as on SIGTERM.
    Shutdown,
}

/// One configuration key, as `SHOW CONFIG` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConfigEntry {
    /// `section.key`, as the file names it.
    pub key: String,
    /// The value in force.
    pub value: String,
    /// The value without the key in the file (empty when there is none).
    pub default: String,
    /// Whether a reload changes it (else it takes a restart).
    pub changeable: bool,
}
