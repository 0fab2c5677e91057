//! HTTP(S) fetching of JWKS documents and OIDC discovery documents, with the
//! safety limits a proxy on the login path needs: connect and total
//! timeouts, retries with backoff for transient failures only, a capped
//! body, redirects only within the same origin, https unless loopback, and
//! an optional private CA bundle.

use std::time::Duration;

use crate::jwks::KeySet;
use crate::provider::{FetchSettings, check_url};

/// Why a document could not be fetched.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// Connection, TLS or timeout failure.
    #[error("request failed: {0}")]
    Http(String),
    /// A redirect to another origin (or too many redirects).
    #[error("redirect refused: {0}")]
    Redirect(String),
    /// The endpoint answered with a non-success status.
    #[error("endpoint answered HTTP {0}")]
    Status(u16),
    /// The body exceeded the configured limit.
    #[error("response body exceeds {0} bytes")]
    TooLarge(usize),
    /// The body is not the expected JSON document.
    #[error("response is not a valid {what}: {detail}")]
    Invalid {
        /// Which document was expected.
        what: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// A URL the settings do not allow (http off loopback, discovery mismatch).
    #[error("{0}")]
    Refused(String),
}

impl FetchError {
    /// Whether another attempt might succeed.
    fn is_transient(&self) -> bool {
        match self {
            Self::Http(_) => true,
            Self::Status(status) => *status >= 500 || *status == 429,
            Self::Redirect(_) | Self::TooLarge(_) | Self::Invalid { .. } | Self::Refused(_) => {
                false
            }
        }
    }
}

/// A fetched JWKS with the lifetime the provider asked for.
pub struct FetchedDocument {
    /// The usable keys.
    pub keys: KeySet,
    /// `Cache-Control: max-age`, if the provider sent one.
    pub max_age: Option<Duration>,
}

/// The HTTP client of one provider.
pub struct Fetcher {
    client: reqwest::Client,
    settings: FetchSettings,
}

/// Most redirects followed within one origin.
const MAX_REDIRECTS: usize = 3;
/// First retry delay; doubles per attempt.
const RETRY_BACKOFF: Duration = Duration::from_millis(100);

/// Why the HTTP client for a provider's keys could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `ca_file` is not a PEM bundle.
    #[error("CA bundle: {0}")]
    CaBundle(#[source] reqwest::Error),
    /// `ca_file` holds no certificate.
    #[error("CA bundle holds no certificate")]
    EmptyCaBundle,
    /// The TLS stack refused the settings.
    #[error("building the HTTP client: {0}")]
    Build(#[source] reqwest::Error),
}

impl Fetcher {
    /// A client with the provider's timeouts, redirect rule and CA bundle.
    pub fn new(settings: FetchSettings) -> Result<Self, ClientError> {
        let redirects = reqwest::redirect::Policy::custom(|attempt| {
            let same_origin = attempt.previous().first().is_some_and(|first| {
                let next = attempt.url();
                first.scheme() == next.scheme()
                    && first.host_str() == next.host_str()
                    && first.port_or_known_default() == next.port_or_known_default()
            });
            if !same_origin {
                let to = attempt.url().to_string();
                attempt.error(format!("to another origin ({to})"))
            } else if attempt.previous().len() > MAX_REDIRECTS {
                attempt.error("too many redirects")
            } else {
                attempt.follow()
            }
        });
        let mut builder = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.timeout)
            .redirect(redirects)
            .user_agent(concat!("authgres/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &settings.ca_pem {
            let certs =
                reqwest::Certificate::from_pem_bundle(pem).map_err(ClientError::CaBundle)?;
            if certs.is_empty() {
                return Err(ClientError::EmptyCaBundle);
            }
            builder = builder.tls_certs_only(certs);
        }
        let client = builder.build().map_err(ClientError::Build)?;
        Ok(Self { client, settings })
    }

    /// Fetches and parses a JWKS, retrying transient failures.
    pub async fn jwks(&self, url: &str) -> Result<FetchedDocument, FetchError> {
        let (body, max_age) = self.get_with_retries(url).await?;
        Ok(FetchedDocument {
            keys: KeySet::parse(&body)?,
            max_age,
        })
    }

    /// Reads `{issuer}/.well-known/openid-configuration` and returns its
    /// `jwks_uri`, after checking that the document is about this issuer.
    pub async fn discover(&self, issuer: &str) -> Result<String, FetchError> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let (body, _) = self.get_with_retries(&url).await?;
        #[derive(serde::Deserialize)]
        struct Discovery {
            issuer: String,
            jwks_uri: String,
        }
        let document: Discovery =
            serde_json::from_slice(&body).map_err(|e| FetchError::Invalid {
                what: "OpenID configuration",
                detail: e.to_string(),
            })?;
        // OpenID Connect Discovery §4.3: the document must name this issuer.
        if document.issuer != issuer {
            return Err(FetchError::Refused(format!(
                "discovery document names issuer {:?}, expected {issuer:?}",
                document.issuer
            )));
        }
        check_url(&document.jwks_uri, self.settings.allow_insecure_http)
            .map_err(|refused| FetchError::Refused(refused.to_string()))?;
        Ok(document.jwks_uri)
    }

    async fn get_with_retries(&self, url: &str) -> Result<(Vec<u8>, Option<Duration>), FetchError> {
        check_url(url, self.settings.allow_insecure_http)
            .map_err(|refused| FetchError::Refused(refused.to_string()))?;
        let mut attempt = 0;
        loop {
            match self.get(url).await {
                Err(error) if error.is_transient() && attempt < self.settings.retries => {
                    tokio::time::sleep(RETRY_BACKOFF * 2u32.pow(attempt)).await;
                    attempt += 1;
                    tracing::debug!(%url, %error, attempt, "retrying fetch");
                }
                result => return result,
            }
        }
    }

    async fn get(&self, url: &str) -> Result<(Vec<u8>, Option<Duration>), FetchError> {
        let mut response = self
            .client
            .get(url)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(classify)?;
        let status = response.status();
        if !status.is_success() {
            return Err(FetchError::Status(status.as_u16()));
        }
        let limit = self.settings.max_body;
        if response
            .content_length()
            .is_some_and(|len| len > limit as u64)
        {
            return Err(FetchError::TooLarge(limit));
        }
        let max_age = response
            .headers()
            .get(reqwest::header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_max_age);
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(classify)? {
            if body.len() + chunk.len() > limit {
                return Err(FetchError::TooLarge(limit));
            }
            body.extend_from_slice(&chunk);
        }
        Ok((body, max_age))
    }
}

fn classify(error: reqwest::Error) -> FetchError {
    if error.is_redirect() {
        let mut source: Option<&dyn std::error::Error> = Some(&error);
        let mut detail = error.to_string();
        while let Some(e) = source {
            detail = e.to_string();
            source = e.source();
        }
        FetchError::Redirect(detail)
    } else {
        FetchError::Http(cause_chain(&error))
    }
}

/// An error with each of its causes, outermost first: reqwest's own words
/// ("error sending request for url (...)") say nothing of why, its sources
/// do ("connection refused", "invalid peer certificate: UnknownIssuer").
fn cause_chain(error: &dyn std::error::Error) -> String {
    let mut chain = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let words = cause.to_string();
        // Some layers repeat their source's words in their own.
        if !chain.contains(&words) {
            chain.push_str(": ");
            chain.push_str(&words);
        }
        source = cause.source();
    }
    chain
}

/// `max-age` from a Cache-Control header; `no-store`/`no-cache` mean zero.
pub(crate) fn parse_max_age(header: &str) -> Option<Duration> {
    let mut max_age = None;
    for directive in header.split(',').map(str::trim) {
        let lower = directive.to_ascii_lowercase();
        if lower == "no-store" || lower == "no-cache" {
            return Some(Duration::ZERO);
        }
        if let Some(value) = lower.strip_prefix("max-age=") {
            max_age = value
                .trim_matches('"')
                .parse()
                .ok()
                .map(Duration::from_secs);
        }
    }
    max_age
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_control_max_age() {
        assert_eq!(
            parse_max_age("public, max-age=600"),
            Some(Duration::from_secs(600))
        );
        assert_eq!(
            parse_max_age("Max-Age=\"60\", must-revalidate"),
            Some(Duration::from_secs(60))
        );
        assert_eq!(parse_max_age("no-store"), Some(Duration::ZERO));
        assert_eq!(parse_max_age("public"), None);
        assert_eq!(parse_max_age("max-age=soon"), None);
    }

    /// Issue 24: a failed fetch said "error sending request" and not why.
    #[tokio::test]
    async fn a_failed_fetch_says_why_not_only_that_it_failed() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = closed.local_addr().expect("address").port();
        drop(closed);
        let fetcher = Fetcher::new(FetchSettings {
            retries: 0,
            ..FetchSettings::default()
        })
        .expect("fetcher");
        let error = fetcher
            .jwks(&format!("http://127.0.0.1:{port}/jwks.json"))
            .await
            .err()
            .expect("nothing listens there");
        let words = error.to_string().to_lowercase();
        assert!(words.contains("connection refused"), "{words}");
    }
}
