//! Loading, layering and validation of the config.
// figment::Jail closures must return figment::Error, which is large.
#![allow(clippy::result_large_err)]

use super::*;
use crate::tensor::DType;
use figment::Jail;

/// Jail closures return figment's error type; carry ours in its message.
fn jail_err(e: Error) -> figment::Error {
    figment::Error::from(e.to_string())
}

fn load_in(jail: &Jail, toml: &str, sets: &[&str]) -> Result<KilnConfig> {
    jail.create_file("kiln.toml", toml).unwrap();
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    KilnConfig::load(Some(Path::new("kiln.toml")), &sets)
}

#[test]
fn defaults_are_candle_minilm_on_cpu() {
    let c = KilnConfig::default();
    assert_eq!(c.provider.name, "candle");
    assert_eq!(c.model.path, PathBuf::from(DEFAULT_MODEL_DIR));
    assert_eq!(
        (c.model.device, c.model.dtype, c.task),
        (DeviceChoice::Fixed(Device::Cpu), DType::F32, Task::Embed)
    );
    assert!(c.model.gpu_ids.is_empty());
    c.validate().unwrap();
}

/// A file that is not TOML is one error, with the parse error and the file — not
/// one per config section (issue 17: it was printed 14 times).
#[test]
fn a_file_that_does_not_parse_is_reported_once() {
    Jail::expect_with(|jail| {
        let Err(Error::Config(issues)) = load_in(jail, "[model\npath = \"x\"\n", &[]) else {
            panic!("a malformed file must be a config error");
        };
        assert_eq!(issues.len(), 1, "{issues:?}");
        let text = issues[0].to_string();
        assert!(text.contains("line 1") && text.contains("kiln.toml"), "{text}");
        Ok(())
    });
}

#[test]
fn layers_apply_in_order_file_env_set() {
    Jail::expect_with(|jail| {
        let file = "[model]\ndtype = \"f16\"\ndevice = \"cuda:1\"\n[batching]\nmax_batch_size = 8\n";
        let c = load_in(jail, file, &[]).map_err(jail_err)?;
        assert_eq!(
            (c.model.dtype, c.model.device, c.batching.max_batch_size),
            (DType::F16, DeviceChoice::Fixed(Device::Cuda(1)), 8)
        );

        jail.set_env("KILN_MODEL__DTYPE", "bf16");
        jail.set_env("KILN_BATCHING__MAX_BATCH_SIZE", "16");
        let c = load_in(jail, file, &[]).map_err(jail_err)?;
        assert_eq!((c.model.dtype, c.batching.max_batch_size), (DType::BF16, 16));
        assert_eq!(c.model.device, Device::Cuda(1), "keys the env does not set keep the file's value");

        let c = load_in(jail, file, &["model.dtype=f32", "batching.max_batch_size=4", "provider.name=mine"])
            .map_err(jail_err)?;
        assert_eq!((c.model.dtype, c.batching.max_batch_size), (DType::F32, 4));
        assert_eq!(c.provider.name, "mine");
        Ok(())
    });
}

#[test]
fn relative_model_path_in_a_file_is_relative_to_the_file() {
    Jail::expect_with(|jail| {
        // The folder exists: a missing `models/m` would be read as a Hugging Face id.
        std::fs::create_dir_all("conf/models/m").unwrap();
        jail.create_file("conf/k.toml", "[model]\npath = \"models/m\"\n")?;
        let c = KilnConfig::load(Some(Path::new("conf/k.toml")), &[]).map_err(jail_err)?;
        assert_eq!(c.model.path, std::path::absolute("conf/models/m").unwrap());
        let c = KilnConfig::load(Some(Path::new("conf/k.toml")), &["model.path=other".into()])
            .map_err(jail_err)?;
        assert_eq!(
            c.model.path,
            std::path::absolute("other").unwrap(),
            "--set paths are relative to the working directory"
        );
        Ok(())
    });
}

#[test]
fn every_bad_value_is_reported_with_key_value_expectation_and_origin() {
    Jail::expect_with(|jail| {
        let file = "[model]\ndtype = \"f64\"\n[text]\ncolour = 3\n[extra]\nx = 1\n";
        let err = load_in(jail, file, &[]).unwrap_err().to_string();
        assert!(err.contains("`model.dtype`: found string \"f64\", expected one of f32, f16, bf16"), "{err}");
        assert!(err.contains("(set in kiln.toml)"), "{err}");
        assert!(
            err.contains(
                "`text.colour`: found an unknown key, expected one of the keys max_length, pooling, normalize"
            ),
            "{err}"
        );
        assert!(
            err.contains("`extra`: found an unknown key, expected one of the keys task, provider"),
            "{err}"
        );

        let err =
            load_in(jail, "", &["batching.max_batch_size=0", "text.max_length=0"]).unwrap_err().to_string();
        assert!(err.contains("`batching.max_batch_size`: found 0, expected an integer in 1..=4096"), "{err}");
        assert!(err.contains("`text.max_length`: found 0, expected an integer in 1..=65536"), "{err}");
        let err = load_in(jail, "", &["batching.batch_multiple=0", "batching.sequence_multiple=5000"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`batching.batch_multiple`: found 0, expected an integer in 1..=4096"), "{err}");
        assert!(err.contains("`batching.sequence_multiple`: found 5000"), "{err}");
        let b = load_in(jail, "", &[]).unwrap().batching;
        assert_eq!((b.batch_multiple_on(Device::Cpu), b.sequence_multiple_on(Device::Cpu)), (1, 1));
        assert_eq!((b.batch_multiple_on(Device::Cuda(0)), b.sequence_multiple_on(Device::Cuda(0))), (32, 16));
        assert!(!b.warmup_on(Device::Cpu) && b.warmup_on(Device::Cuda(0)));

        jail.set_env("KILN_MODEL__DEVICE", "gpu0");
        let err = load_in(jail, "", &["batching.max_batch_size=5000"]).unwrap_err().to_string();
        assert!(
            err.contains("`batching.max_batch_size`: found 5000"),
            "range problems come with type problems: {err}"
        );
        assert!(
            err.contains("`model.device`: found string \"gpu0\", expected `auto`, `cpu`, `cuda:N`"),
            "{err}"
        );
        assert!(err.contains("environment variable KILN_MODEL__DEVICE"), "{err}");
        Ok(())
    });
}

#[test]
fn device_auto_and_gpu_replicas() {
    Jail::expect_with(|jail| {
        let c = load_in(jail, "[model]\ndevice = \"auto\"\ngpu_ids = [0, 1, 1]\n", &[]).map_err(jail_err)?;
        assert_eq!((c.model.device, c.model.gpu_ids.clone()), (DeviceChoice::Auto, vec![0, 1, 1]));
        assert_eq!(c.model.device.to_string(), "auto");
        let err = load_in(jail, "[model]\ngpu_ids = [0]\n", &[]).unwrap_err().to_string();
        assert!(
            err.contains(
                "`model.device`: found \"cpu\" with model.gpu_ids = [0], expected \"auto\" or \"cuda:N\""
            ),
            "{err}"
        );
        Ok(())
    });
}

#[test]
fn bad_set_flags_and_types_are_reported() {
    Jail::expect_with(|jail| {
        let err = load_in(jail, "", &["nonsense"]).unwrap_err().to_string();
        assert!(err.contains("`--set`: found `nonsense`, expected section.key=value"), "{err}");
        let err = load_in(jail, "", &["batching.max_batch_size=lots"]).unwrap_err().to_string();
        assert!(err.contains("`batching.max_batch_size`: found string \"lots\""), "{err}");
        assert!(err.contains("--set flag"), "{err}");
        let err = load_in(jail, "task = \"dance\"\n", &[]).unwrap_err().to_string();
        assert!(err.contains("`task`: found \"dance\", expected one of embed"), "{err}");
        Ok(())
    });
}

#[test]
fn a_named_config_file_must_exist() {
    let err = KilnConfig::load(Some(Path::new("/no/such/kiln.toml")), &[]).unwrap_err().to_string();
    assert_eq!(err, "reading config /no/such/kiln.toml: no such file");
}

#[test]
fn printed_config_loads_back_to_the_same_config() {
    Jail::expect_with(|jail| {
        let mut c = KilnConfig::default();
        c.text.pooling = Some(Pooling::Cls);
        c.trackers.push(TrackerConfig { kind: "stdout".into(), options: Default::default() });
        // Loaded paths are absolute, so the printed file means the same wherever it is saved.
        c.model.path = std::path::absolute(&c.model.path).unwrap();
        jail.create_file("round.toml", &c.to_toml().map_err(jail_err)?)?;
        let back = KilnConfig::load(Some(Path::new("round.toml")), &[]).map_err(jail_err)?;
        assert_eq!(back, c);
        Ok(())
    });
}

#[test]
fn server_limits_are_checked_by_key() {
    let err = KilnConfig::load(None, &["server.max_inputs=0".into(), "server.api_keys=[\"\"]".into()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("server.max_inputs") && err.contains("server.api_keys"), "{err}");
    let err =
        KilnConfig::load(None, &["server.cors_origins=[\"app.example/\"]".into()]).unwrap_err().to_string();
    assert!(err.contains("server.cors_origins") && err.contains("scheme and host"), "{err}");
    let ok = KilnConfig::load(None, &["server.port=0".into(), "server.api_keys=[\"k1\"]".into()]).unwrap();
    assert_eq!((ok.server.port, ok.server.api_keys.as_slice()), (0, ["k1".to_string()].as_slice()));
}

#[test]
fn stop_strings_are_bounded_in_count_and_length() {
    let ok = crate::GenerateConfig { stop: vec!["END".into(); 16], ..Default::default() };
    assert!(ok.issues().is_empty());
    let many = crate::GenerateConfig { stop: vec!["END".into(); 17], ..Default::default() };
    assert!(many.issues()[0].to_string().contains("at most 16 strings"), "{:?}", many.issues());
    let long = crate::GenerateConfig { stop: vec!["x".repeat(2_000_000)], ..Default::default() };
    let issue = long.issues()[0].to_string();
    assert!(issue.contains("2000000 bytes") && issue.contains("256 bytes"), "{issue}");
}
