//! A 20,000 × 20,000 image (400 Mpx, 1.2 GB of RGB; above the whole-image pixel budget) segmented
//! by the command line with bounded memory: the test writes the image as a PNG row by row, runs
//! `segment --scale 0.1` on it (every input and output row is 20,000 wide; the model sees
//! 2,000²), measures the child's peak RSS with wait4, and checks every row of the 20,000² mask
//! against the library's in-memory tiled segmentation of the same image rescaled, upsampled by
//! nearest neighbour: the streamed pipeline (decode → rescale → windows → blend → upsample →
//! encode) changes no pixel. Alone in its file so that nothing else runs beside it.

mod common;

use common::cli::{bin, repo, s, tmpdir};
use medfastsam::io::RgbImage;
use medfastsam::model::{Config, Weights};
use medfastsam::segment::{Segmenter, TileOptions};
use medfastsam::stream::{self, RowSource};
use medfastsam::testutil::test_gpu;

const N: usize = 20_000;

/// Row `y` of a synthetic fluorescence-like image: bright discs (radius 7–13) on a jittered
/// 40-pixel grid over a dark, slowly varying background.
fn synthetic_row(y: usize, out: &mut [u8]) {
    let hash = |a: usize, b: usize| -> u32 {
        let mut h = (a as u32).wrapping_mul(0x9E37_79B1) ^ (b as u32).wrapping_mul(0x85EB_CA77);
        h ^= h >> 15;
        h = h.wrapping_mul(0x2C1B_3C6D);
        h ^ (h >> 13)
    };
    let cy = y / 40;
    for (x, p) in out.chunks_exact_mut(3).enumerate() {
        let bg = 16 + ((x / 97 + y / 89) % 8) as u8;
        let mut v = bg;
        let cx = x / 40;
        for (gx, gy) in [(cx, cy), (cx.wrapping_sub(1), cy), (cx, cy.wrapping_sub(1))] {
            if gx > N || gy > N {
                continue;
            }
            let h = hash(gx, gy);
            let r = 7 + (h % 7) as i64;
            let (dx, dy) = ((h >> 4) % 17, (h >> 9) % 17);
            let (px, py) = (
                (gx * 40 + 12 + dx as usize) as i64,
                (gy * 40 + 12 + dy as usize) as i64,
            );
            let (ex, ey) = (x as i64 - px, y as i64 - py);
            if ex * ex + ey * ey <= r * r {
                v = 150 + (h >> 20) as u8 % 80;
            }
        }
        p.copy_from_slice(&[v, v / 3, v / 2 + 10]);
    }
}

/// The synthetic image as a source of rows.
struct Synthetic {
    y: usize,
}

impl RowSource for Synthetic {
    fn width(&self) -> usize {
        N
    }
    fn height(&self) -> usize {
        N
    }
    fn read_row(&mut self, out: &mut [u8]) -> medfastsam::Result<()> {
        synthetic_row(self.y, out);
        self.y += 1;
        Ok(())
    }
}

/// Runs the command to its end and returns (exit code, output, peak RSS in bytes).
#[cfg(unix)]
#[allow(clippy::zombie_processes)] // reaped by wait4, which also gives its resource usage
fn run_measured(args: &[&str]) -> (i32, String, u64) {
    use std::io::Read;
    let mut c = bin();
    c.args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut err = child.stderr.take().unwrap();
    let mut out = child.stdout.take().unwrap();
    let t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut text = String::new();
    let _ = out.read_to_string(&mut text);
    let mut status = 0i32;
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    assert_eq!(pid, child.id() as i32, "wait4 failed");
    text += &t.join().unwrap();
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    // ru_maxrss is in kilobytes on Linux
    (code, text, ru.ru_maxrss as u64 * 1024)
}

#[test]
#[cfg(unix)]
fn a_20000_square_image_streams_with_bounded_memory() {
    let d = tmpdir("big-image");
    let input = d.join("big.png");
    {
        let f = std::fs::File::create(&input).unwrap();
        let mut w = stream::PngRowWriter::new(
            std::io::BufWriter::with_capacity(1 << 20, f),
            N,
            N,
            true,
            "big.png",
        )
        .unwrap();
        let mut row = vec![0u8; N * 3];
        for y in 0..N {
            synthetic_row(y, &mut row);
            w.write_row(&row).unwrap();
        }
        w.finish().unwrap();
    }
    let weights = repo("tests/data/fixtures/tiny.weights.safetensors");
    let config = repo("tests/data/fixtures/tiny.config.json");
    let out = d.join("out");
    let t = std::time::Instant::now();
    let (code, text, rss) = run_measured(&[
        "segment",
        s(&input),
        "--weights",
        s(&weights),
        "--config",
        s(&config),
        "--scale",
        "0.1",
        "--tile-batch",
        "2",
        "--out",
        s(&out),
    ]);
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(code, 0, "{text}");
    eprintln!(
        "20000x20000 streamed: peak RSS {:.0} MiB, {secs:.0} s; {}",
        rss as f64 / (1 << 20) as f64,
        text.trim()
    );
    assert!(rss < 2 << 30, "peak RSS {} MiB, above 2 GiB", rss >> 20);
    assert!(
        text.contains("20000x20000 in 81 windows of 256x256"),
        "{text}"
    );

    // The library, in memory, on the same image rescaled to 2,000².
    let cfg = Config::from_file(&config).unwrap();
    let w = Weights::load(&weights).unwrap();
    let seg = Segmenter::new(test_gpu(), &w, Some(&cfg), None).unwrap();
    let small: RgbImage =
        stream::read_all(&mut stream::Scaled::new(Synthetic { y: 0 }, 2000, 2000)).unwrap();
    let mut want = vec![0u8; 2000 * 2000];
    seg.segment_tiled(
        &small,
        &TileOptions {
            overlap: 32,
            global_otsu: false,
            batch: 2,
        },
        |y, row, _| {
            for (m, &l) in want[y * 2000..(y + 1) * 2000].iter_mut().zip(row) {
                *m = if l > 0.0 { 255 } else { 0 };
            }
            Ok(())
        },
        |_, _| {},
    )
    .unwrap();
    let fg = want.iter().filter(|&&v| v > 0).count() as f64 / want.len() as f64;
    assert!(fg > 0.01 && fg < 0.99, "foreground {fg}");

    // Every row of the streamed 20,000² mask is the in-memory mask upsampled.
    let mut mask = stream::open(&out.join("big_mask.png"), &Default::default()).unwrap();
    assert_eq!((mask.rows.width(), mask.rows.height()), (N, N));
    let mut row = vec![0u8; N * 3];
    let xmap: Vec<usize> = (0..N).map(|x| stream::nearest_index(x, N, 2000)).collect();
    for y in 0..N {
        mask.rows.read_row(&mut row).unwrap();
        let sy = stream::nearest_index(y, N, 2000);
        let src = &want[sy * 2000..(sy + 1) * 2000];
        for (x, p) in row.chunks_exact(3).enumerate() {
            assert_eq!(p[0], src[xmap[x]], "mask pixel {x},{y}");
        }
    }
    // The overlay is complete and 20,000²: every row decodes, and its pixels differ from the
    // image's exactly where the mask is set.
    let mut over = stream::open(&out.join("big_overlay.png"), &Default::default()).unwrap();
    assert_eq!((over.rows.width(), over.rows.height()), (N, N));
    let mut img = vec![0u8; N * 3];
    let mut m = stream::open(&out.join("big_mask.png"), &Default::default()).unwrap();
    let mut mrow = vec![0u8; N * 3];
    for y in 0..N {
        over.rows.read_row(&mut row).unwrap();
        m.rows.read_row(&mut mrow).unwrap();
        synthetic_row(y, &mut img);
        for x in (0..N).step_by(7) {
            if mrow[x * 3] == 0 {
                assert_eq!(
                    row[x * 3..x * 3 + 3],
                    img[x * 3..x * 3 + 3],
                    "overlay pixel {x},{y}"
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&d);
}
