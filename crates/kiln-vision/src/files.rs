//! Image files in, `.npy` out: folders expanded to their images, and the batch written
//! as NumPy reads it.

use std::path::{Path, PathBuf};

use kiln_core::{DType, Error, Result, Tensor};

use crate::IMAGE_EXTENSIONS;

/// The image files of `paths`: files as given, folders expanded to the files in them
/// with an image extension (sorted, not recursive). A folder with none is an error.
pub fn expand_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for path in paths {
        if !path.is_dir() {
            out.push(path.clone());
            continue;
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io("listing", path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && has_image_extension(p))
            .collect();
        if found.is_empty() {
            return Err(Error::InvalidInput(format!(
                "folder {} holds no images (looked for files ending in .{})",
                path.display(),
                IMAGE_EXTENSIONS.join(", .")
            )));
        }
        found.sort();
        out.extend(found);
    }
    Ok(out)
}

/// Whether `path` ends in one of [`IMAGE_EXTENSIONS`] (any case).
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// Writes `tensor` as a NumPy `.npy` file (C order; format 1.0, or 2.0 when the header
/// needs more than 64 KiB).
pub fn write_npy(path: &Path, tensor: &Tensor) -> Result<()> {
    let descr = match tensor.dtype() {
        DType::F32 => "<f4",
        DType::F16 => "<f2",
        DType::U8 => "|u1",
        DType::I64 => "<i8",
        DType::I32 => "<i4",
        other => return Err(Error::Unsupported(format!("no .npy type for {other}"))),
    };
    let shape: Vec<String> = tensor.shape().iter().map(|d| d.to_string()).collect();
    let shape = if shape.len() == 1 { format!("({},)", shape[0]) } else { format!("({})", shape.join(", ")) };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6) + version (2) + header length + header, padded with spaces to a multiple
    // of 64 and ended by a newline. Version 1.0 has a 2-byte length; a header that does
    // not fit (a tensor of thousands of dims) takes version 2.0's 4 bytes, as NumPy does.
    let fits_v1 = 10 + header.len() + 64 <= usize::from(u16::MAX);
    let prefix = if fits_v1 { 10 } else { 12 };
    let total = prefix + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(prefix + header.len() + tensor.bytes().len());
    if fits_v1 {
        out.extend_from_slice(b"\x93NUMPY\x01\x00");
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    } else {
        out.extend_from_slice(b"\x93NUMPY\x02\x00");
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(tensor.bytes());
    std::fs::write(path, out).map_err(|e| Error::io("writing", path, e))
}

/// Reads a NumPy `.npy` file of the dtypes [`write_npy`] writes (little-endian, C order,
/// format 1.0 or 2.0) as a tensor. Anything else — another dtype, Fortran order, a cut
/// or foreign file — is an error naming the file, never a panic.
pub fn read_npy(path: &Path) -> Result<Tensor> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("reading", path, e))?;
    let bad =
        |what: &str| Error::InvalidInput(format!("{} is not a .npy file kiln reads: {what}", path.display()));
    let (header_len, start): (Option<usize>, usize) = match bytes.get(..8) {
        Some(b"\x93NUMPY\x01\x00") => {
            (bytes.get(8..10).map(|b| usize::from(u16::from_le_bytes([b[0], b[1]]))), 10)
        }
        Some(b"\x93NUMPY\x02\x00") => {
            (bytes.get(8..12).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize), 12)
        }
        _ => return Err(bad("no \\x93NUMPY magic of version 1.0 or 2.0")),
    };
    let header = header_len
        .and_then(|n| bytes.get(start..start.checked_add(n)?))
        .ok_or_else(|| bad("the header is cut"))?;
    let header = std::str::from_utf8(header).map_err(|_| bad("the header is not text"))?;
    let field = |key: &str| header.split(&format!("'{key}':")).nth(1).map(str::trim_start);
    let dtype = match field("descr").and_then(|v| v.strip_prefix('\'')).and_then(|v| v.split('\'').next()) {
        Some("<f4") => DType::F32,
        Some("<f2") => DType::F16,
        Some("|u1") => DType::U8,
        Some("<i8") => DType::I64,
        Some("<i4") => DType::I32,
        other => return Err(bad(&format!("dtype {other:?}; kiln reads <f4, <f2, |u1, <i8, <i4"))),
    };
    if !field("fortran_order").is_some_and(|v| v.starts_with("False")) {
        return Err(bad("not in C order"));
    }
    let dims = field("shape")
        .and_then(|v| v.strip_prefix('('))
        .and_then(|v| v.split(')').next())
        .ok_or_else(|| bad("no shape"))?;
    let shape = dims
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| d.parse::<usize>().map_err(|_| bad(&format!("shape dim {d:?}"))))
        .collect::<Result<Vec<_>>>()?;
    Tensor::from_bytes(dtype, shape, bytes[start + header.len()..].to_vec()).map_err(|e| bad(&e.to_string()))
}
