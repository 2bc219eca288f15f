//! Command-line interface: argument parsing and the subcommands.

mod batch;
mod bench;
mod distill;
mod eval;
mod gradients;
mod import;
mod info;
mod init;
mod prompted;
mod quickstart;
mod segment;
mod selftest;
mod selftest_html;
mod serve;
mod train;

use clap::{Args, Parser, Subcommand};
use medfastsam::gpu::{AdapterRequest, Gpu};
use medfastsam::model::{Config, Precision, Variant, Weights};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "medfastsam",
    version,
    about = "Prompt-free medical image segmentation (Med-FastSAM) on any GPU through wgpu"
)]
pub struct Cli {
    #[command(flatten)]
    pub gpu: GpuArgs,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Args, Clone)]
pub struct GpuArgs {
    /// Backend: vulkan, gl, metal, dx12 or all (default: env MEDFASTSAM_BACKEND / WGPU_BACKEND, else all).
    #[arg(long, global = true)]
    pub backend: Option<String>,
    /// Adapter: index or part of its name (default: env MEDFASTSAM_ADAPTER, else the best GPU found).
    #[arg(long, global = true)]
    pub adapter: Option<String>,
    /// Request only WebGPU's default limits (check that the work fits a browser); env MEDFASTSAM_LIMITS=webgpu.
    #[arg(long, global = true)]
    pub webgpu_limits: bool,
    /// Largest image (width x height, in pixels) any command decodes; larger ones are refused from
    /// their header before anything is allocated (default: env MEDFASTSAM_MAX_PIXELS, else 268435456).
    #[arg(long, global = true, value_name = "N", value_parser = medfastsam::io::parse_max_pixels)]
    pub max_pixels: Option<u64>,
}

impl GpuArgs {
    /// The request these options (and the environment) make.
    pub fn request(&self) -> AdapterRequest {
        AdapterRequest {
            backend: self.backend.clone(),
            adapter: self.adapter.clone(),
            webgpu_limits: self.webgpu_limits,
        }
        .with_env()
    }

    /// Whether a backend or an adapter was asked for (option or environment).
    pub fn explicit(&self) -> bool {
        let r = self.request();
        r.backend.is_some() || r.adapter.is_some()
    }

    pub fn open(&self) -> anyhow::Result<Gpu> {
        let gpu = Gpu::new(&self.request())?;
        eprintln!("adapter: {}", gpu.summary());
        Ok(gpu)
    }
}

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Weights (.safetensors, f32 or f16, the authors' key names).
    #[arg(long)]
    pub weights: PathBuf,
    /// Configuration JSON (format of fixtures/tiny.config.json); default: from the weights' metadata,
    /// else inferred from the tensor shapes.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Forward variant: paper (default) or released.
    #[arg(long)]
    pub variant: Option<String>,
    /// Model input size S (multiple of 16), overriding the configuration's.
    #[arg(long)]
    pub size: Option<usize>,
}

impl ModelArgs {
    /// Loads the weights and resolves configuration and variant.
    pub fn load(&self) -> anyhow::Result<(Weights, Config, Variant)> {
        let weights = Weights::load(&self.weights)?;
        let explicit = match &self.config {
            Some(p) => Some(Config::from_file(p)?),
            None => None,
        };
        let mut cfg = weights.resolve_config(explicit.as_ref(), 1024)?;
        if let Some(s) = self.size {
            cfg = cfg.with_image_size(s)?;
        }
        let variant = match &self.variant {
            Some(v) => Variant::parse(v)?,
            None => weights.variant.unwrap_or_default(),
        };
        Ok((weights, cfg, variant))
    }
}

/// How an inference model stores its weights on the device.
#[derive(Args, Clone, Default)]
pub struct PrecisionArgs {
    /// Storage of the linear and 1×1-convolution weights: f32, f16 (half their memory; every
    /// product and sum stays f32), or auto: f16 on a hardware GPU with shader-f16, else f32.
    #[arg(long, default_value = "auto", value_parser = parse_precision, value_name = "auto|f32|f16")]
    pub precision: Precision,
}

fn parse_precision(s: &str) -> Result<Precision, String> {
    Precision::parse(s).map_err(|e| e.to_string())
}

/// The channel transform applied before the model, in training and inference alike.
#[derive(Args, Clone, Default)]
pub struct ChannelArgs {
    /// Channel or stain transform: rgb, grey, invert, hematoxylin, eosin or dab (colour
    /// deconvolution); default: the one recorded in the weights (rgb when none).
    #[arg(long, value_name = "CHANNEL")]
    pub channel: Option<String>,
    /// Stain vectors of hematoxylin/eosin/dab: standard (Ruifrok & Johnston) or macenko
    /// (estimated per image); default: the recorded ones (standard when none).
    #[arg(long, value_name = "standard|macenko")]
    pub stain_vectors: Option<String>,
}

impl ChannelArgs {
    /// The channel and stain vectors to use: those given, else those `trained_on` records.
    pub fn resolve(
        &self,
        trained_on: Option<&medfastsam::trained_on::TrainedOn>,
    ) -> anyhow::Result<(
        medfastsam::channel::Channel,
        medfastsam::channel::StainVectors,
    )> {
        use medfastsam::channel::{Channel, StainVectors};
        let channel = match (&self.channel, trained_on) {
            (Some(c), _) => Channel::parse(c)?,
            (None, Some(t)) => t.channel()?,
            (None, None) => Channel::Rgb,
        };
        let vectors = match (&self.stain_vectors, trained_on) {
            (Some(v), _) => StainVectors::parse(v)?,
            (None, Some(t)) if self.channel.is_none() => t.stain_vectors()?,
            _ => StainVectors::Standard,
        };
        if vectors == StainVectors::Macenko && !channel.is_stain() {
            anyhow::bail!(
                "--stain-vectors macenko applies to hematoxylin, eosin or dab, not to --channel {}",
                channel.name()
            );
        }
        Ok((channel, vectors))
    }
}

/// What the weights at `path` record about their training data (None when nothing).
pub fn trained_on(
    w: &Weights,
    path: &std::path::Path,
) -> anyhow::Result<Option<medfastsam::trained_on::TrainedOn>> {
    Ok(medfastsam::trained_on::TrainedOn::from_metadata(
        &w.metadata,
        &path.display().to_string(),
    )?)
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Segment images (files or folders) and write <stem>_mask.png and <stem>_overlay.png.
    Segment(segment::SegmentArgs),
    /// Show a weights file's configuration, variant, parameter counts and the adapter.
    Info(info::InfoArgs),
    /// Import PyTorch (.pth/.pt) or ONNX checkpoints (Med-FastSAM, MobileSAM, LiteMedSAM) into a
    /// weights file.
    Import(import::ImportArgs),
    /// Initialise Med-FastSAM from imported pretrained weights (MobileSAM, LiteMedSAM): the natural
    /// branch, neck, prompt encoder and decoder copied, the medical modules initialised.
    Init(init::InitArgs),
    /// Benchmarks: ms per image at 256²/512²/1024², kernel GFLOP/s, peak GPU memory.
    Bench(bench::BenchArgs),
    /// One forward + backward in train mode; writes the loss and every gradient (grad.<key>).
    Gradients(gradients::GradientsArgs),
    /// Train on a dataset (ISIC-2018, PH2, MoNuSeg, TNBC, generic, the authors' layout).
    Train(train::TrainArgs),
    /// Feature distillation (paper Eq. 1): a teacher's embeddings into the natural branch and neck.
    Distill(distill::DistillArgs),
    /// Evaluate under the paper protocol (mean per-image IoU, Dice, HD95; per-image CSV).
    Eval(eval::EvalArgs),
    /// Train the tiny preset on the shipped nuclei image and compare with the Otsu prompt.
    Quickstart(quickstart::QuickstartArgs),
    /// Serve the web page on 127.0.0.1 (images never leave the machine).
    Serve(serve::ServeArgs),
    /// Check every kernel against the CPU f64 reference on this adapter, and time it.
    Selftest(selftest::SelftestArgs),
}

/// Prints a line above a progress bar; indicatif drops such lines when the bar is hidden (output
/// not a terminal), so then the line goes straight to stdout (or stderr for errors).
pub fn bar_line(bar: Option<&indicatif::ProgressBar>, msg: impl AsRef<str>) {
    let msg = msg.as_ref();
    match bar {
        Some(b) if !b.is_hidden() => b.println(msg),
        _ if msg.starts_with("error:") => eprintln!("{msg}"),
        _ => println!("{msg}"),
    }
}

/// Runs the CLI; returns the process exit code. Errors are printed as one line.
pub fn run() -> i32 {
    // SAFETY: first thing the process does; no other thread exists yet.
    unsafe { medfastsam::gpu::quiet_window_system_probes() };
    let cli = Cli::parse();
    // Rust ignores SIGPIPE, so printing into a closed pipe (`medfastsam info W | head`) panics;
    // the one-shot commands take the default action and end quietly like other tools. `serve`
    // keeps ignoring it: a browser closing its connection must not end the server.
    #[cfg(unix)]
    if !matches!(cli.cmd, Cmd::Serve(_)) {
        // SAFETY: no other thread exists yet; resetting a signal's disposition is async-signal-safe.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    if let Some(n) = cli.gpu.max_pixels {
        medfastsam::io::set_max_pixels(n);
    }
    // A misspelt --backend (or MEDFASTSAM_BACKEND / WGPU_BACKEND) fails before any work, in
    // every command that uses the GPU.
    if !matches!(cli.cmd, Cmd::Serve(_) | Cmd::Import(_) | Cmd::Init(_))
        && let Err(e) = cli.gpu.request().check()
    {
        eprintln!("error: {}", error_line(&e.into()));
        return 1;
    }
    let res = match &cli.cmd {
        Cmd::Segment(a) => segment::run(&cli.gpu, a),
        Cmd::Info(a) => info::run(&cli.gpu, a),
        Cmd::Import(a) => import::run(a),
        Cmd::Init(a) => init::run(a),
        Cmd::Bench(a) => bench::run(&cli.gpu, a),
        Cmd::Gradients(a) => gradients::run(&cli.gpu, a),
        Cmd::Train(a) => train::run(&cli.gpu, a),
        Cmd::Distill(a) => distill::run(&cli.gpu, a),
        Cmd::Eval(a) => eval::run(&cli.gpu, a),
        Cmd::Quickstart(a) => quickstart::run(&cli.gpu, a),
        Cmd::Serve(a) => serve::run(a),
        Cmd::Selftest(a) => selftest::run(&cli.gpu, a),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_line(&e));
            1
        }
    }
}

/// An error as one line: its message, then each cause not already in it (see
/// [`medfastsam::error::report`]), so that nothing is said twice.
pub fn error_line(e: &anyhow::Error) -> String {
    medfastsam::error::report(e.as_ref())
}
