//! A tiny std-only app for the container tests, compiled by the test itself with `rustc --target
//! x86_64-unknown-linux-musl` (static, so it runs in a `FROM scratch` image, and no cargo lock).
//!
//! `app [serve] [--message=TEXT]`: HTTP/1.1 on $LISTEN_PORT, else $PORT, else 8080, after
//! $APP_STARTUP_MS. Routes: `/` (`hello <K_REVISION> <message>`), `/env/NAME`, `/crash` (exit 3),
//! `/sick` (then `/healthz` answers 500), `/healthz`, `/touch/PATH` (creates /PATH), `/file/PATH`, `/fetch/PORT`
//! (GET 127.0.0.1:PORT/ and answer its body).
//! `app check-file PATH`: exit 0 when PATH exists (exec probes; the image has no shell).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};

static SICK: AtomicBool = AtomicBool::new(false);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("check-file") {
        let ok = args.get(1).is_some_and(|p| std::path::Path::new(p).exists());
        std::process::exit(if ok { 0 } else { 1 });
    }
    let message = args
        .iter()
        .find_map(|a| a.strip_prefix("--message="))
        .map(str::to_string)
        .or_else(|| std::env::var("APP_MESSAGE").ok())
        .unwrap_or_default();
    let port = std::env::var("LISTEN_PORT")
        .or_else(|_| std::env::var("PORT"))
        .unwrap_or_else(|_| "8080".into());
    if let Some(ms) = std::env::var("APP_STARTUP_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    let listener = TcpListener::bind(format!("0.0.0.0:{port}")).expect("bind");
    println!("listening on {port}");
    eprintln!("stderr works too");
    for stream in listener.incoming().flatten() {
        let message = message.clone();
        std::thread::spawn(move || handle(stream, &message));
    }
}

fn handle(mut stream: TcpStream, message: &str) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).map_or(true, |n| n == 0) || line == "\r\n" {
            break;
        }
    }
    let path = request_line.split(' ').nth(1).unwrap_or("/").to_string();
    let (status, body) = route(&path, message);
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.flush();
    if path == "/crash" {
        std::process::exit(3);
    }
}

fn route(path: &str, message: &str) -> (&'static str, String) {
    let revision = std::env::var("K_REVISION").unwrap_or_default();
    if path == "/" {
        return ("200 OK", format!("hello {revision} {message}"));
    }
    if path == "/crash" {
        return ("200 OK", "bye".into());
    }
    if path == "/sick" {
        SICK.store(true, Ordering::SeqCst);
        return ("200 OK", "sick".into());
    }
    if path == "/healthz" {
        return if SICK.load(Ordering::SeqCst) {
            ("500 Internal Server Error", "sick".into())
        } else {
            ("200 OK", "ok".into())
        };
    }
    if let Some(name) = path.strip_prefix("/env/") {
        return match std::env::var(name) {
            Ok(v) => ("200 OK", v),
            Err(_) => ("404 Not Found", String::new()),
        };
    }
    if let Some(file) = path.strip_prefix("/file/") {
        return match std::fs::read_to_string(format!("/{file}")) {
            Ok(text) => ("200 OK", text),
            Err(e) => ("404 Not Found", e.to_string()),
        };
    }
    if let Some(file) = path.strip_prefix("/touch/") {
        return match std::fs::write(format!("/{file}"), b"") {
            Ok(()) => ("200 OK", "touched".into()),
            Err(e) => ("500 Internal Server Error", e.to_string()),
        };
    }
    if let Some(port) = path.strip_prefix("/fetch/") {
        return match fetch(port) {
            Ok(body) => ("200 OK", body),
            Err(e) => ("502 Bad Gateway", e.to_string()),
        };
    }
    ("404 Not Found", String::new())
}

fn fetch(port: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(format!("127.0.0.1:{port}"))?;
    write!(s, "GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}
