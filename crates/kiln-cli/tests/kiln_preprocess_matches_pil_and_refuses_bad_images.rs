//! `kiln preprocess` against the PIL + numpy way of the same steps (PIL from PyPI): the
//! same batch within 1/255 mean absolute difference per image; and every kind of bad
//! input refused with a message naming the file while the other images come back.

mod support;

use std::ffi::OsStr;
use std::path::Path;

use support::{kiln, python};

fn paths(value: &serde_json::Value) -> Vec<String> {
    value.as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect()
}

#[test]
fn letterbox_lanczos3_equals_pil_within_one_level() {
    let dir = tempfile::tempdir().unwrap();
    let files = paths(&python("pil_reference.py", &[OsStr::new("make"), dir.path().as_os_str()]));
    assert!(files.len() >= 9);
    let out = dir.path().join("ours.npy");
    let mut args = vec!["preprocess", "examples/preprocess.toml", "--out", out.to_str().unwrap()];
    args.extend(files.iter().map(String::as_str));
    let run = kiln(&args);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));

    let mut compare: Vec<&OsStr> = vec![OsStr::new("compare"), out.as_os_str()];
    compare.extend(files.iter().map(OsStr::new));
    let diffs = python("pil_reference.py", &compare);
    for file in &files {
        let d = &diffs[file];
        let name = Path::new(file).file_name().unwrap().to_string_lossy();
        // The normalisation undone, in pixel levels (0..255): on average within one level.
        assert!(d["mean"].as_f64().unwrap() <= 1.0, "{name}: {d}");
        assert!(d["max"].as_f64().unwrap() <= 16.0, "{name}: {d}");
    }
}

#[test]
fn bad_images_are_named_and_the_others_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let bad = paths(&python("pil_reference.py", &[OsStr::new("make-bad"), dir.path().as_os_str()]));
    let good = dir.path().join("whole.jpg"); // written by make-bad beside the bad ones
    let out = dir.path().join("batch.npy");
    let mut args = vec![
        "preprocess",
        "examples/preprocess.toml",
        "--out",
        out.to_str().unwrap(),
        good.to_str().unwrap(),
    ];
    args.extend(bad.iter().map(String::as_str));
    args.push(good.to_str().unwrap());
    let run = kiln(&args);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "some images failed: {stderr}");
    let expect = [
        ("truncated.jpg", "truncated"),
        ("empty.jpg", "empty"),
        ("notes.jpg", "not an image"),
        ("bomb.png", "50000×50000"),
        ("image.ppm", "not supported"),
    ];
    for (file, why) in expect {
        let line =
            stderr.lines().find(|l| l.contains(file)).unwrap_or_else(|| panic!("{file} not named: {stderr}"));
        assert!(line.contains(why), "{file}: {line}");
    }
    assert!(stderr.contains("preprocessed 2 of 7 images"), "{stderr}");
    // The two good images were written, as the first two rows.
    let header = std::fs::read(&out).unwrap();
    assert!(String::from_utf8_lossy(&header[..128]).contains("'shape': (2, 3, 224, 224)"));

    let empty = dir.path().join("no-images");
    std::fs::create_dir(&empty).unwrap();
    std::fs::write(empty.join("readme.txt"), "no pictures here").unwrap();
    let run = kiln(&[
        "preprocess",
        "examples/preprocess.toml",
        "--out",
        out.to_str().unwrap(),
        empty.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1));
    assert!(stderr.contains("no-images") && stderr.contains("holds no images"), "{stderr}");
}

#[test]
fn it_reads_only_the_preprocess_section() {
    // A config whose model does not exist still pre-processes.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, "[model]\npath = \"/nowhere\"\n[preprocess]\nwidth = 32\nheight = 16\nlayout = \"hwc\"\ndtype = \"u8\"\n").unwrap();
    let image = dir.path().join("x.png");
    let files = paths(&python("pil_reference.py", &[OsStr::new("make"), dir.path().as_os_str()]));
    std::fs::copy(&files[2], &image).unwrap();
    let out = dir.path().join("x.npy");
    let preprocess = |extra: &[&str]| {
        let mut args = vec![
            "preprocess",
            config.to_str().unwrap(),
            image.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        kiln(&args)
    };
    let run = preprocess(&[]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let bytes = std::fs::read(&out).unwrap();
    let header = String::from_utf8_lossy(&bytes[..128]);
    assert!(header.contains("'|u1'") && header.contains("(1, 16, 32, 3)"), "{header}");
    let run = preprocess(&["--set", "preprocess.dtype=\"i64\""]);
    assert_eq!(run.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&run.stderr).contains("preprocess.dtype"));
}
