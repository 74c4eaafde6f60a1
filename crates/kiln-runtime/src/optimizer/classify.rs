//! The classify task's parts: the image pipeline, the model's image input, the labels,
//! and the best classes of each image.

use kiln_core::{Error, KilnConfig, ModelInfo, Outputs, Result};
use kiln_vision::ImagePipeline;

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
