//! How a quantized linear layer's `rows x outputs` results are split into kernel calls,
//! shared by the int8 kernel (`int8.rs`) and the GGML block kernels (`blocks.rs`).
//!
//! Many rows (a prompt, a batch of texts): each thread takes whole tiles of rows and
//! every column, so a weight tile read from memory serves all the tile's rows. Few rows
//! (decoding a handful of sequences): the threads split the columns instead, each into
//! its own buffer, so one row still uses every core.

use rayon::prelude::*;

/// Columns per packed block (one 512-bit vector of f32 or i32 results).
pub(crate) const BLOCK: usize = 16;

/// Up to this many rows the threads split the columns: each part's weights (a few tens
/// of KB) stay in L2 while every row passes over them, so a decoding step of many
/// sequences reads the weights from memory once. Split by rows, 16 sequences' step read
/// them once per 4-row tile (decoding is bound by the weights' bytes: 16 streams went
/// 488 → 514 tokens/s).
const FEW_ROWS: usize = 64;

/// One kernel call: rows `row0..row0 + rows` times column blocks `first..first +
/// blocks`, written at `out[(row - row0) * stride + column - col0]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Call {
    pub(crate) row0: usize,
    pub(crate) rows: usize,
    pub(crate) first: usize,
    pub(crate) blocks: usize,
    pub(crate) stride: usize,
    pub(crate) col0: usize,
}

/// Resizes `out` to `rows x outputs` and fills it through `kernel`, called with tiles of
/// at most `tile_rows` rows and `tile_blocks` column blocks. Every element of `out` is
/// written (the caller's buffer is reused, never cleared).
pub(crate) fn run(
    rows: usize,
    outputs: usize,
    tile_rows: usize,
    tile_blocks: usize,
    out: &mut Vec<f32>,
    kernel: impl Fn(Call, &mut [f32]) + Sync,
) {
    debug_assert!(outputs.is_multiple_of(BLOCK));
    let n = outputs;
    out.truncate(rows * n);
    out.resize(rows * n, 0.0);
    let blocks = n / BLOCK;
    if rows == 0 || blocks == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    if rows <= FEW_ROWS && blocks >= 2 * threads {
        let per = blocks.div_ceil(threads * 4).max(1);
        let parts: Vec<(usize, Vec<f32>)> = (0..blocks)
            .step_by(per)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|first| {
                let width = per.min(blocks - first) * BLOCK;
                let end = first + width / BLOCK;
                let mut part = vec![0f32; rows * width];
                for (tile, part) in part.chunks_mut(tile_rows * width).enumerate() {
                    for tile_first in (first..end).step_by(tile_blocks) {
                        let call = Call {
                            row0: tile * tile_rows,
                            rows: part.len() / width,
                            first: tile_first,
                            blocks: tile_blocks.min(end - tile_first),
                            stride: width,
                            col0: first * BLOCK,
                        };
                        kernel(call, part);
                    }
                }
                (first, part)
            })
            .collect();
        for (first, part) in parts {
            let width = part.len() / rows;
            for (row, src) in out.chunks_mut(n).zip(part.chunks(width)) {
                row[first * BLOCK..first * BLOCK + width].copy_from_slice(src);
            }
        }
        return;
    }
    out.par_chunks_mut(tile_rows * n).enumerate().for_each(|(tile, out)| {
        for first in (0..blocks).step_by(tile_blocks) {
            let call = Call {
                row0: tile * tile_rows,
                rows: out.len() / n,
                first,
                blocks: tile_blocks.min(blocks - first),
                stride: n,
                col0: 0,
            };
            kernel(call, out);
        }
    });
}
