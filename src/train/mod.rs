//! Training: parameters and optimiser state on the device, the explicit backward of the model,
//! losses, datasets, metrics and the training loop.

pub mod layers;
pub mod model;
pub mod params;
