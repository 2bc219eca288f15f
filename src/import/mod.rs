//! Readers of foreign weight files (PyTorch checkpoints in `pth`, ONNX models in `onnx`) and the
//! conversion of what they read into our weights (`convert`).

pub mod convert;
pub mod init;
pub mod onnx;
pub mod pth;
