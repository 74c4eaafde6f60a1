//! deploy/: the Kubernetes manifests validate, strictly (unknown fields are errors),
//! against Kubernetes' own schemas (kubernetes-validate, offline, from
//! `scripts/setup serve`), and their probes use routes `kiln serve` answers. The
//! container build file is not built here (no container runtime on this machine).

mod support;

use std::process::Command;

use support::root;

#[test]
fn the_kubernetes_manifests_validate_and_probe_kiln_s_routes() {
    let python = std::env::var("SERVE_CLIENTS_PYTHON").unwrap_or_else(|_| {
        panic!(
            "SERVE_CLIENTS_PYTHON is not set: run `scripts/setup serve` and `. .kiln/env` (scripts/test does)"
        )
    });
    let manifest = root().join("deploy/k8s/kiln.yaml");
    let out =
        Command::new(python).args(["-m", "kubernetes_validate", "--strict"]).arg(&manifest).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    for kind in [
        "deployment/kiln",
        "service/kiln",
        "horizontalpodautoscaler/kiln",
        "deployment/kiln-redis",
        "service/kiln-redis",
    ] {
        assert!(text.contains(&format!("passed for resource {kind}")), "{kind}: {text}");
    }
    let yaml = std::fs::read_to_string(&manifest).unwrap();
    // The routes the probes call are kiln serve's (tested in kiln_serve_answers_*.rs).
    assert!(yaml.contains("path: /health") && yaml.contains("path: /v2/health/live"), "{yaml}");
    let docker = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    assert!(docker.contains(r#"CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]"#), "{docker}");
}
