//! Buffers that start on a 64-byte boundary, for what AMX tiles load: a tile row is 64
//! bytes, and from a buffer at the allocator's 16-byte alignment every row crossed two
//! cache lines — bf16 products ran at 0.55× the rate (1 050 against 1 920 GFLOP/s, 294 ×
//! 2048 × 5120 on 2 cores, depending on where the allocator happened to put the rows).

use std::marker::PhantomData;

/// Element types an [`Aligned`] buffer holds: plain numbers, for which all-zero bytes
/// are the value zero and every bit pattern is valid.
pub(crate) trait Plain: Copy + Default + 'static {}
impl Plain for u8 {}
impl Plain for i8 {}
impl Plain for u16 {}
impl Plain for f32 {}

/// `len` values of `T` starting on a 64-byte boundary; dereferences to them and grows
/// with zeros (as `Vec::resize`).
pub(crate) struct Aligned<T> {
    lines: Vec<Line>,
    len: usize,
    kind: PhantomData<T>,
}

/// 64 bytes, so a `Vec` of them is 64-byte aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

impl<T: Plain> Aligned<T> {
    /// No values.
    pub(crate) const fn new() -> Self {
        Aligned { lines: Vec::new(), len: 0, kind: PhantomData }
    }

    /// `len` values: those kept keep theirs, new ones are zero.
    pub(crate) fn resize(&mut self, len: usize) {
        let old = self.len;
        self.lines.resize((len * size_of::<T>()).div_ceil(64), Line([0; 64]));
        self.len = len;
        if len > old {
            self[old..].fill(T::default());
        }
    }

    /// `len` values, each holding whatever the buffer last held there (zero where it
    /// never held a value), with no pass over them: for buffers whose every read value
    /// the caller writes first. An int8 run's quantized rows alternate between widths,
    /// and zeroing them on every call was 3 % of it in memset.
    pub(crate) fn resize_any(&mut self, len: usize) {
        let lines = (len * size_of::<T>()).div_ceil(64);
        if lines > self.lines.len() {
            self.lines.resize(lines, Line([0; 64]));
        }
        self.len = len;
    }

    /// `parts` one after another in one buffer (packed layers joined side by side).
    pub(crate) fn joined<'a>(parts: impl IntoIterator<Item = &'a [T]>) -> Self {
        let parts: Vec<&[T]> = parts.into_iter().collect();
        let mut all = Self::new();
        all.resize_any(parts.iter().map(|p| p.len()).sum());
        let mut at = 0;
        for part in parts {
            all[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        all
    }
}

impl<T: Plain> Default for Aligned<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Plain> std::ops::Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `lines` holds at least `len` values' bytes (`resize`), contiguous and
        // initialised (zeros are a valid `T`: `Plain`); `T` needs less alignment than
        // `Line`.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
    }
}

impl<T: Plain> std::ops::DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as `deref`, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.len) }
    }
}
