//! `kiln devices` lists the CPU with its memory, and NVIDIA GPUs through NVML; on a
//! machine without a driver (CI) it lists the CPU, says why there is no GPU, and
//! succeeds.

mod support;

#[test]
fn the_json_has_the_cpu_and_a_reason_or_gpus() {
    let out = support::kiln(&["devices", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["cpu"]["device"], "cpu");
    assert!(report["cpu"]["threads"].as_u64().unwrap() >= 1);
    let memory = &report["cpu"]["memory"];
    assert!(memory["total"].as_u64().unwrap() >= memory["free"].as_u64().unwrap());
    let gpus = report["gpus"].as_array().unwrap();
    if gpus.is_empty() {
        assert!(
            report["no_gpu_reason"].as_str().unwrap().contains("no NVIDIA GPU")
                || report["no_gpu_reason"] == "NVML found no GPU"
        );
    } else {
        assert_eq!(gpus[0]["device"], "cuda:0");
        assert!(gpus[0]["memory"]["total"].as_u64().unwrap() > 0);
    }
    let table = support::kiln(&["devices"]);
    assert!(table.status.success());
    assert!(String::from_utf8_lossy(&table.stdout).lines().nth(1).unwrap().starts_with("cpu "));
}
