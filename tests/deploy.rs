//! The deployment files in the repository (issue 24) are the ones
//! docs/deploy.md shows, and they hold together: the Kubernetes manifests
//! parse and name each other's ports, ConfigMaps and Secrets; the
//! ConfigMap's proxy.toml passes `authgres check-config` with secrets
//! shaped as init-db writes them; the systemd unit passes `systemd-analyze
//! verify` where that tool exists; the Dockerfile and .dockerignore keep
//! the image small and unprivileged.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a panic is a failing test"
)]

use std::path::{Path, PathBuf};
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every document of every manifest, by kind and name.
fn manifests() -> Vec<(String, Yaml)> {
    let mut all = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(repo("deploy/kubernetes"))
        .expect("deploy/kubernetes")
        .map(|entry| entry.expect("entry").path())
        .collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read");
        let docs = YamlLoader::load_from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not YAML: {e}", file.display()));
        for doc in docs {
            let kind = doc["kind"].as_str().expect("kind").to_owned();
            assert!(
                doc["apiVersion"].as_str().is_some(),
                "{kind} without apiVersion"
            );
            assert!(
                doc["metadata"]["name"].as_str().is_some(),
                "{kind} without a name"
            );
            all.push((kind, doc));
        }
    }
    all
}

fn one<'a>(all: &'a [(String, Yaml)], kind: &str, name: &str) -> &'a Yaml {
    all.iter()
        .find(|(k, doc)| k == kind && doc["metadata"]["name"].as_str() == Some(name))
        .map(|(_, doc)| doc)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn list(yaml: &Yaml) -> &[Yaml] {
    yaml.as_vec().map_or(&[], Vec::as_slice)
}

#[test]
fn the_kubernetes_manifests_parse_and_name_each_other() {
    let all = manifests();
    let deployment = one(&all, "Deployment", "authgres");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let ports: Vec<(&str, i64)> = list(&container["ports"])
        .iter()
        .map(|p| {
            (
                p["name"].as_str().expect("port name"),
                p["containerPort"].as_i64().expect("port"),
            )
        })
        .collect();
    let port = |name: &str| {
        ports
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| *p)
            .unwrap_or_else(|| panic!("no container port {name}: {ports:?}"))
    };

    // The Service: TLS on 5432 and 443, each to a port the container has;
    // no admin port and no plain-HTTP port 443.
    let service = one(&all, "Service", "authgres");
    let mut exposed: Vec<(i64, &str)> = list(&service["spec"]["ports"])
        .iter()
        .map(|p| {
            (
                p["port"].as_i64().expect("port"),
                p["targetPort"].as_str().expect("target"),
            )
        })
        .collect();
    exposed.sort_unstable();
    assert_eq!(exposed, [(443, "https"), (5432, "postgres")]);
    for (_, target) in &exposed {
        port(target);
    }

    // Probes: readiness on /readyz, liveness on /healthz, on the admin port.
    assert_eq!(
        container["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(
        container["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(container[probe]["httpGet"]["port"].as_str(), Some("admin"));
    }
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));

    // The projected volume's sources exist, holding the keys it takes.
    for source in list(&pod["volumes"][0]["projected"]["sources"]) {
        let (kind, reference) = if source["configMap"].is_badvalue() {
            ("Secret", &source["secret"])
        } else {
            ("ConfigMap", &source["configMap"])
        };
        let target = one(&all, kind, reference["name"].as_str().expect("name"));
        for item in list(&reference["items"]) {
            let key = item["key"].as_str().expect("key");
            let data = if target["data"].is_badvalue() {
                &target["stringData"]
            } else {
                &target["data"]
            };
            assert!(!data[key].is_badvalue(), "{kind} has no {key}");
        }
    }

    // The NetworkPolicy names the container's ports; the admin port only
    // from the monitoring namespace.
    let policy = one(&all, "NetworkPolicy", "authgres");
    for rule in list(&policy["spec"]["ingress"]) {
        for allowed in list(&rule["ports"]) {
            let name = allowed["port"].as_str().expect("named port");
            port(name);
            if name == "admin" {
                assert!(!rule["from"].is_badvalue(), "admin open to every source");
            }
        }
    }

    // The ConfigMap's proxy.toml listens where the container ports say,
    // with TLS on both client ports.
    let config = one(&all, "ConfigMap", "authgres-config")["data"]["proxy.toml"]
        .as_str()
        .expect("proxy.toml");
    let parsed: toml::Table = config.parse().expect("proxy.toml is TOML");
    let address = |section: &str| -> i64 {
        let address = parsed[section]["address"].as_str().expect("address");
        address
            .rsplit(':')
            .next()
            .expect("port")
            .parse()
            .expect("port")
    };
    assert_eq!(address("listen"), port("postgres"));
    assert_eq!(address("http"), port("https"));
    assert_eq!(address("admin"), port("admin"));
    assert_eq!(
        parsed["http"]["tls"].as_bool(),
        Some(true),
        "443 must be HTTPS"
    );
    assert!(parsed["listen"].get("tls_cert").is_some());
}

/// The ConfigMap's proxy.toml is one the proxy starts with, given the
/// Secret's files (generated here as init-db and a CA would).
#[test]
fn the_configmap_passes_check_config() {
    let all = manifests();
    let config = one(&all, "ConfigMap", "authgres-config")["data"]["proxy.toml"]
        .as_str()
        .expect("proxy.toml")
        .to_owned();
    let secrets = one(&all, "Secret", "authgres-secrets")["stringData"]["authgres.env"]
        .as_str()
        .expect("authgres.env")
        .to_owned();
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("proxy.toml"), config).expect("config");
    // Each placeholder gets a value of the shape init-db writes.
    let filled: Vec<String> = secrets
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, _)| match name {
            "AUTHGRES_CLAIMS_KEY" => format!("{name}={}", "ab".repeat(32)),
            _ => format!("{name}=generated-password"),
        })
        .collect();
    assert_eq!(filled.len(), 3, "{secrets}");
    std::fs::write(dir.path().join("authgres.env"), filled.join("\n")).expect("secrets");
    let certs = authgres_sandbox::tls::TestCerts::generate().expect("certs");
    std::fs::create_dir(dir.path().join("tls")).expect("tls dir");
    std::fs::write(dir.path().join("tls/tls.crt"), &certs.cert_pem).expect("cert");
    std::fs::write(dir.path().join("tls/tls.key"), &certs.key_pem).expect("key");
    let output = Command::new(env!("CARGO_BIN_EXE_authgres"))
        .args(["check-config", "--config"])
        .arg(dir.path().join("proxy.toml"))
        .output()
        .expect("authgres check-config");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{said}");
    assert!(said.contains("ok: the proxy can start"), "{said}");
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = read("deploy/authgres.service");
    let Ok(found) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("skipped: systemd-analyze is not installed here");
        return;
    };
    assert!(found.status.success());
    // verify checks that ExecStart's program exists: point it at the one
    // just built.
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("authgres.service");
    let built = unit.replace("/usr/local/bin/authgres", env!("CARGO_BIN_EXE_authgres"));
    assert_ne!(built, unit, "ExecStart runs /usr/local/bin/authgres");
    std::fs::write(&path, built).expect("unit");
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze verify");
    let stderr = String::from_utf8_lossy(&output.stderr);
    // A bad value is a warning, not a failure: any word about the unit is
    // a finding.
    let findings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("authgres.service"))
        .collect();
    assert!(output.status.success() && findings.is_empty(), "{stderr}");
    for wanted in [
        "User=authgres",
        "KillSignal=SIGTERM",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(unit.contains(wanted), "{wanted}");
    }
}

#[test]
fn the_image_is_built_small_and_runs_unprivileged() {
    let dockerfile = read("Dockerfile");
    let stages: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage");
    let runtime = &dockerfile[dockerfile.rfind("\nFROM ").expect("runtime stage")..];
    assert!(runtime.contains("USER nonroot"), "{runtime}");
    assert!(dockerfile.contains("CARGO_PROFILE_RELEASE_STRIP=symbols"));
    assert!(dockerfile.contains("--locked"));
    let dockerignore = read(".dockerignore");
    let ignored: Vec<&str> = dockerignore
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect();
    for wanted in ["target/", ".git/", "fuzz/artifacts/", "fuzz/corpus/"] {
        assert!(ignored.contains(&wanted), "{wanted} not in .dockerignore");
    }
    // The docs point at the files rather than keep copies that drift.
    let docs = read("docs/deploy.md");
    assert!(
        !docs.contains("```dockerfile"),
        "docs/deploy.md inlines a Dockerfile"
    );
    for file in [
        "Dockerfile",
        "deploy/authgres.service",
        "deploy/kubernetes/deployment.yaml",
        "deploy/kubernetes/service.yaml",
        "deploy/kubernetes/configmap.yaml",
        "deploy/kubernetes/secret.yaml",
        "deploy/kubernetes/networkpolicy.yaml",
    ] {
        assert!(docs.contains(file), "docs/deploy.md does not name {file}");
    }
}
