//! The pipeline's tests: decoding, limits, orientation, fitting, normalisation, files.
use super::*;
use image::{DynamicImage, ImageFormat};
use std::io::Cursor;

fn pipeline(f: impl FnOnce(&mut PreprocessConfig)) -> ImagePipeline {
    let mut c = PreprocessConfig { cache_bytes: 0, threads: 1, ..Default::default() };
    f(&mut c);
    ImagePipeline::new(&c).unwrap()
}

fn png(img: DynamicImage) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png).unwrap();
    out
}

#[test]
fn letterbox_geometry_matches_the_seed() {
    let p = pipeline(|_| {});
    // 1920×1080 into 224: long side 224, short floor(224·1080/1920) = 126, top 49.
    let f = p.fit(1920, 1080);
    assert_eq!((f.width, f.height, f.left, f.top, f.crop), (224, 126, 0, 49, None));
    let f = p.fit(100, 301);
    assert_eq!((f.width, f.height, f.left, f.top), (74, 224, 75, 0));
    let p = pipeline(|c| (c.width, c.height) = (192, 48));
    // PP-OCR's 3×48×192: a wide line fills the width, a squarer one the height.
    assert_eq!(p.fit(400, 50).width, 192);
    let f = p.fit(100, 100);
    assert_eq!((f.width, f.height, f.left, f.top), (48, 48, 72, 0));
}

#[test]
fn shortest_edge_crops_the_centre() {
    let p = pipeline(|c| {
        c.mode = ResizeMode::ShortestEdge;
        c.shortest_edge = Some(256);
    });
    let f = p.fit(512, 1024); // resized to 256×512, crop 224×224 at (16, 144)
    assert_eq!((f.width, f.height, f.left, f.top), (224, 224, 0, 0));
    assert_eq!(f.crop, Some((32.0, 288.0, 448.0, 448.0)));
}

#[test]
fn pixels_are_normalised_into_chw_and_padding_is_the_pad_colour() {
    let p = pipeline(|c| {
        (c.width, c.height) = (4, 4);
        c.mean = [0.5; 3];
        c.std = [0.5; 3];
        c.pad_color = [255, 0, 0];
        c.filter = ResizeFilter::Nearest;
    });
    // A 4×2 image of pure green: rows 1–2 of the output, padding red above and below.
    let green = DynamicImage::ImageRgb8(image::RgbImage::from_pixel(4, 2, image::Rgb([0, 255, 0])));
    let t = p.process_one(&ImageInput::bytes("green.png", png(green))).unwrap();
    assert_eq!(t.shape(), [1, 3, 4, 4]);
    let v = t.to_vec::<f32>().unwrap();
    let at = |c: usize, y: usize, x: usize| v[c * 16 + y * 4 + x];
    assert_eq!((at(0, 0, 0), at(1, 0, 0)), (1.0, -1.0), "pad: red");
    assert_eq!((at(0, 1, 2), at(1, 1, 2), at(2, 2, 3)), (-1.0, 1.0, -1.0), "image: green");
    assert_eq!(at(1, 3, 0), -1.0);
}

#[test]
fn alpha_is_composited_on_the_pad_colour_and_16_bit_is_scaled() {
    let p = pipeline(|c| {
        (c.width, c.height, c.dtype, c.pad_color) = (2, 2, DType::U8, [0, 0, 200]);
    });
    let half_white = image::RgbaImage::from_pixel(2, 2, image::Rgba([255, 255, 255, 128]));
    let t = p.process_one(&ImageInput::bytes("a.png", png(DynamicImage::ImageRgba8(half_white)))).unwrap();
    // 255·128/255 + 200·127/255 ≈ 228 in blue; 128 in red and green.
    assert_eq!(t.bytes()[0], 128);
    assert_eq!(t.bytes()[8], 228);
    let white16 = image::ImageBuffer::<image::Luma<u16>, _>::from_pixel(2, 2, image::Luma([65535u16]));
    let t = p.process_one(&ImageInput::bytes("w.png", png(DynamicImage::ImageLuma16(white16)))).unwrap();
    assert!(t.bytes().iter().all(|&b| b == 255));
}

/// PNG's chunk checksum (CRC-32, IEEE), bit by bit.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

#[test]
fn bad_inputs_fail_alone_with_the_file_named() {
    let p = pipeline(|c| c.max_pixels = 1_000_000);
    let good = png(DynamicImage::new_rgb8(8, 8));
    let mut truncated = png(DynamicImage::ImageRgb8(image::RgbImage::from_fn(64, 64, |x, y| {
        image::Rgb([x as u8, y as u8, (x * y) as u8])
    })));
    truncated.truncate(truncated.len() / 2);
    // A PNG header claiming 50 000 × 50 000: refused from the header.
    let mut bomb = png(DynamicImage::new_rgb8(1, 1));
    bomb[16..20].copy_from_slice(&50_000u32.to_be_bytes());
    bomb[20..24].copy_from_slice(&50_000u32.to_be_bytes());
    let crc = crc32(&bomb[12..29]);
    bomb[29..33].copy_from_slice(&crc.to_be_bytes());
    let inputs = [
        ImageInput::bytes("good.png", good.clone()),
        ImageInput::bytes("empty.png", Vec::new()),
        ImageInput::bytes("notes.txt", b"just some text, not an image".to_vec()),
        ImageInput::bytes("half.png", truncated),
        ImageInput::bytes("bomb.png", bomb),
        ImageInput::bytes("icon.ico", b"\x00\x00\x01\x00\x01\x00\x10\x10\x00\x00\x01\x00\x20\x00".to_vec()),
        ImageInput::bytes("good2.png", good),
    ];
    let batch = p.process(&inputs).unwrap();
    assert_eq!(batch.tensor.shape()[0], 2);
    assert_eq!(batch.rows[0].as_ref().unwrap(), &0);
    assert_eq!(batch.rows[6].as_ref().unwrap(), &1);
    let msg = |i: usize| batch.rows[i].as_ref().unwrap_err().to_string();
    assert!(msg(1).contains("empty.png") && msg(1).contains("empty"), "{}", msg(1));
    assert!(msg(2).contains("notes.txt") && msg(2).contains("JPEG, PNG"), "{}", msg(2));
    assert!(msg(3).contains("half.png") && msg(3).contains("truncated or corrupt"), "{}", msg(3));
    assert!(
        msg(4).contains("bomb.png") && msg(4).contains("50000×50000") && msg(4).contains("max_pixels"),
        "{}",
        msg(4)
    );
    assert!(msg(5).contains("icon.ico") && msg(5).contains("not supported"), "{}", msg(5));
}

#[test]
fn every_accepted_format_decodes_to_the_same_pixels() {
    let p = pipeline(|c| (c.width, c.height, c.dtype, c.filter) = (6, 4, DType::U8, ResizeFilter::Nearest));
    let source = image::RgbImage::from_fn(6, 4, |x, y| image::Rgb([x as u8 * 40, y as u8 * 60, 200]));
    let expected =
        p.process_one(&ImageInput::bytes("png", png(DynamicImage::ImageRgb8(source.clone())))).unwrap();
    for format in [ImageFormat::Bmp, ImageFormat::Gif, ImageFormat::Tiff, ImageFormat::WebP] {
        let mut bytes = Vec::new();
        let image = if format == ImageFormat::Gif {
            DynamicImage::ImageRgba8(DynamicImage::ImageRgb8(source.clone()).into_rgba8())
        } else {
            DynamicImage::ImageRgb8(source.clone())
        };
        image.write_to(&mut Cursor::new(&mut bytes), format).unwrap();
        let t = p.process_one(&ImageInput::bytes(format!("{format:?}"), bytes)).unwrap();
        // GIF quantises to a palette; the others are lossless here.
        let tolerance = if format == ImageFormat::Gif { 16 } else { 0 };
        let worst = t.bytes().iter().zip(expected.bytes()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        assert!(worst <= tolerance, "{format:?}: off by {worst}");
    }
}

#[test]
fn the_cache_answers_a_repeated_image() {
    let p = ImagePipeline::new(&PreprocessConfig { threads: 1, ..Default::default() }).unwrap();
    let img = png(DynamicImage::ImageRgb8(image::RgbImage::from_fn(30, 20, |x, y| {
        image::Rgb([x as u8, y as u8, 7])
    })));
    let a = p.process_one(&ImageInput::bytes("a", img.clone())).unwrap();
    let b = p.process_one(&ImageInput::bytes("b", img)).unwrap();
    assert_eq!(a, b);
    p.cache.as_ref().unwrap().run_pending_tasks();
    assert_eq!(p.cache.as_ref().unwrap().entry_count(), 1);
}

#[test]
fn npy_header_is_aligned_and_describes_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tensor::from_vec(vec![2, 3], vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    write_npy(&dir.path().join("x.npy"), &t).unwrap();
    let bytes = std::fs::read(dir.path().join("x.npy")).unwrap();
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    assert_eq!((10 + header_len) % 64, 0);
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
    assert!(header.contains("'descr': '<f4'") && header.contains("'shape': (2, 3)"), "{header}");
    assert_eq!(bytes.len(), 10 + header_len + 24);
}

#[test]
fn read_npy_gives_back_what_write_npy_wrote_and_refuses_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.npy");
    for t in [
        Tensor::from_vec(vec![2, 3], vec![1.0f32, -2.0, 3.5, 4.0, 5.0, 6.0]).unwrap(),
        Tensor::from_vec(vec![4], vec![1i64, 2, 3, -4]).unwrap(),
        Tensor::from_vec(vec![1, 2, 2], vec![0u8, 255, 7, 9]).unwrap(),
    ] {
        write_npy(&path, &t).unwrap();
        assert_eq!(read_npy(&path).unwrap(), t);
    }
    let good = std::fs::read(&path).unwrap();
    for n in 0..good.len() {
        std::fs::write(&path, &good[..n]).unwrap();
        let e = read_npy(&path).unwrap_err().to_string();
        assert!(e.contains("not a .npy file kiln reads"), "{n}: {e}");
    }
    let mut fortran = good.clone();
    let at = fortran.windows(5).position(|w| w == b"False").unwrap();
    fortran[at..at + 5].copy_from_slice(b"True ");
    std::fs::write(&path, &fortran).unwrap();
    assert!(read_npy(&path).unwrap_err().to_string().contains("C order"));
}
