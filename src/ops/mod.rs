//! Operations: one module per op family, each recording WGSL dispatches; `reference` holds the
//! plain CPU f64 versions the tests compare against.

pub mod elementwise;
pub mod matmul;
pub mod reference;

pub use matmul::Act;
