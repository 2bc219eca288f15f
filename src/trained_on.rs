//! What a model was trained on, travelling with its weights (metadata key
//! `medfastsam.trained_on`, JSON), and the checks that warn when an input looks unlike it
//! (docs/channels.md).
//!
//! Training writes the modality, the objects' polarity (bright on dark, or dark on bright,
//! measured from the training masks), the input size, the channel transform and the dataset's
//! name. Inference reads them: the channel transform is applied unless another is asked for, and
//! [`input_warnings`] compares the input with them.

use crate::channel::{Channel, ChannelTransform, StainVectors};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// Metadata key of [`TrainedOn`] in a safetensors file.
pub const META_TRAINED_ON: &str = "medfastsam.trained_on";

/// Whether the objects are brighter or darker than their surroundings in the model's input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Polarity {
    Bright,
    Dark,
}

impl Polarity {
    pub fn name(self) -> &'static str {
        match self {
            Polarity::Bright => "bright",
            Polarity::Dark => "dark",
        }
    }

    /// Bright objects when their mean grey is above the background's.
    pub fn measure(stats: &PolarityStats) -> Option<Polarity> {
        let (fg, bg) = stats.means()?;
        Some(if fg >= bg {
            Polarity::Bright
        } else {
            Polarity::Dark
        })
    }
}

/// Sums of the model-input grey inside and outside the masks, over the training samples.
#[derive(Clone, Debug, Default)]
pub struct PolarityStats {
    sum: [f64; 2],
    count: [u64; 2],
}

impl PolarityStats {
    /// Adds one sample: packed RGB of the model input and its 0/1 mask.
    pub fn add(&mut self, rgb: &[u8], mask: &[u8]) {
        for (p, &m) in rgb.chunks_exact(3).zip(mask) {
            let k = usize::from(m != 0);
            self.sum[k] += grey(p) as f64;
            self.count[k] += 1;
        }
    }

    /// Mean grey of the objects and of the background (None until both were seen).
    pub fn means(&self) -> Option<(f64, f64)> {
        if self.count[0] == 0 || self.count[1] == 0 {
            return None;
        }
        Some((
            self.sum[1] / self.count[1] as f64,
            self.sum[0] / self.count[0] as f64,
        ))
    }
}

/// What a model was trained on. Every field is optional: older files and files from elsewhere
/// carry none, and a user may give only some.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainedOn {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modality: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub polarity: Option<Polarity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stain_vectors: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    /// Free text: the fine-tuning history, the run that made the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl TrainedOn {
    /// Reads the record from a weights file's metadata (None when absent); a malformed record is
    /// an error naming `source`.
    pub fn from_metadata(
        meta: &std::collections::BTreeMap<String, String>,
        source: &str,
    ) -> Result<Option<TrainedOn>> {
        let Some(s) = meta.get(META_TRAINED_ON) else {
            return Ok(None);
        };
        serde_json::from_str(s).map(Some).map_err(|e| {
            Error::Invalid(format!(
                "{source}: the metadata entry {META_TRAINED_ON} is not valid ({e})"
            ))
        })
    }

    /// Writes the record into `meta`.
    pub fn write(&self, meta: &mut std::collections::BTreeMap<String, String>) {
        meta.insert(
            META_TRAINED_ON.into(),
            serde_json::to_string(self).expect("serialisable"),
        );
    }

    /// The recorded channel (rgb when none was recorded).
    pub fn channel(&self) -> Result<Channel> {
        Channel::parse(self.channel.as_deref().unwrap_or("rgb"))
    }

    /// The recorded stain vectors (standard when none were recorded).
    pub fn stain_vectors(&self) -> Result<StainVectors> {
        StainVectors::parse(self.stain_vectors.as_deref().unwrap_or("standard"))
    }

    /// One line: `fluorescence, bright objects, 256 px, channel rgb, dataset dsb2018-nuclei`.
    pub fn summary(&self) -> String {
        let mut parts = vec![];
        if let Some(m) = &self.modality {
            parts.push(m.clone());
        }
        if let Some(p) = self.polarity {
            parts.push(format!("{} objects", p.name()));
        }
        if let Some(s) = self.input_size {
            parts.push(format!("{s} px"));
        }
        parts.push(format!(
            "channel {}",
            self.channel.as_deref().unwrap_or("rgb")
        ));
        if let Some(v) = self.stain_vectors.as_deref().filter(|v| *v != "standard") {
            parts.push(format!("{v} stain vectors"));
        }
        if let Some(d) = &self.dataset {
            parts.push(format!("dataset {d}"));
        }
        parts.join(", ")
    }
}

/// Grey of one pixel, the Otsu prompt's luma weights.
fn grey(p: &[u8]) -> u32 {
    (2989 * p[0] as u32 + 5870 * p[1] as u32 + 1140 * p[2] as u32 + 5000) / 10000
}

/// A 256-bin grey histogram of the model's input, accumulated row by row.
#[derive(Clone, Debug)]
pub struct GreyHistogram(pub [u64; 256]);

impl Default for GreyHistogram {
    fn default() -> Self {
        GreyHistogram([0; 256])
    }
}

impl GreyHistogram {
    pub fn add(&mut self, rgb: &[u8]) {
        for p in rgb.chunks_exact(3) {
            self.0[grey(p).min(255) as usize] += 1;
        }
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Otsu's threshold t (pixels with grey ≥ t are the bright class), by exact between-class
    /// variance on the histogram; None for a constant image.
    pub fn otsu(&self) -> Option<usize> {
        let n = self.total() as f64;
        if n == 0.0 {
            return None;
        }
        let total: f64 = self
            .0
            .iter()
            .enumerate()
            .map(|(i, &c)| i as f64 * c as f64)
            .sum();
        let (mut w0, mut s0) = (0.0, 0.0);
        let mut best = None;
        let mut best_v = 0.0;
        for t in 1..256 {
            w0 += self.0[t - 1] as f64;
            s0 += (t - 1) as f64 * self.0[t - 1] as f64;
            let w1 = n - w0;
            if w0 == 0.0 || w1 == 0.0 {
                continue;
            }
            let (m0, m1) = (s0 / w0, (total - s0) / w1);
            let v = w0 * w1 * (m0 - m1) * (m0 - m1);
            if v > best_v {
                best_v = v;
                best = Some(t);
            }
        }
        best
    }

    /// Fraction of pixels on the bright side of Otsu's threshold (None for a constant image).
    pub fn bright_fraction(&self) -> Option<f64> {
        let t = self.otsu()?;
        let above: u64 = self.0[t..].iter().sum();
        Some(above as f64 / self.total() as f64)
    }
}

/// Foreground fraction above which a mask is suspicious.
pub const MAX_FOREGROUND: f64 = 0.8;
/// Fraction of the image on the objects' side of Otsu's threshold above which the image looks
/// inverted relative to the training data (objects are usually the minority class).
pub const MAX_OBJECT_SIDE: f64 = 0.5;

/// A warning about an input that looks unlike the training data.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct InputWarning {
    /// `foreground`, `polarity` or `size`.
    pub code: &'static str,
    pub message: String,
}

/// What is known about one segmented input.
pub struct InputFacts<'a> {
    /// The model's record, if any.
    pub trained_on: Option<&'a TrainedOn>,
    /// The input size the model ran at.
    pub image_size: usize,
    /// The transform applied.
    pub transform: &'a ChannelTransform,
    /// Histogram of the model's input (after the transform).
    pub histogram: &'a GreyHistogram,
    /// Fraction of the mask that is foreground.
    pub foreground: f64,
}

/// The warnings for one input: more than 80 % foreground, an intensity distribution inverted
/// relative to the recorded polarity, an input size other than the trained one.
pub fn input_warnings(f: &InputFacts) -> Vec<InputWarning> {
    let mut out = vec![];
    let what = f
        .trained_on
        .and_then(|t| t.modality.clone())
        .map(|m| format!("{m} images"))
        .unwrap_or_else(|| "its training images".into());
    let suggest = |polarity: Option<Polarity>| match polarity {
        Some(Polarity::Bright) => {
            " For a brightfield stain (H&E, IHC) try the channel hematoxylin; for other dark \
             objects on a bright background, invert."
        }
        Some(Polarity::Dark) => " For bright objects on a dark background, try the channel invert.",
        None => "",
    };
    let polarity = f.trained_on.and_then(|t| t.polarity);
    if let (Some(p), Some(bright)) = (polarity, f.histogram.bright_fraction()) {
        let object_side = match p {
            Polarity::Bright => bright,
            Polarity::Dark => 1.0 - bright,
        };
        if object_side > MAX_OBJECT_SIDE {
            let (objs, bg) = match p {
                Polarity::Bright => ("bright", "dark"),
                Polarity::Dark => ("dark", "bright"),
            };
            out.push(InputWarning {
                code: "polarity",
                message: format!(
                    "This input (channel {}) is {:.0} % {objs}, but the model was trained on \
                     {objs} objects on a {bg} background ({what}): the mask may be inverted.{}",
                    f.transform.channel.name(),
                    object_side * 100.0,
                    suggest(Some(p))
                ),
            });
        }
    }
    if f.foreground > MAX_FOREGROUND {
        out.push(InputWarning {
            code: "foreground",
            message: format!(
                "{:.0} % of the image came out as foreground: the image may look unlike {what} \
                 (another stain or modality, inverted contrast).{}",
                f.foreground * 100.0,
                suggest(polarity)
            ),
        });
    }
    if let Some(s) = f.trained_on.and_then(|t| t.input_size)
        && s != f.image_size
    {
        out.push(InputWarning {
            code: "size",
            message: format!(
                "The model ran at {0} × {0} but was trained at {1} × {1}: objects appear at \
                 another scale than in training; the trained size usually works best.",
                f.image_size, s
            ),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otsu_of_two_levels_splits_them() {
        let mut h = GreyHistogram::default();
        h.0[20] = 700;
        h.0[200] = 300;
        let t = h.otsu().unwrap();
        assert!((21..=200).contains(&t), "{t}");
        assert!((h.bright_fraction().unwrap() - 0.3).abs() < 1e-12);
        let mut c = GreyHistogram::default();
        c.0[77] = 10;
        assert_eq!(c.otsu(), None);
    }

    #[test]
    fn metadata_round_trip_and_bad_record() {
        let t = TrainedOn {
            modality: Some("fluorescence".into()),
            polarity: Some(Polarity::Bright),
            input_size: Some(256),
            channel: Some("rgb".into()),
            dataset: Some("dsb2018-nuclei".into()),
            ..Default::default()
        };
        let mut m = std::collections::BTreeMap::new();
        t.write(&mut m);
        assert_eq!(TrainedOn::from_metadata(&m, "w").unwrap(), Some(t.clone()));
        assert_eq!(
            t.summary(),
            "fluorescence, bright objects, 256 px, channel rgb, dataset dsb2018-nuclei"
        );
        m.insert(META_TRAINED_ON.into(), "{not json".into());
        let e = TrainedOn::from_metadata(&m, "w.safetensors")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("w.safetensors") && e.contains(META_TRAINED_ON),
            "{e}"
        );
    }

    #[test]
    fn polarity_from_masks() {
        let mut s = PolarityStats::default();
        s.add(&[200, 200, 200, 10, 10, 10], &[1, 0]);
        assert_eq!(Polarity::measure(&s), Some(Polarity::Bright));
        let mut d = PolarityStats::default();
        d.add(&[200, 200, 200, 10, 10, 10], &[0, 1]);
        assert_eq!(Polarity::measure(&d), Some(Polarity::Dark));
        assert_eq!(Polarity::measure(&PolarityStats::default()), None);
    }
}
