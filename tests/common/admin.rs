//! The stack's admin listener: GET and POST, `/readyz`, and `/metrics`
//! parsed by Python's prometheus_client into [`Samples`].

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{Stack, provision};

/// What `/metrics` said: each sample as `name{label="value",...}` (labels
/// sorted), parsed by Python's prometheus_client.
pub type Samples = std::collections::BTreeMap<String, f64>;

impl Stack {
    /// GETs `path` from the admin listener: status and body.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let response = reqwest::get(format!("http://127.0.0.1:{}{path}", self.admin_port))
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = response.status().as_u16();
        (status, response.text().await.expect("body"))
    }

    /// POSTs to `path` on the admin listener: status and body.
    pub async fn admin_post(&self, path: &str) -> (u16, String) {
        let response = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{}{path}", self.admin_port))
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let status = response.status().as_u16();
        (status, response.text().await.expect("body"))
    }

    /// Scrapes `/metrics` and parses it with Python's prometheus_client.
    pub async fn metrics(&self) -> Samples {
        let (status, text) = self.admin_get("/metrics").await;
        assert_eq!(status, 200, "{text}");
        parse_metrics(&text)
    }

    /// Waits until `/readyz?strict` answers 200: ready, and not degraded
    /// (the upstream reachable, every provider's keys loaded).
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (status, body) = self.admin_get("/readyz?strict").await;
            if status == 200 {
                return;
            }
            assert!(Instant::now() < deadline, "never ready: {body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Parses Prometheus text with the Python client's own parser (a real
/// consumer of the format, not ours), into sample name with sorted labels
/// → value.
pub fn parse_metrics(text: &str) -> Samples {
    use std::io::Write as _;
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
print(json.dumps(out))
"#;
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT])
        .env("PYTHONPATH", provision::python_path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write metrics");
    let output = child.wait_with_output().expect("parser");
    assert!(
        output.status.success(),
        "prometheus_client refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("parser output")
}
