//! The classify task's parts: the image pipeline, the model's image input, the labels,
//! and the best classes of each image.

use std::time::Instant;

use kiln_core::{Error, Inputs, KilnConfig, ModelInfo, Outputs, Result, Tensor};
use kiln_vision::{ImageInput, ImagePipeline};

use super::Optimizer;
use crate::stats::{Counters, Stage};
use crate::worker::ModelWorker;

/// One class and its score.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Scored {
    /// The label (from `classify.labels`, else the class number).
    pub label: String,
    /// Class index in the model's output.
    pub index: usize,
    /// Probability (after softmax) or the model's own score.
    pub score: f32,
}

/// The best classes of one image, best first.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Classification {
    /// Up to `classify.top_k` classes.
    pub top_k: Vec<Scored>,
}

/// The classify task's parts: the image pipeline, the model's image input, the labels.
pub(super) struct Classifier {
    pub(super) pipeline: ImagePipeline,
    pub(super) input: String,
    pub(super) labels: Option<Vec<String>>,
    pub(super) softmax: bool,
}

impl Classifier {
    pub(super) fn new(config: &KilnConfig, info: &ModelInfo) -> Result<Self> {
        let pipeline = ImagePipeline::new(&config.preprocess)?;
        let input = match info.inputs.as_slice() {
            [one] => one.name.clone(),
            [] => "input".to_string(),
            many => {
                return Err(Error::Unsupported(format!(
                    "classify feeds one image tensor; {} takes {}: {}",
                    info.name,
                    many.len(),
                    many.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
                )));
            }
        };
        let labels = match &config.classify.labels {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading labels", path, e))?;
                let labels: Vec<String> =
                    text.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect();
                let classes = info.outputs.first().and_then(|o| match o.shape.last() {
                    Some(kiln_core::Dim::Fixed(n)) => Some(*n),
                    _ => None,
                });
                if let Some(n) = classes.filter(|&n| n != labels.len()) {
                    return Err(Error::Config(vec![kiln_core::ConfigIssue::new(
                        "classify.labels",
                        format!("{} ({} labels)", path.display(), labels.len()),
                        format!("one label per class: the model has {n}"),
                    )]));
                }
                Some(labels)
            }
        };
        Ok(Classifier { pipeline, input, labels, softmax: config.classify.softmax })
    }

    pub(super) fn top_k(&self, outputs: &Outputs, k: usize) -> Result<Classification> {
        let (_, scores) = outputs.iter().next().ok_or_else(|| {
            Error::InvalidInput("the model returned no outputs; a classifier must return scores".into())
        })?;
        let mut values = scores.to_f32_vec()?;
        if self.softmax {
            let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = values
                .iter_mut()
                .map(|v| {
                    *v = (*v - max).exp();
                    *v
                })
                .sum();
            values.iter_mut().for_each(|v| *v /= sum);
        }
        let mut order: Vec<usize> = (0..values.len()).collect();
        order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
        let top_k = order
            .into_iter()
            .take(k)
            .map(|index| Scored {
                label: self
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(index).cloned())
                    .unwrap_or_else(|| index.to_string()),
                index,
                score: values[index],
            })
            .collect();
        Ok(Classification { top_k })
    }
}

impl Optimizer {
    /// The class labels of a classify task, in class order (from `classify.labels`);
    /// `None` without a labels file (classes are numbers) or for another task.
    pub fn labels(&self) -> Option<&[String]> {
        self.vision.as_ref().and_then(|v| v.labels.as_deref())
    }

    /// Classifies images (task `classify`): each is pre-processed per `[preprocess]`,
    /// run through the model — batched with other callers' images — and its scores
    /// turned into the `classify.top_k` best labels. One result per image, in order: an
    /// image that cannot be read fails alone, with an error naming it.
    pub async fn classify(&self, images: &[ImageInput]) -> Result<Vec<Result<Classification>>> {
        self.request(self.check_call_size(images.len(), "images"), || self.classify_inner(images)).await
    }

    async fn classify_inner(&self, images: &[ImageInput]) -> Result<Vec<Result<Classification>>> {
        let classifier = self.vision.clone().ok_or_else(|| {
            Error::Unsupported(format!(
                "classify needs task = \"classify\"; this optimizer runs {:?}",
                self.config.task
            ))
        })?;
        let started = Instant::now();
        let owned = images.to_vec();
        let pipeline = classifier.clone();
        let batch = tokio::task::spawn_blocking(move || pipeline.pipeline.process(&owned))
            .await
            .map_err(|e| Error::backend("kiln", format!("the pre-processing task failed: {e}")))??;
        self.timed(Stage::Preprocess, "preprocess", started);
        let rows = batch.tensor.shape().first().copied().unwrap_or(0);
        let row_shape: Vec<usize> =
            std::iter::once(1).chain(batch.tensor.shape()[1..].iter().copied()).collect();
        let row_bytes = batch.tensor.bytes().len() / rows.max(1);
        let dtype = batch.tensor.dtype();
        let request = ModelWorker::request_id();
        let submits = (0..rows).map(|r| {
            let bytes = batch.tensor.bytes()[r * row_bytes..(r + 1) * row_bytes].to_vec();
            let name = classifier.input.clone();
            let shape = row_shape.clone();
            async move {
                let inputs = Inputs::new().with(name, Tensor::from_bytes(dtype, shape, bytes)?);
                if self.config.batching.enabled {
                    let out = self.replicas.pick().submit_as(request, inputs, 1).await?;
                    self.counters.queue_wait(out.queue_wait);
                    Ok::<Outputs, Error>(out.outputs)
                } else {
                    self.run_model(inputs).await
                }
            }
        });
        let outputs = futures_util::future::join_all(submits).await;
        let mut outputs = outputs.into_iter();
        let mut results = Vec::with_capacity(images.len());
        for row in batch.rows {
            results.push(match row {
                Ok(_) => outputs
                    .next()
                    .expect("one output per row")
                    .and_then(|out| classifier.top_k(&out, self.config.classify.top_k)),
                Err(e) => Err(e),
            });
        }
        Counters::add(&self.counters.images, results.iter().filter(|r| r.is_ok()).count() as u64);
        Ok(results)
    }
}
