//! `medfastsam serve`: serves the web page (`web/`, with the wasm build in `web/pkg`) on
//! 127.0.0.1 only, with a Content-Security-Policy that allows nothing but the page's own origin.
//!
//! Hostile or careless clients cannot exhaust the machine: a request line is at most
//! [`MAX_LINE`] bytes and the headers [`MAX_HEADERS`] in all (414 / 431 beyond, then the
//! connection is closed); a request must arrive within the timeout (10 s; 408 after) and a
//! response is written under the same timeout; at most `--max-connections` (64) connections are
//! served at once, one thread each, and any beyond get 503 at once.

use clap::Args;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct ServeArgs {
    /// Port on 127.0.0.1 (0: any free port; the one chosen is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Folder to serve (default: ./web, else the web/ folder of the source tree).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Milliseconds a client has to send its request, and for each write of the response.
    #[arg(long, default_value_t = 10_000, hide = true)]
    pub timeout_ms: u64,
    /// Connections served at once; beyond, 503.
    #[arg(long, default_value_t = 64, hide = true)]
    pub max_connections: usize,
}

/// Longest request line accepted (bytes, with its line end).
pub const MAX_LINE: usize = 8 * 1024;
/// Most header bytes accepted, all lines together.
pub const MAX_HEADERS: usize = 64 * 1024;
/// At most this much of a refused request is read (and discarded) before closing, so that the
/// client receives the error status instead of a reset; bounded in bytes and time.
const DRAIN_BYTES: u64 = 256 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(1);

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

/// Why a request was refused before it was read whole.
#[derive(Debug)]
enum Refusal {
    /// Request line longer than [`MAX_LINE`].
    LineTooLong,
    /// Headers longer than [`MAX_HEADERS`] in all.
    HeadersTooLarge,
    /// Not complete within the timeout.
    Timeout,
    /// Closed early, or not text.
    Malformed,
}

impl Refusal {
    fn status(&self) -> &'static str {
        match self {
            Refusal::LineTooLong => "414 URI Too Long",
            Refusal::HeadersTooLarge => "431 Request Header Fields Too Large",
            Refusal::Timeout => "408 Request Timeout",
            Refusal::Malformed => "400 Bad Request",
        }
    }
}

/// Reads one line (up to and including `\n`) into `out`, reading at most `limit` bytes; the
/// socket's read timeout is set to what is left until `deadline` before each read.
fn read_line_bounded(
    reader: &mut BufReader<TcpStream>,
    out: &mut Vec<u8>,
    limit: usize,
    deadline: Instant,
    too_long: Refusal,
) -> Result<(), Refusal> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Refusal::Timeout);
        }
        reader
            .get_ref()
            .set_read_timeout(Some(left))
            .map_err(|_| Refusal::Malformed)?;
        let buf = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Refusal::Timeout);
            }
            Err(_) => return Err(Refusal::Malformed),
        };
        if buf.is_empty() {
            return Err(Refusal::Malformed);
        }
        let room = limit - out.len();
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) if i < room => (i + 1, true),
            _ => (buf.len().min(room), false),
        };
        out.extend_from_slice(&buf[..take]);
        reader.consume(take);
        if done {
            return Ok(());
        }
        if out.len() >= limit {
            return Err(too_long);
        }
    }
}

/// Reads the request line and the headers within the bounds; returns the request line.
fn read_request(reader: &mut BufReader<TcpStream>, timeout: Duration) -> Result<String, Refusal> {
    let deadline = Instant::now() + timeout;
    let mut line = Vec::with_capacity(256);
    read_line_bounded(reader, &mut line, MAX_LINE, deadline, Refusal::LineTooLong)?;
    let mut total = 0usize;
    let mut h = Vec::with_capacity(256);
    loop {
        h.clear();
        read_line_bounded(
            reader,
            &mut h,
            MAX_HEADERS - total,
            deadline,
            Refusal::HeadersTooLarge,
        )?;
        total += h.len();
        if h == b"\r\n" || h == b"\n" {
            break;
        }
        if total >= MAX_HEADERS {
            return Err(Refusal::HeadersTooLarge);
        }
    }
    String::from_utf8(line).map_err(|_| Refusal::Malformed)
}

/// Answers a refused request, then reads (a bounded amount of) what the client still sends so
/// that closing does not reset the connection before the answer arrives.
fn refuse(mut s: TcpStream, reader: BufReader<TcpStream>, r: &Refusal) {
    let _ = write!(
        s,
        "HTTP/1.1 {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        r.status()
    );
    let _ = s.flush();
    let _ = s.shutdown(Shutdown::Write);
    let _ = s.set_read_timeout(Some(DRAIN_TIME));
    let end = Instant::now() + DRAIN_TIME;
    let mut rest = reader.into_inner().take(DRAIN_BYTES);
    let mut sink = [0u8; 8192];
    while Instant::now() < end {
        match rest.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

fn respond(s: TcpStream, root: &Path, timeout: Duration) -> std::io::Result<()> {
    s.set_write_timeout(Some(timeout))?;
    let mut reader = BufReader::new(s.try_clone()?);
    let line = match read_request(&mut reader, timeout) {
        Ok(l) => l,
        Err(r) => {
            refuse(s, reader, &r);
            return Ok(());
        }
    };
    let mut s = s;
    let mut parts = line.split_whitespace();
    let (method, url) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    let head = method == "HEAD";
    if method != "GET" && !head {
        return write!(
            s,
            "HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
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
        None => write!(
            s,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found"
        ),
    }
}

/// Counts a served connection for as long as it lives.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub fn run(a: &ServeArgs) -> anyhow::Result<i32> {
    let root = match &a.dir {
        Some(d) => d.clone(),
        None if Path::new("web/index.html").exists() => PathBuf::from("web"),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("web"),
    };
    if !root.join("index.html").exists() {
        anyhow::bail!(
            "{}: no index.html (run from the repository, or pass --dir)",
            root.display()
        );
    }
    if a.max_connections == 0 || a.timeout_ms == 0 {
        anyhow::bail!("--max-connections and --timeout-ms must be at least 1");
    }
    if !root.join("pkg").exists() {
        eprintln!(
            "note: {}/pkg is missing: build the wasm module first with `bash web/build.sh`",
            root.display()
        );
    }
    let listener = TcpListener::bind(("127.0.0.1", a.port))
        .map_err(|e| anyhow::anyhow!("127.0.0.1:{}: {e}", a.port))?;
    let port = listener
        .local_addr()
        .map_err(|e| anyhow::anyhow!("127.0.0.1:{}: {e}", a.port))?
        .port();
    println!(
        "serving {} on http://127.0.0.1:{port}/ (this machine only; Ctrl-C to stop)",
        root.display()
    );
    let timeout = Duration::from_millis(a.timeout_ms);
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let mut s = match conn {
            Ok(s) => s,
            Err(_) => {
                // Out of descriptors or similar: back off instead of spinning.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= a.max_connections {
            active.fetch_sub(1, Ordering::SeqCst);
            let _ = s.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = write!(
                s,
                "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            continue;
        }
        let slot = Slot(active.clone());
        let root = root.clone();
        let spawned = std::thread::Builder::new()
            .name("serve-conn".into())
            .spawn(move || {
                let _slot = slot;
                let _ = respond(s, &root, timeout);
            });
        if spawned.is_err() {
            // The closure (and with it the slot and the connection) was dropped.
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(0)
}
