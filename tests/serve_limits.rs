//! `medfastsam serve` against hostile clients: a request line without end, many idle
//! connections; the server must stay small (memory, threads), close what it does not serve, and
//! keep serving. Also `--port 0` prints the port actually bound. Loopback only, bounded loops.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts `serve --port 0` on a folder with an index.html; returns once the port is printed.
fn start(name: &str, extra: &[&str]) -> Server {
    let dir = std::env::temp_dir().join(format!("medfastsam-serve-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("pkg")).unwrap();
    std::fs::write(
        dir.join("index.html"),
        "<!doctype html><html><body>hello</body></html>",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_medfastsam"))
        .args(["serve", "--port", "0", "--dir", dir.to_str().unwrap()])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .split("http://127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    let server = Server { child, port, dir };
    assert_ne!(
        port, 0,
        "serve --port 0 must print the port it got: {line:?}"
    );
    server
}

fn status_field(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("no {key}"));
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap()
}

fn rss_kib(pid: u32) -> u64 {
    status_field(pid, "VmRSS:")
}

fn threads(pid: u32) -> u64 {
    status_field(pid, "Threads:")
}

fn get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf
}

/// Sends `n` bytes of `b` (no line end), as far as the server takes them; then reads the answer.
/// Returns (bytes sent, answer or the read error).
fn flood(port: u16, prefix: &[u8], b: u8, n: usize) -> (usize, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(prefix);
    let chunk = vec![b; 64 * 1024];
    let mut sent = 0;
    while sent < n {
        match s.write(&chunk[..chunk.len().min(n - sent)]) {
            Ok(k) => sent += k,
            Err(_) => break,
        }
    }
    let mut buf = Vec::new();
    let answer = match s.read_to_end(&mut buf) {
        Ok(_) => String::from_utf8_lossy(&buf).into_owned(),
        Err(e) if !buf.is_empty() => format!("{}[then {e}]", String::from_utf8_lossy(&buf)),
        Err(e) => format!("[read error: {e}]"),
    };
    (sent, answer)
}

#[test]
fn port_zero_prints_the_bound_port_and_serves() {
    let srv = start("port0", &[]);
    let r = get(srv.port, "/");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains("hello"));
}

#[test]
fn long_request_line_and_headers_are_refused_without_growing_the_server() {
    let srv = start("long", &[]);
    let pid = srv.child.id();
    assert!(get(srv.port, "/").starts_with("HTTP/1.1 200"));
    let before = rss_kib(pid);

    // A little more than the line bound: the answer is 414 and the connection is closed.
    let (_, a) = flood(srv.port, b"GET /", b'a', 64 * 1024);
    assert!(a.starts_with("HTTP/1.1 414"), "long request line: {a}");
    // Headers beyond 64 KiB in all (each line short): 431.
    let mut many = b"GET / HTTP/1.1\r\n".to_vec();
    for i in 0..2000 {
        many.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "v".repeat(40)).as_bytes());
    }
    let (_, a) = flood(srv.port, &many, b'x', 0);
    assert!(a.starts_with("HTTP/1.1 431"), "large headers: {a}");

    // 48 MiB without a line end (before: the server kept all of it, and more).
    let (sent, _) = flood(srv.port, b"GET /", b'a', 48 << 20);
    std::thread::sleep(Duration::from_millis(300));
    let after = rss_kib(pid);
    assert!(
        after < before + 8 * 1024,
        "server RSS grew from {before} KiB to {after} KiB after a {sent}-byte request line"
    );
    assert!(
        get(srv.port, "/").starts_with("HTTP/1.1 200"),
        "server no longer serves"
    );
}

#[test]
fn idle_connections_are_capped_and_timed_out() {
    let srv = start("idle", &["--timeout-ms", "1000", "--max-connections", "16"]);
    let pid = srv.child.id();
    let base = threads(pid);
    let t0 = Instant::now();
    let mut conns: Vec<TcpStream> = (0..200)
        .map(|_| {
            let s = TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let busy = threads(pid);
    assert!(
        busy <= base + 16 + 2,
        "{busy} threads for 200 idle connections (cap 16, {base} at rest)"
    );

    // Every connection ends: the refused ones at once (503), the served ones at the timeout (408).
    let (mut refused, mut timed_out) = (0, 0);
    for s in conns.iter_mut() {
        let mut buf = String::new();
        match s.read_to_string(&mut buf) {
            Ok(_) => {}
            Err(e) => panic!("connection still open after {:?}: {e}", t0.elapsed()),
        }
        if buf.starts_with("HTTP/1.1 503") {
            refused += 1;
        } else if buf.starts_with("HTTP/1.1 408") {
            timed_out += 1;
        } else {
            panic!("unexpected answer to an idle connection: {buf:?}");
        }
    }
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "idle connections held {:?}",
        t0.elapsed()
    );
    assert_eq!(refused + timed_out, 200);
    assert!(timed_out <= 16, "{timed_out} served at once, cap 16");
    drop(conns);

    std::thread::sleep(Duration::from_millis(300));
    let rest = threads(pid);
    assert!(
        rest <= base + 1,
        "{rest} threads after every connection closed ({base} before)"
    );
    let r = get(srv.port, "/");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

#[test]
fn slow_request_is_cut_at_the_deadline() {
    // One byte every 200 ms never completes a request: the whole request, not each read, is timed.
    let srv = start("slow", &["--timeout-ms", "800"]);
    let mut s = TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let t0 = Instant::now();
    let mut got = Vec::new();
    while t0.elapsed() < Duration::from_secs(5) {
        if s.write_all(b"a").is_err() {
            break;
        }
        let mut buf = [0u8; 256];
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let got = String::from_utf8_lossy(&got);
    assert!(
        got.starts_with("HTTP/1.1 408"),
        "after {:?}: {got:?}",
        t0.elapsed()
    );
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "slow request held {:?}",
        t0.elapsed()
    );
}
