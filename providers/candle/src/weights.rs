//! Where a BERT checkpoint keeps its weights: one place for the names that kiln's CPU
//! kernels (`cpu.rs`), its CUDA kernels (`cuda.rs`) and candle-transformers' graph
//! read, each into its own layout.

use candle_nn::VarBuilder;
use candle_transformers::models::bert::Config as BertConfig;

/// Runs `load` at the model's root: bare names (checkpoints saved from `BertModel`),
/// else `bert.`-prefixed (task heads). The first attempt's error is the one reported.
pub(crate) fn at_bert_root<T>(
    vb: &VarBuilder,
    load: impl Fn(&VarBuilder) -> candle_core::Result<T>,
) -> candle_core::Result<T> {
    load(vb).or_else(|first| load(&vb.pp("bert")).map_err(|_| first))
}

/// One encoder layer's weights, in whatever form the reader made them: `D` a dense
/// layer, `N` a LayerNorm.
pub(crate) struct LayerWeights<D, N> {
    pub query: D,
    pub key: D,
    pub value: D,
    pub attention_out: D,
    pub attention_norm: N,
    pub up: D,
    pub down: D,
    pub output_norm: N,
}

/// Every encoder layer under `vb` (the model's root), read with `dense(vb, inputs,
/// outputs)` and `norm(vb, width)`.
pub(crate) fn encoder_layers<D, N>(
    vb: &VarBuilder,
    config: &BertConfig,
    dense: impl Fn(&VarBuilder, usize, usize) -> candle_core::Result<D>,
    norm: impl Fn(&VarBuilder, usize) -> candle_core::Result<N>,
) -> candle_core::Result<Vec<LayerWeights<D, N>>> {
    let (h, ff) = (config.hidden_size, config.intermediate_size);
    (0..config.num_hidden_layers)
        .map(|i| {
            let l = vb.pp(format!("encoder.layer.{i}"));
            let attention = l.pp("attention.self");
            Ok(LayerWeights {
                query: dense(&attention.pp("query"), h, h)?,
                key: dense(&attention.pp("key"), h, h)?,
                value: dense(&attention.pp("value"), h, h)?,
                attention_out: dense(&l.pp("attention.output.dense"), h, h)?,
                attention_norm: norm(&l.pp("attention.output.LayerNorm"), h)?,
                up: dense(&l.pp("intermediate.dense"), h, ff)?,
                down: dense(&l.pp("output.dense"), ff, h)?,
                output_norm: norm(&l.pp("output.LayerNorm"), h)?,
            })
        })
        .collect()
}
