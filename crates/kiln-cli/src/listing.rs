//! `kiln devices` and `kiln providers`: what this machine and this build offer.

use anyhow::Result;

pub(crate) fn devices(json: bool) -> Result<()> {
    let report = kiln::runtime::discover_devices();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let row = |device: &kiln::Device, name: &str, memory: &kiln::MemoryInfo, details: String| {
        println!(
            "{:<8} {:<28} {:>9.1} / {:>6.1} GiB  {details}",
            device.to_string(),
            name,
            gib(memory.used),
            gib(memory.total)
        );
    };
    let c = &report.cpu;
    println!("{:<8} {:<28} {:>22}  details", "device", "name", "memory used / total");
    let cores = c.cores.map(|n| format!(", {n} cores")).unwrap_or_default();
    row(&c.device, &c.name, &c.memory, format!("{} threads{cores}", c.threads));
    for g in &report.gpus {
        let mut details = Vec::new();
        if let Some(u) = g.utilization_percent {
            details.push(format!("{u}% busy"));
        }
        if let Some(t) = g.temperature_c {
            details.push(format!("{t} °C"));
        }
        if let Some(p) = g.power_w {
            details.push(format!("{p:.0} W"));
        }
        row(&g.device, &g.name, &g.memory, details.join(", "));
    }
    match (&report.driver_version, &report.cuda_version, &report.no_gpu_reason) {
        (Some(d), Some(c), _) => println!("NVIDIA driver {d}, CUDA {c}"),
        (_, _, Some(reason)) => println!("{reason}"),
        _ => {}
    }
    Ok(())
}

pub(crate) fn providers(json: bool) -> Result<()> {
    let registry = kiln::providers()?;
    let rows: Vec<serde_json::Value> = registry
        .iter()
        .map(|reg| {
            let built = (reg.build)(&kiln::ProviderConfig { name: reg.name.into(), ..Default::default() });
            match built {
                Ok(p) => serde_json::json!({"name": reg.name, "description": reg.description, "capabilities": p.capabilities()}),
                Err(e) => serde_json::json!({"name": reg.name, "description": reg.description, "error": e.to_string()}),
            }
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let list = |v: &serde_json::Value| {
        v.as_array()
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(", "))
            .unwrap_or_default()
    };
    println!("{:<10} {:<14} {:<16} {:<17} description", "provider", "devices", "dtypes", "quantization");
    for row in &rows {
        let caps = &row["capabilities"];
        let quantization = ["none".to_string(), list(&caps["quantization"])].join(", ");
        println!(
            "{:<10} {:<14} {:<16} {:<17} {}",
            row["name"].as_str().unwrap_or_default(),
            list(&caps["devices"]),
            list(&caps["dtypes"]),
            quantization.trim_end_matches(", "),
            row["error"].as_str().map_or_else(
                || row["description"].as_str().unwrap_or_default().to_string(),
                |e| format!("unavailable: {e}")
            )
        );
        // What the provider says about this machine: which CPU kernels run, whether a
        // GPU opened.
        for note in caps["notes"].as_array().into_iter().flatten().filter_map(|n| n.as_str()) {
            println!("{:<10} - {note}", "");
        }
    }
    // The other plugin kinds a config can choose in this binary.
    println!();
    for c in kiln::caches()?.iter() {
        println!("cache.kind = {:<14} {}", format!("{:?}", c.name), c.description);
    }
    for p in kiln::runtime::profilers()?.iter() {
        println!("profiler.kind = {:<11} {}", format!("{:?}", p.name), p.description);
    }
    println!("trackers: {}", kiln::trackers()?.names().join(", "));
    Ok(())
}
