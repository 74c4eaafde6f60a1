//! Readers for the formats kiln writes, written from the formats' specifications so
//! the fuzz targets can check kiln's output independently of kiln's writers.

/// A protobuf field as it appears on the wire.
#[derive(Debug, Clone, PartialEq)]
pub enum Field<'a> {
    /// Wire type 0.
    Varint(u32, u64),
    /// Wire type 1.
    Fixed64(u32, u64),
    /// Wire type 2: bytes, a string or a nested message.
    Bytes(u32, &'a [u8]),
    /// Wire type 5.
    Fixed32(u32, u32),
}

fn varint(data: &[u8], at: &mut usize) -> Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *data.get(*at).ok_or("varint runs past the end")?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("varint longer than 10 bytes".into())
}

/// Splits a protobuf message into its fields; an error says where it stops making sense.
pub fn fields(data: &[u8]) -> Result<Vec<Field<'_>>, String> {
    let mut at = 0;
    let mut out = Vec::new();
    while at < data.len() {
        let key = varint(data, &mut at)?;
        let number = u32::try_from(key >> 3).map_err(|_| format!("field number {} too large", key >> 3))?;
        if number == 0 {
            return Err(format!("field number 0 at byte {at}"));
        }
        let field = match key & 7 {
            0 => Field::Varint(number, varint(data, &mut at)?),
            1 => {
                let bytes = data.get(at..at + 8).ok_or("fixed64 runs past the end")?;
                at += 8;
                Field::Fixed64(number, u64::from_le_bytes(bytes.try_into().unwrap_or_default()))
            }
            2 => {
                let len = usize::try_from(varint(data, &mut at)?).map_err(|_| "length too large")?;
                let bytes =
                    data.get(at..at.checked_add(len).ok_or("length overflows")?).ok_or_else(|| {
                        format!("field {number}: {len} bytes announced, {} left", data.len() - at)
                    })?;
                at += len;
                Field::Bytes(number, bytes)
            }
            5 => {
                let bytes = data.get(at..at + 4).ok_or("fixed32 runs past the end")?;
                at += 4;
                Field::Fixed32(number, u32::from_le_bytes(bytes.try_into().unwrap_or_default()))
            }
            other => return Err(format!("wire type {other} (groups or invalid) at byte {at}")),
        };
        out.push(field);
    }
    Ok(out)
}

const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

fn masked_crc32c(data: &[u8]) -> u32 {
    CRC32C.checksum(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// The records of a TFRecord file, each checked against both of its CRCs.
pub fn tfrecords(file: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut at = 0;
    let mut out = Vec::new();
    while at < file.len() {
        let head = file.get(at..at + 12).ok_or_else(|| format!("record {} header cut short", out.len()))?;
        let len_bytes = &head[..8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap_or_default());
        let len_crc = u32::from_le_bytes(head[8..12].try_into().unwrap_or_default());
        if len_crc != masked_crc32c(len_bytes) {
            return Err(format!("record {}: length CRC mismatch", out.len()));
        }
        let len = usize::try_from(len).map_err(|_| "record length too large")?;
        let start = at + 12;
        let data = file
            .get(start..start.checked_add(len).ok_or("length overflows")?)
            .ok_or_else(|| format!("record {}: {len} bytes announced, file ends first", out.len()))?;
        let crc = file.get(start + len..start + len + 4).ok_or("data CRC cut short")?;
        if u32::from_le_bytes(crc.try_into().unwrap_or_default()) != masked_crc32c(data) {
            return Err(format!("record {}: data CRC mismatch", out.len()));
        }
        out.push(data);
        at = start + len + 4;
    }
    Ok(out)
}

/// The records of a W&B `.wandb` log (LevelDB log framing after a 7-byte header),
/// reassembled from their pieces with every piece's CRC checked.
pub fn wandb_records(file: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    const BLOCK: usize = 32 * 1024;
    let header = file.get(..7).ok_or("shorter than the 7-byte header")?;
    if &header[..4] != b":W&B" || header[4..6] != 0xBEE1u16.to_le_bytes() || header[6] != 0 {
        return Err(format!("bad header {header:?}"));
    }
    let mut at = 7;
    let mut out = Vec::new();
    let mut partial: Option<Vec<u8>> = None;
    while at < file.len() {
        let left_in_block = BLOCK - at % BLOCK;
        if left_in_block < 7 {
            if file[at..(at + left_in_block).min(file.len())].iter().any(|&b| b != 0) {
                return Err(format!("block trailer at {at} is not zeros"));
            }
            at += left_in_block;
            continue;
        }
        let head = file.get(at..at + 7).ok_or_else(|| format!("piece header at {at} cut short"))?;
        let crc = u32::from_le_bytes(head[..4].try_into().unwrap_or_default());
        let len = usize::from(u16::from_le_bytes([head[4], head[5]]));
        let kind = head[6];
        if 7 + len > left_in_block {
            return Err(format!("piece at {at} crosses a block boundary"));
        }
        let piece = file.get(at + 7..at + 7 + len).ok_or_else(|| format!("piece at {at} cut short"))?;
        let mut digest = CRC32.digest();
        digest.update(&[kind]);
        digest.update(piece);
        if digest.finalize() != crc {
            return Err(format!("piece at {at}: CRC mismatch"));
        }
        match (kind, partial.take()) {
            (1, None) => out.push(piece.to_vec()),
            (2, None) => partial = Some(piece.to_vec()),
            (3, Some(mut p)) => {
                p.extend_from_slice(piece);
                partial = Some(p);
            }
            (4, Some(mut p)) => {
                p.extend_from_slice(piece);
                out.push(p);
            }
            (kind, p) => {
                return Err(format!(
                    "piece kind {kind} at {at} after {}",
                    if p.is_some() { "a first piece" } else { "a whole record" }
                ));
            }
        }
        at += 7 + len;
    }
    if partial.is_some() {
        return Err("the log ends inside a record".into());
    }
    Ok(out)
}

/// What a `.npy` header says, and the data after it.
#[derive(Debug, Clone, PartialEq)]
pub struct Npy<'a> {
    /// `descr`, e.g. `<f4`.
    pub descr: String,
    /// `fortran_order`.
    pub fortran_order: bool,
    /// `shape`.
    pub shape: Vec<usize>,
    /// Everything after the header.
    pub data: &'a [u8],
}

/// Parses a `.npy` file of format version 1.0, 2.0 or 3.0 as NumPy's `format.py`
/// describes it (the header is a Python dict literal; only the forms NumPy writes are
/// accepted).
pub fn npy(file: &[u8]) -> Result<Npy<'_>, String> {
    if file.get(..6) != Some(b"\x93NUMPY") {
        return Err("no \\x93NUMPY magic".into());
    }
    let (header_len, start) = match file.get(6..8) {
        Some([1, 0]) => (usize::from(u16::from_le_bytes([file[8], file[9]])), 10),
        Some([2 | 3, 0]) => {
            let len = file.get(8..12).ok_or("header length cut short")?;
            (u32::from_le_bytes(len.try_into().unwrap_or_default()) as usize, 12)
        }
        other => return Err(format!("unknown version {other:?}")),
    };
    if (start + header_len) % 64 != 0 {
        return Err(format!("data starts at {}, not a multiple of 64", start + header_len));
    }
    let header = file.get(start..start + header_len).ok_or("header cut short")?;
    let header = std::str::from_utf8(header).map_err(|_| "header is not UTF-8")?;
    if !header.ends_with('\n') {
        return Err("header does not end with a newline".into());
    }
    let dict = header
        .trim_end()
        .strip_prefix('{')
        .and_then(|h| h.strip_suffix('}'))
        .ok_or("header is not a dict")?;
    let value = |key: &str| -> Result<&str, String> {
        let at = dict.find(&format!("'{key}': ")).ok_or_else(|| format!("no '{key}'"))?;
        Ok(&dict[at + key.len() + 4..])
    };
    let descr = value("descr")?;
    let descr = descr.strip_prefix('\'').and_then(|d| d.split('\'').next()).ok_or("descr is not a string")?;
    let fortran_order = match value("fortran_order")? {
        v if v.starts_with("False") => false,
        v if v.starts_with("True") => true,
        _ => return Err("fortran_order is not a bool".into()),
    };
    let shape = value("shape")?;
    let shape = shape.strip_prefix('(').and_then(|s| s.split(')').next()).ok_or("shape is not a tuple")?;
    let dims: Vec<&str> = shape.split(',').map(str::trim).collect();
    let shape = match dims.as_slice() {
        [""] => Vec::new(),
        [one, ""] => vec![one.parse().map_err(|_| format!("bad dim {one:?}"))?],
        many if many.len() > 1 && many.iter().all(|d| !d.is_empty()) => {
            many.iter().map(|d| d.parse().map_err(|_| format!("bad dim {d:?}"))).collect::<Result<_, _>>()?
        }
        _ => return Err(format!("malformed shape ({shape})")),
    };
    Ok(Npy { descr: descr.to_string(), fortran_order, shape, data: &file[start + header_len..] })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_format_readers_refuse_what_they_should() {
        // A record whose data CRC is off by one bit.
        let mut record = Vec::new();
        record.extend_from_slice(&3u64.to_le_bytes());
        let crc = |d: &[u8]| masked_crc32c(d);
        record.extend_from_slice(&crc(&3u64.to_le_bytes()).to_le_bytes());
        record.extend_from_slice(b"abc");
        record.extend_from_slice(&(crc(b"abc") ^ 1).to_le_bytes());
        assert!(tfrecords(&record).unwrap_err().contains("data CRC"));
        assert!(fields(&[0x0a, 0x05, 1]).unwrap_err().contains("5 bytes announced"));
        assert!(npy(b"\x93NUMPY\x01\x00\x02\x00{}").is_err());
        assert!(wandb_records(b":W&B\xe1\xbe\x00\x00\x00").is_err());
    }
}
