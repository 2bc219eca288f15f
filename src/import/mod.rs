//! Readers of foreign weight files (PyTorch checkpoints in `pth`, ONNX models in `onnx`) and the
//! conversion of what they read into our weights (`convert`).

pub mod convert;
pub mod init;
pub mod onnx;
pub mod pth;

/// Reads and imports weight files as `medfastsam import` does: one PyTorch checkpoint, or the ONNX
/// files of one model (ONNX external data read from each file's folder). The source file names and
/// their SHA-256 are recorded in the weights' metadata.
#[cfg(not(target_arch = "wasm32"))]
pub fn import_files(
    paths: &[std::path::PathBuf],
    arch: Option<crate::model::config::Arch>,
) -> crate::Result<convert::Imported> {
    use crate::error::Error;
    use crate::model::config::Arch;
    let mut sources = Vec::new();
    for p in paths {
        let bytes = std::fs::read(p).map_err(|e| Error::io(p, e))?;
        sources.push((p, bytes));
    }
    let joined = paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" + ");
    let names: Vec<String> = paths
        .iter()
        .map(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect();
    let sha: Vec<String> = sources
        .iter()
        .map(|(_, b)| crate::train::distill::sha256_hex(b))
        .collect();
    let is_onnx = |p: &std::path::Path, bytes: &[u8]| {
        p.extension().is_some_and(|e| e.eq_ignore_ascii_case("onnx"))
            // A ModelProto starts with field 1 (ir_version, varint): byte 0x08.
            || (bytes.first() == Some(&0x08) && !bytes.starts_with(b"PK"))
    };
    let mut imported = if !sources.is_empty() && sources.iter().all(|(p, b)| is_onnx(p, b)) {
        if let Some(a) = arch.filter(|a| *a != Arch::MobileSam) {
            return Err(Error::weights(
                joined,
                format!(
                    "--arch {}: the ONNX importer reads MobileSAM's exports (encoder + prompt/mask decoder)",
                    a.name()
                ),
            ));
        }
        let mut models = Vec::new();
        for (p, b) in &sources {
            let dir = p
                .parent()
                .map(|d| d.to_path_buf())
                .unwrap_or_else(|| std::path::PathBuf::from("."));
            let name = p.display().to_string();
            let m = onnx::read_onnx(b, &name, &onnx::in_folder(&dir))
                .map_err(|e| Error::weights(&name, format!("{e:#}")))?;
            models.push(m);
        }
        convert::from_onnx(&models, &joined)?
    } else if sources.len() == 1 {
        let (p, b) = &sources[0];
        convert::from_pth(b, &p.display().to_string(), arch)?
    } else {
        return Err(Error::weights(
            joined,
            format!(
                "give one PyTorch checkpoint, or the ONNX files of one model (got {} files)",
                sources.len()
            ),
        ));
    };
    convert::record_source(&mut imported.weights, &names, &sha);
    Ok(imported)
}
