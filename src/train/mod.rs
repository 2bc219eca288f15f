//! Training and evaluation support: dataset loaders for the official layouts, and the paper's metrics.
pub mod datasets;
pub mod metrics;
