//! Reading a `/sql` request body: within `max_request_bytes`, within
//! `body_timeout`, and within one budget of body bytes for the whole proxy
//! (`max_request_bytes_total`).
//!
//! Admission bounds who may send a body, not how many: the anonymous role
//! needs no token, so anyone is admitted, and sixteen bodies of 10 MiB at
//! once took a proxy from 13 to 548 MiB. So a body declared over the limit
//! is refused (413) before a byte of it is read, and every body first
//! reserves its size (its `Content-Length`, or the limit when it has none)
//! from the budget, waiting its turn for up to `body_timeout`; the
//! reservation is held until the request's statements, copies of the body,
//! are sent to Postgres, and not while they run.

use axum::body::Body;
use axum::http::StatusCode;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt as _;
use hyper::body::Body as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, timeout_at};

use super::Failure;
use crate::HttpConfig;

/// Body bytes held by every request at once, for the whole proxy.
pub(crate) struct BodyBudget {
    /// One permit a byte.
    bytes: std::sync::Arc<Semaphore>,
    /// Its permits: the most one request can reserve.
    permits: usize,
}

impl BodyBudget {
    /// A budget of `total` bytes.
    pub(crate) fn new(total: usize) -> Self {
        let permits = total.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            bytes: std::sync::Arc::new(Semaphore::new(permits)),
            permits,
        }
    }
}

/// A body's share of the budget: hold it until what was made of the body
/// is sent.
pub(crate) struct Reservation(
    #[allow(dead_code, reason = "held, never read")] Option<OwnedSemaphorePermit>,
);

fn too_large(limit: usize) -> Failure {
    Failure::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "54000",
        format!("request body is larger than the limit of {limit} bytes"),
    )
}

fn too_slow(config: &HttpConfig) -> Failure {
    Failure::new(
        StatusCode::REQUEST_TIMEOUT,
        "08P01",
        format!(
            "the request body did not arrive within {}s",
            config.body_timeout.as_secs_f64()
        ),
    )
}

/// The size a body announces, refused before reading when over the limit.
pub(crate) fn check_declared(config: &HttpConfig, body: &Body) -> Result<(), Failure> {
    let declared = body.size_hint().exact();
    match declared.map(usize::try_from) {
        Some(Ok(size)) if size <= config.max_request_bytes => Ok(()),
        Some(_) => Err(too_large(config.max_request_bytes)),
        None => Ok(()),
    }
}

/// Reads `body` (see the module docs).
pub(crate) async fn read(
    config: &HttpConfig,
    budget: &BodyBudget,
    mut body: Body,
) -> Result<(Bytes, Reservation), Failure> {
    check_declared(config, &body)?;
    let limit = config.max_request_bytes;
    let declared = body
        .size_hint()
        .exact()
        .and_then(|size| usize::try_from(size).ok());
    let reserve = declared.unwrap_or(limit).min(budget.permits);
    let held = match u32::try_from(reserve) {
        Ok(0) => None,
        Ok(permits) => {
            let deadline = Instant::now() + config.body_timeout;
            let acquire = std::sync::Arc::clone(&budget.bytes).acquire_many_owned(permits);
            match timeout_at(deadline, acquire).await {
                Ok(Ok(permit)) => Some(permit),
                Ok(Err(_)) | Err(_) => {
                    return Err(Failure::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "53000",
                        "the proxy is busy reading other requests; try again",
                    ));
                }
            }
        }
        Err(_) => return Err(too_large(limit)),
    };
    let deadline = Instant::now() + config.body_timeout;
    let mut bytes = BytesMut::with_capacity(declared.unwrap_or(0));
    loop {
        let frame = match timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(too_slow(config)),
            Ok(None) => break,
            Ok(Some(Err(_))) => {
                return Err(Failure::new(
                    StatusCode::BAD_REQUEST,
                    "08P01",
                    "the request body could not be read",
                ));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if bytes.len().saturating_add(data.len()) > limit {
            return Err(too_large(limit));
        }
        bytes.extend_from_slice(&data);
    }
    Ok((bytes.freeze(), Reservation(held)))
}
