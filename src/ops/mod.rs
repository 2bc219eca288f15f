//! Operations: one module per op family, each recording WGSL dispatches; `reference` holds the
//! plain CPU f64 versions the tests compare against.

pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod matmul;
pub mod norm;
pub mod otsu;
pub mod pe;
pub mod reference;
pub mod resize;

pub use matmul::Act;
