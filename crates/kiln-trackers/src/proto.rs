//! Just enough protobuf encoding for TensorBoard events and W&B records: both formats
//! are a handful of messages, so a dozen lines beat a code generator in the build.

/// A message being encoded.
#[derive(Default)]
pub(crate) struct Message(pub Vec<u8>);

impl Message {
    pub fn new() -> Self {
        Message(Vec::new())
    }

    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn key(&mut self, field: u32, wire: u8) {
        self.varint(u64::from(field) << 3 | u64::from(wire));
    }

    /// int32/int64/enum/bool field (negative values as ten-byte varints, as protobuf does).
    pub fn int(mut self, field: u32, v: i64) -> Self {
        self.key(field, 0);
        self.varint(v as u64);
        self
    }

    pub fn double(mut self, field: u32, v: f64) -> Self {
        self.key(field, 1);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn float(mut self, field: u32, v: f32) -> Self {
        self.key(field, 5);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn bytes(mut self, field: u32, v: &[u8]) -> Self {
        self.key(field, 2);
        self.varint(v.len() as u64);
        self.0.extend_from_slice(v);
        self
    }

    pub fn string(self, field: u32, v: &str) -> Self {
        self.bytes(field, v.as_bytes())
    }

    pub fn message(self, field: u32, m: Message) -> Self {
        self.bytes(field, &m.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_protobuf() {
        // Known encodings from the protobuf documentation: field 1 = 150 -> 08 96 01;
        // field 2 = "testing" -> 12 07 74 65 73 74 69 6e 67.
        assert_eq!(Message::new().int(1, 150).0, [0x08, 0x96, 0x01]);
        assert_eq!(Message::new().string(2, "testing").0, b"\x12\x07testing");
        assert_eq!(Message::new().int(1, -1).0.len(), 11);
        assert_eq!(Message::new().float(2, 1.0).0, [0x15, 0, 0, 0x80, 0x3f]);
    }
}
