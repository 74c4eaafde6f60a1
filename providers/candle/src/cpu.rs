//! BERT in f32 on the CPU, written for the CPU: the provider's path for `device = "cpu"`,
//! `dtype = "f32"`.
//!
//! # Why not candle's graph
//!
//! perf on candle-transformers' `BertModel` (issue 13) put the cost in what a general
//! tensor graph does per op: a new buffer for every intermediate, exact erf GELU one
//! scalar `erf` at a time, attention as batched matmuls over padded `[B, H, T, T]`
//! scores plus separate mask, softmax and transpose passes, and every token of padding
//! carried through every layer. Here:
//!
//! - **Padding is never computed.** The real tokens of a batch (attention mask 1) are
//!   packed into one `[tokens, hidden]` matrix; every dense layer is one GEMM over it,
//!   and attention runs per text over that text's tokens only. A batch costs what its
//!   tokens cost, however unequal its texts.
//! - **Fused passes.** Q, K and V are one GEMM; a bias is added by the GEMM (the output
//!   starts as the bias); residual + LayerNorm is one pass; attention is, per text and
//!   head, two GEMMs on strided views of the QKV matrix with the softmax between them,
//!   in a scratch buffer per thread.
//! - **Vector kernels.** GELU (erf by Abramowitz–Stegun 7.1.26, |error| < 1e-6 in f32),
//!   exp, softmax and LayerNorm are written so the compiler vectorises them, and built
//!   three times: for AVX-512, AVX2+FMA and the baseline, chosen at run time.
//! - Matrix products are the `gemm` crate's (the kernels candle itself calls), threaded
//!   with rayon; attention spreads its (text, head) pairs over rayon's threads.
//!
//! Results match candle's graph and sentence-transformers to cosine ≥ 0.9999 (the
//! provider's reference tests). Position ids are a token's index in its row, as in
//! Hugging Face's `BertModel` whatever the mask, so left padding works too. Padded
//! positions of `last_hidden_state` are zeros (Hugging Face computes values there that
//! no pooling reads).

use candle_nn::VarBuilder;
use candle_transformers::models::bert::{Config as BertConfig, HiddenAct, PositionEmbeddingType};
use kiln_core::{EmbeddingHead, Error, Result, pool_rows};
use rayon::prelude::*;

/// Why the CPU path does not take a config (the provider then runs candle's graph).
pub(crate) fn unsupported(config: &BertConfig) -> Option<&'static str> {
    if !matches!(config.hidden_act, HiddenAct::Gelu) {
        return Some("hidden_act other than exact gelu");
    }
    if !matches!(config.position_embedding_type, PositionEmbeddingType::Absolute) {
        return Some("position_embedding_type other than absolute");
    }
    if config.num_attention_heads == 0 || !config.hidden_size.is_multiple_of(config.num_attention_heads) {
        return Some("hidden_size not a multiple of num_attention_heads");
    }
    None
}

/// A linear layer: `y = x W^T + b`, with `W^T` stored `[inputs, outputs]` row-major.
pub(crate) struct Dense {
    pub(crate) weight_t: Vec<f32>,
    pub(crate) bias: Vec<f32>,
    pub(crate) inputs: usize,
    pub(crate) outputs: usize,
}

struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

/// What the encoder's linear layers compute in; embeddings, LayerNorms, GELU, softmax
/// and attention stay f32 in every case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Precision {
    /// f32 weights and activations (`gemm`).
    F32,
    /// bf16 weights and activations, f32 sums (`model.dtype = "bf16"`; `bf16.rs`).
    Bf16,
    /// int8 weights and activations, i32 sums (`model.quantization = "int8"`; `int8.rs`).
    Int8,
}

/// A linear layer in f32, bf16 or int8 (see [`Precision`]).
enum Linear {
    F32(Dense),
    Bf16(bf16::Bf16Dense),
    Int8(int8::QDense),
}

impl Linear {
    fn new(dense: Dense, precision: Precision) -> Self {
        match precision {
            Precision::Int8 if let Some(q) = int8::QDense::quantize(&dense) => Linear::Int8(q),
            Precision::Bf16 => Linear::Bf16(bf16::Bf16Dense::from_dense(&dense)),
            _ => Linear::F32(dense),
        }
    }

    fn forward(&self, x: &[f32], tokens: usize, out: &mut Vec<f32>) {
        match self {
            Linear::F32(dense) => linear(x, tokens, dense, out),
            Linear::Bf16(layer) => {
                // Every element is written: grown or shrunk, never cleared.
                out.resize(tokens * layer.outputs(), 0.0);
                layer.forward(x, tokens, bf16::Sink::F32(out))
            }
            Linear::Int8(q) => q.forward(x, tokens, out),
        }
    }
}

struct Layer {
    qkv: Linear,
    attention_out: Linear,
    attention_norm: Norm,
    up: Linear,
    down: Linear,
    output_norm: Norm,
}

/// BERT weights laid out for the kernels below.
pub(crate) struct CpuBert {
    hidden: usize,
    /// Attention on AMX tiles in bf16 (`model.dtype = "bf16"` where AMX runs).
    tile_attention: bool,
    heads: usize,
    eps: f32,
    vocab: usize,
    positions: usize,
    types: usize,
    word: Vec<f32>,
    position: Vec<f32>,
    token_type: Vec<f32>,
    embedding_norm: Norm,
    layers: Vec<Layer>,
}

fn vector(vb: &VarBuilder, shape: &[usize], name: &str) -> candle_core::Result<Vec<f32>> {
    vb.get(shape, name)?.flatten_all()?.to_vec1::<f32>()
}

fn dense(vb: &VarBuilder, inputs: usize, outputs: usize) -> candle_core::Result<Dense> {
    Ok(Dense {
        weight_t: vb.get((outputs, inputs), "weight")?.t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()?,
        bias: vector(vb, &[outputs], "bias")?,
        inputs,
        outputs,
    })
}

/// Q, K and V as one layer of `3 * hidden` outputs: columns `[q | k | v]`.
fn qkv(q: Dense, k: Dense, v: Dense) -> Dense {
    let hidden = q.inputs;
    let mut weight_t = Vec::with_capacity(hidden * 3 * hidden);
    for row in 0..hidden {
        for part in [&q, &k, &v] {
            weight_t.extend_from_slice(&part.weight_t[row * hidden..(row + 1) * hidden]);
        }
    }
    Dense { weight_t, bias: [q.bias, k.bias, v.bias].concat(), inputs: hidden, outputs: 3 * hidden }
}

fn norm(vb: &VarBuilder, hidden: usize) -> candle_core::Result<Norm> {
    Ok(Norm { gamma: vector(vb, &[hidden], "weight")?, beta: vector(vb, &[hidden], "bias")? })
}

impl CpuBert {
    /// Reads the weights from `vb` (an f32 CPU var builder at the model's root: bare
    /// names, or `bert.`-prefixed as task heads save them).
    /// The encoder's linear layers compute in `precision` (int8: those whose outputs are
    /// a multiple of 16); embeddings, LayerNorms and attention stay f32.
    pub(crate) fn load(
        vb: &VarBuilder,
        config: &BertConfig,
        precision: Precision,
    ) -> candle_core::Result<Self> {
        crate::weights::at_bert_root(vb, |vb| Self::load_at(vb, config, precision))
    }

    fn load_at(vb: &VarBuilder, config: &BertConfig, precision: Precision) -> candle_core::Result<Self> {
        let h = config.hidden_size;
        let e = vb.pp("embeddings");
        let layers = crate::weights::encoder_layers(vb, config, dense, norm)?
            .into_iter()
            .map(|l| Layer {
                qkv: Linear::new(qkv(l.query, l.key, l.value), precision),
                attention_out: Linear::new(l.attention_out, precision),
                attention_norm: l.attention_norm,
                up: Linear::new(l.up, precision),
                down: Linear::new(l.down, precision),
                output_norm: l.output_norm,
            })
            .collect();
        Ok(CpuBert {
            hidden: h,
            // int8 takes it too: its products are coarser than bf16's already.
            tile_attention: matches!(precision, Precision::Bf16 | Precision::Int8)
                && config.hidden_size.is_multiple_of(config.num_attention_heads)
                // The context goes out as bf16 rows of the output layer: whole tile rows.
                && config.hidden_size.is_multiple_of(32)
                && tile_attention::supported(config.hidden_size / config.num_attention_heads),
            heads: config.num_attention_heads,
            eps: config.layer_norm_eps as f32,
            vocab: config.vocab_size,
            positions: config.max_position_embeddings,
            types: config.type_vocab_size,
            word: vector(&e.pp("word_embeddings"), &[config.vocab_size, h], "weight")?,
            position: vector(&e.pp("position_embeddings"), &[config.max_position_embeddings, h], "weight")?,
            token_type: vector(&e.pp("token_type_embeddings"), &[config.type_vocab_size, h], "weight")?,
            embedding_norm: norm(&e.pp("LayerNorm"), h)?,
            layers,
        })
    }

    /// The encoder over the real tokens of a `[batch, sequence]` batch (row-major ids,
    /// token types and attention mask).
    pub(crate) fn forward(
        &self,
        ids: &[i64],
        types: &[i64],
        mask: &[i64],
        batch: usize,
        sequence: usize,
    ) -> Result<Packed> {
        let h = self.hidden;
        if sequence > self.positions {
            return Err(Error::InvalidInput(format!(
                "a sequence of {sequence} tokens is longer than the model's {} positions",
                self.positions
            )));
        }
        // Rows of packed tokens: (first packed index, tokens) per text, and each packed
        // token's place in the [batch, sequence] grid.
        let mut rows = Vec::with_capacity(batch);
        let mut places = Vec::with_capacity(ids.len());
        for b in 0..batch {
            let start = places.len();
            places.extend((b * sequence..(b + 1) * sequence).filter(|&i| mask[i] != 0));
            rows.push((start, places.len() - start));
        }
        let tokens = places.len();
        let mut x = vec![0f32; tokens * h];
        for (out, &i) in x.chunks_exact_mut(h).zip(&places) {
            let (id, kind, position) = (ids[i], types[i], i % sequence);
            let id = usize::try_from(id).ok().filter(|&id| id < self.vocab).ok_or_else(|| {
                Error::InvalidInput(format!("token id {id} is outside the vocabulary of {}", self.vocab))
            })?;
            let kind = usize::try_from(kind).ok().filter(|&k| k < self.types).ok_or_else(|| {
                Error::InvalidInput(format!("token type {kind} is outside the model's {} types", self.types))
            })?;
            let (w, p, t) = (
                &self.word[id * h..(id + 1) * h],
                &self.position[position * h..(position + 1) * h],
                &self.token_type[kind * h..(kind + 1) * h],
            );
            for j in 0..h {
                out[j] = w[j] + p[j] + t[j];
            }
        }
        let zeros = vec![0f32; tokens * h];
        add_norm_rows(&mut x, &zeros, &self.embedding_norm, self.eps);

        // The layers' intermediates, kept by the thread between batches: fresh buffers
        // of a batch's size (tens of MB) cost page faults on every batch, which perf
        // showed as the bf16 path's largest cost after the products.
        let mut s = SCRATCH.take();
        s.context.resize(tokens * h, 0.0); // every element written by attention
        // int8 layers on tiles pass their inputs on quantized: `s.xq` holds `x`'s rows
        // once the norm before has made them.
        let int8_tiles = self.tile_attention && int8::tiles_run(tokens);
        let mut xq_made = false;
        for (i, layer) in self.layers.iter().enumerate() {
            if int8_tiles && let Some(l) = layer.int8() {
                if !xq_made {
                    s.xq.quantize(&x, tokens, h);
                }
                let next_int8 = self.layers.get(i + 1).is_some_and(|next| next.int8().is_some());
                self.int8_layer(
                    l,
                    &layer.attention_norm,
                    &layer.output_norm,
                    &rows,
                    &mut x,
                    &mut s,
                    next_int8,
                );
                xq_made = next_int8;
                continue;
            }
            xq_made = false;
            match (&layer.qkv, &layer.attention_out) {
                // bf16 layers around tile attention: Q, K, V and the context stay bf16,
                // laid out as the next step reads them (no f32 copy, no rounding pass).
                (Linear::Bf16(qkv), Linear::Bf16(out)) if self.tile_attention => {
                    qkv.forward(&x, tokens, bf16::Sink::Bf16(&mut s.qkv_bits));
                    let context = tile_attention::Context::Rows(&mut s.context_rows);
                    tile_attention::attention(
                        tile_attention::Qkv::Bf16(&s.qkv_bits),
                        &rows,
                        h,
                        self.heads,
                        context,
                    );
                    s.attended.resize(tokens * h, 0.0); // every element written
                    out.run(&s.context_rows, tokens, bf16::Sink::F32(&mut s.attended));
                }
                // int8 layers on AMX: Q, K and V leave their tiles rounded to bf16, as
                // tile attention reads them.
                (Linear::Int8(qkv), _)
                    if self.tile_attention && qkv.forward_bf16(&x, tokens, &mut s.qkv_bits) =>
                {
                    let (qkv, context) = (
                        tile_attention::Qkv::Bf16(&s.qkv_bits),
                        tile_attention::Context::F32(&mut s.context),
                    );
                    tile_attention::attention(qkv, &rows, h, self.heads, context);
                    layer.attention_out.forward(&s.context, tokens, &mut s.attended);
                }
                _ => {
                    layer.qkv.forward(&x, tokens, &mut s.qkv);
                    if self.tile_attention {
                        let (qkv, context) =
                            (tile_attention::Qkv::F32(&s.qkv), tile_attention::Context::F32(&mut s.context));
                        tile_attention::attention(qkv, &rows, h, self.heads, context);
                    } else {
                        attention(&s.qkv, &rows, h, self.heads, &mut s.context);
                    }
                    layer.attention_out.forward(&s.context, tokens, &mut s.attended);
                }
            }
            add_norm_rows(&mut s.attended, &x, &layer.attention_norm, self.eps);
            feed_forward(
                &layer.up,
                &layer.down,
                &s.attended,
                tokens,
                (&mut s.up, &mut s.gelu_rows),
                &mut s.down,
            );
            add_norm_rows(&mut s.down, &s.attended, &layer.output_norm, self.eps);
            std::mem::swap(&mut x, &mut s.down);
        }
        SCRATCH.set(s);
        Ok(Packed { hidden: x, width: h, rows, places, batch, sequence })
    }
}

impl CpuBert {
    /// One layer whose four products are int8 on tiles, `x` its input (then its output)
    /// and `s.xq` `x` quantized. Each product's rows leave it normed and quantized for
    /// the next ([`int8::QDense::rows_then`]) — the feed-forward's first product's GELU
    /// rows for the second, each norm's rows for the product after it (the next layer's
    /// when `quantize_next`) — so no int8 output is read back from memory to be normed
    /// or quantized.
    #[allow(clippy::too_many_arguments)]
    fn int8_layer(
        &self,
        l: Int8Layer,
        attention_norm: &Norm,
        output_norm: &Norm,
        rows: &[(usize, usize)],
        x: &mut Vec<f32>,
        s: &mut Scratch,
        quantize_next: bool,
    ) {
        let (h, tokens, eps) = (self.hidden, x.len() / self.hidden, self.eps);
        let done = l.qkv.rows_bf16(&s.xq, &mut s.qkv_bits);
        debug_assert!(done, "int8_layer runs where tiles run");
        let context = tile_attention::Context::F32(&mut s.context);
        tile_attention::attention(tile_attention::Qkv::Bf16(&s.qkv_bits), rows, h, self.heads, context);
        s.cq.quantize(&s.context, tokens, h);
        let norm = norm_row(attention_norm, x, eps);
        l.attention_out.rows_then(&s.cq, false, Some(&norm), (&mut s.attended, true), Some(&mut s.aq));
        drop(norm);
        l.up.rows_then(&s.aq, true, None, (&mut s.up, false), Some(&mut s.hq));
        let norm = norm_row(output_norm, &s.attended, eps);
        let next = quantize_next.then_some(&mut s.xq);
        l.down.rows_then(&s.hq, false, Some(&norm), (&mut s.down, true), next);
        std::mem::swap(x, &mut s.down);
    }
}

/// `row = LayerNorm(row + residual's row r)`, for [`int8::QRows::quantize_after`].
fn norm_row<'a>(norm: &'a Norm, residual: &'a [f32], eps: f32) -> impl Fn(usize, &mut [f32]) + Sync + 'a {
    let w = norm.gamma.len();
    move |r, row| add_norm(row, &residual[r * w..(r + 1) * w], &norm.gamma, &norm.beta, eps)
}

/// A layer's four products when all are int8 ([`Layer::int8`]).
#[derive(Clone, Copy)]
struct Int8Layer<'a> {
    qkv: &'a int8::QDense,
    attention_out: &'a int8::QDense,
    up: &'a int8::QDense,
    down: &'a int8::QDense,
}

impl Layer {
    /// Its products, when all four are int8 and the feed-forward's two meet.
    fn int8(&self) -> Option<Int8Layer<'_>> {
        match (&self.qkv, &self.attention_out, &self.up, &self.down) {
            (Linear::Int8(qkv), Linear::Int8(attention_out), Linear::Int8(up), Linear::Int8(down))
                if up.outputs() == down.inputs() =>
            {
                Some(Int8Layer { qkv, attention_out, up, down })
            }
            _ => None,
        }
    }
}

/// [`CpuBert::forward`]'s intermediates.
#[derive(Default)]
struct Scratch {
    qkv: Vec<f32>,
    qkv_bits: bf16::Bits,
    context: Vec<f32>,
    context_rows: bf16::Bits,
    attended: Vec<f32>,
    up: Vec<f32>,
    gelu_rows: bf16::Bits,
    down: Vec<f32>,
    /// An int8 layer's input, its attention's context, the context's normed product and
    /// the GELU rows, quantized.
    xq: int8::QRows,
    cq: int8::QRows,
    aq: int8::QRows,
    hq: int8::QRows,
}

thread_local! {
    /// Each thread's [`Scratch`], as large as its largest batch so far.
    static SCRATCH: std::cell::Cell<Scratch> = std::cell::Cell::new(Scratch::default());
}

/// The encoder's output over real tokens only.
pub(crate) struct Packed {
    hidden: Vec<f32>,
    width: usize,
    rows: Vec<(usize, usize)>,
    places: Vec<usize>,
    batch: usize,
    sequence: usize,
}

impl Packed {
    /// Values per token.
    pub(crate) fn width(&self) -> usize {
        self.width
    }

    /// `[batch, sequence, hidden]` with zeros at padded positions.
    pub(crate) fn unpacked(&self) -> Vec<f32> {
        let w = self.width;
        let mut out = vec![0f32; self.batch * self.sequence * w];
        for (token, &place) in self.places.iter().enumerate() {
            out[place * w..(place + 1) * w].copy_from_slice(&self.hidden[token * w..(token + 1) * w]);
        }
        out
    }

    /// The embedding head: `[batch, hidden]`, by [`kiln_core::pool_rows`] over each
    /// text's real tokens; CLS pooling of a text whose first position is padding gives
    /// zeros (it has no CLS token here).
    pub(crate) fn pooled(&self, head: EmbeddingHead) -> Vec<f32> {
        let w = self.width;
        let mut out = vec![0f32; self.batch * w];
        for (b, (row, &(start, len))) in out.chunks_exact_mut(w).zip(&self.rows).enumerate() {
            let tokens = &self.hidden[start * w..(start + len) * w];
            let first = (len > 0 && self.places[start] == b * self.sequence).then(|| &tokens[..w]);
            pool_rows(tokens.chunks_exact(w), first, head, row);
        }
        out
    }
}

/// A matrix operand of [`product`]: its first element, and how many elements apart
/// its rows and its columns are.
#[derive(Clone, Copy)]
pub(crate) struct View<P> {
    at: P,
    row: usize,
    column: usize,
}

impl<P> View<P> {
    /// A row-major matrix whose rows are `row` elements apart.
    pub(crate) fn rows(at: P, row: usize) -> Self {
        View { at, row, column: 1 }
    }

    /// The transpose of a row-major matrix whose rows are `row` elements apart: its
    /// columns are `row` apart, its rows adjacent.
    pub(crate) fn transposed(at: P, row: usize) -> Self {
        View { at, row: 1, column: row }
    }
}

/// `dst = scale · lhs · rhs` (`m × k` by `k × n`, f32), or that added to what `dst`
/// holds when `add`: one call of the `gemm` crate with its nineteen arguments named.
///
/// # Safety
/// The views address `m × n`, `m × k` and `k × n` elements of live buffers, and `dst`
/// overlaps neither input nor anything another thread writes meanwhile.
pub(crate) unsafe fn product(
    (m, n, k): (usize, usize, usize),
    dst: View<*mut f32>,
    add: bool,
    lhs: View<*const f32>,
    rhs: View<*const f32>,
    scale: f32,
    parallelism: gemm::Parallelism,
) {
    // SAFETY: as the caller promises.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.at,
            dst.column as isize,
            dst.row as isize,
            add,
            lhs.at,
            lhs.column as isize,
            lhs.row as isize,
            rhs.at,
            rhs.column as isize,
            rhs.row as isize,
            if add { 1.0 } else { 0.0 },
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `out = x W^T + b` for `tokens` rows: the output starts as the bias and the GEMM
/// adds the product to it.
fn linear(x: &[f32], tokens: usize, layer: &Dense, out: &mut Vec<f32>) {
    let (k, n) = (layer.inputs, layer.outputs);
    debug_assert_eq!(x.len(), tokens * k);
    out.clear();
    out.reserve(tokens * n);
    for _ in 0..tokens {
        out.extend_from_slice(&layer.bias);
    }
    if tokens == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the three buffers hold tokens×n, tokens×k and k×n f32s, row-major, which
    // is what the sizes and strides passed say; `out` is not aliased.
    unsafe {
        product(
            (tokens, n, k),
            View::rows(out.as_mut_ptr(), n),
            true,
            View::rows(x.as_ptr(), k),
            View::rows(layer.weight_t.as_ptr(), n),
            1.0,
            parallelism,
        );
    }
}

/// Runs `f` on this thread's value in `slot`, taken out and put back after — for
/// buffers kept between calls and held across a parallel call. On one of rayon's threads
/// the wait inside that call may run another job (work stealing); a job reaching the
/// same slot then finds it empty (and grows a buffer of its own) where a `RefCell`
/// borrow would panic ("already borrowed").
pub(crate) fn with_taken<T: Default, R>(
    slot: &'static std::thread::LocalKey<std::cell::Cell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    let mut value = slot.take();
    let result = f(&mut value);
    slot.set(value);
    result
}

/// A pointer parallel jobs share, each writing its own elements: attention's columns
/// of its rows, a panel's columns (`panels.rs`).
#[derive(Clone, Copy)]
pub(crate) struct Shared(pub(crate) *mut f32);
// SAFETY: jobs write disjoint elements (see `attention`, `PanelDense::forward`).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// The element `offset` places on. A method, so closures capture the whole
    /// (Send) wrapper rather than its raw pointer field.
    ///
    /// # Safety
    /// `offset` is inside the buffer.
    pub(crate) unsafe fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: as the caller promises.
        unsafe { self.0.add(offset) }
    }
}

/// Attention's jobs: (first token, tokens, head) for every text with tokens and every
/// head, longest first, so the last jobs to start are short ones.
pub(crate) fn head_jobs(rows: &[(usize, usize)], heads: usize) -> Vec<(usize, usize, usize)> {
    let mut jobs: Vec<(usize, usize, usize)> = rows
        .iter()
        .filter(|(_, len)| *len > 0)
        .flat_map(|&(start, len)| (0..heads).map(move |head| (start, len, head)))
        .collect();
    jobs.sort_by_key(|&(_, len, _)| std::cmp::Reverse(len));
    jobs
}

/// Self-attention of each text over its own tokens: `qkv` is `[tokens, 3 * hidden]`
/// (`[q | k | v]`), `context` `[tokens, hidden]`.
fn attention(qkv: &[f32], rows: &[(usize, usize)], hidden: usize, heads: usize, context: &mut [f32]) {
    let d = hidden / heads;
    let stride = 3 * hidden;
    let scale = 1.0 / (d as f32).sqrt();
    let jobs = head_jobs(rows, heads);
    let out = Shared(context.as_mut_ptr());
    jobs.par_iter().for_each(|&(start, len, head)| {
        SCORES.with_borrow_mut(|buffer| {
            // Written whole by the first GEMM (it does not read it): grown, never cleared.
            if buffer.len() < len * len {
                buffer.resize(len * len, 0.0);
            }
            let scores = &mut buffer[..len * len];
            let q = qkv[start * stride + head * d..].as_ptr();
            let k = qkv[start * stride + hidden + head * d..].as_ptr();
            let v = qkv[start * stride + 2 * hidden + head * d..].as_ptr();
            // SAFETY: q, k and v address `len` rows of `d` values `stride` apart inside
            // `qkv`; scores is len×len; this job writes rows start..start+len, columns
            // head*d..(head+1)*d of `context`, which no other job writes.
            unsafe {
                // scores = q k^T * scale: k^T's row kk is column kk of k, so rhs strides
                // are 1 between rows and `stride` between columns.
                product(
                    (len, len, d),
                    View::rows(scores.as_mut_ptr(), len),
                    false,
                    View::rows(q, stride),
                    View::transposed(k, stride),
                    scale,
                    gemm::Parallelism::None,
                );
                scores.chunks_exact_mut(len).for_each(softmax);
                product(
                    (len, d, len),
                    View::rows(out.at(start * hidden + head * d), hidden),
                    false,
                    View::rows(scores.as_ptr(), len),
                    View::rows(v, stride),
                    1.0,
                    gemm::Parallelism::None,
                );
            }
        })
    });
}

thread_local! {
    /// Each thread's attention scores, kept between jobs and batches: a buffer per job,
    /// allocated and zeroed, showed in perf as 5% memset plus page faults. The GGUF
    /// decoder's attention (`llama.rs`) uses it too.
    pub(crate) static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `out = down(GELU(up(x)))`, the intermediate in `scratch`: f32, or when both layers
/// are bf16 the bf16 rows `down` reads, GELU applied as `up` writes them (it then never
/// exists in f32 nor crosses memory twice).
fn feed_forward(
    up: &Linear,
    down: &Linear,
    x: &[f32],
    tokens: usize,
    scratch: (&mut Vec<f32>, &mut bf16::Bits),
    out: &mut Vec<f32>,
) {
    if let (Linear::Bf16(up), Linear::Bf16(down)) = (up, down)
        && up.outputs() == down.inputs()
    {
        out.resize(tokens * down.outputs(), 0.0);
        up.forward(x, tokens, bf16::Sink::GeluRows(scratch.1));
        down.run(scratch.1, tokens, bf16::Sink::F32(out));
        return;
    }
    let hidden = scratch.0;
    if let Linear::Int8(up) = up {
        up.forward_gelu(x, tokens, hidden);
    } else {
        up.forward(x, tokens, hidden);
        hidden.par_chunks_mut(1 << 14).for_each(gelu);
    }
    down.forward(hidden, tokens, out);
}

/// `x = LayerNorm(x + residual)` row by row.
fn add_norm_rows(x: &mut [f32], residual: &[f32], norm: &Norm, eps: f32) {
    let w = norm.gamma.len();
    x.par_chunks_mut(w * 64).zip(residual.par_chunks(w * 64)).for_each(|(x, r)| {
        for (x, r) in x.chunks_exact_mut(w).zip(r.chunks_exact(w)) {
            add_norm(x, r, &norm.gamma, &norm.beta, eps);
        }
    });
}

// `kernels` first: its `dispatch!` macro is used by `int8`.
#[macro_use]
mod kernels;
mod aligned;
mod amx;
pub(crate) mod bf16;
pub(crate) mod blocks;
pub(crate) mod int8;
pub(crate) mod isa;
pub(crate) mod panels;
pub(crate) mod tile_attention;
mod tiles;

use kernels::{add_norm, gelu};
pub(crate) use kernels::{add_rms_norm, decode_attention, softmax};
