//! `medfastsam serve`: serves the web page (`web/`, with the wasm build in `web/pkg`) on
//! 127.0.0.1 only, with a Content-Security-Policy that allows nothing but the page's own origin.

use clap::Args;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};

#[derive(Args)]
pub struct ServeArgs {
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Folder to serve (default: ./web, else the web/ folder of the source tree).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// The same policy as the page's own `<meta>` tag, also sent as a header.
pub const CSP: &str = "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; worker-src 'self' blob:; \
connect-src 'self'; img-src 'self' blob: data:; style-src 'self'; font-src 'none'; media-src 'none'; \
object-src 'none'; frame-src 'none'; manifest-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn mime(p: &Path) -> &'static str {
    match p.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "wasm" => "application/wasm",
        "css" => "text/css; charset=utf-8",
        "json" => "application/json",
        "png" => "image/png",
        "svg" => "image/svg+xml",
        "ico" => "image/x-icon",
        "txt" | "md" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// Maps a request path to a file under `root`, refusing anything that leaves it.
pub fn resolve(root: &Path, url: &str) -> Option<PathBuf> {
    let path = url.split(['?', '#']).next().unwrap_or("/");
    let mut out = root.to_path_buf();
    for c in Path::new(path.trim_start_matches('/')).components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            _ => return None,
        }
    }
    if out.is_dir() {
        out.push("index.html");
    }
    out.is_file().then_some(out)
}

fn respond(mut s: TcpStream, root: &Path) -> std::io::Result<()> {
    let mut reader = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    // Drain the headers.
    let mut h = String::new();
    while reader.read_line(&mut h)? > 2 {
        h.clear();
    }
    let mut parts = line.split_whitespace();
    let (method, url) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    let head = method == "HEAD";
    if method != "GET" && !head {
        return write!(s, "HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    }
    match resolve(root, url).and_then(|p| std::fs::read(&p).ok().map(|b| (p, b))) {
        Some((p, body)) => {
            write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {}\r\nContent-Security-Policy: {CSP}\r\n\
                 X-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\nCache-Control: no-cache\r\n\
                 Connection: close\r\n\r\n",
                mime(&p),
                body.len()
            )?;
            if !head {
                s.write_all(&body)?;
            }
            Ok(())
        }
        None => write!(s, "HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found"),
    }
}

pub fn run(a: &ServeArgs) -> anyhow::Result<i32> {
    let root = match &a.dir {
        Some(d) => d.clone(),
        None if Path::new("web/index.html").exists() => PathBuf::from("web"),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("web"),
    };
    if !root.join("index.html").exists() {
        anyhow::bail!("{}: no index.html (run from the repository, or pass --dir)", root.display());
    }
    if !root.join("pkg").exists() {
        eprintln!("note: {}/pkg is missing: build the wasm module first with `bash web/build.sh`", root.display());
    }
    let listener = TcpListener::bind(("127.0.0.1", a.port)).map_err(|e| anyhow::anyhow!("127.0.0.1:{}: {e}", a.port))?;
    println!("serving {} on http://127.0.0.1:{}/ (this machine only; Ctrl-C to stop)", root.display(), a.port);
    for conn in listener.incoming() {
        let Ok(s) = conn else { continue };
        let root = root.clone();
        std::thread::spawn(move || {
            let _ = respond(s, &root);
        });
    }
    Ok(0)
}
