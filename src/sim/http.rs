//! A minimal HTTP/1.1 server for the simulators: one thread per connection, `Connection: close`, and the
//! faults real networks have (dropped connections, stalls, refused connections).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A parsed request.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// What the handler wants done with a request.
#[derive(Debug, Clone)]
pub enum Reply {
    Respond {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Close the connection without answering.
    Drop,
    /// Wait, then close without answering (a hung peer; the client's timeout must fire).
    Stall(Duration),
}

impl Reply {
    pub fn json(status: u16, body: &serde_json::Value) -> Reply {
        Reply::Respond {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
        }
    }

    /// An HTML page, as a captive portal or a login page sends.
    pub fn html(status: u16, body: &str) -> Reply {
        Reply::Respond {
            status,
            headers: vec![("Content-Type".into(), "text/html; charset=utf-8".into())],
            body: body.as_bytes().to_vec(),
        }
    }

    /// A redirect to `location`, with the small HTML body servers usually add.
    pub fn redirect(status: u16, location: &str) -> Reply {
        Reply::html(status, &format!("<html><body>Moved to <a href=\"{location}\">here</a></body></html>"))
            .with_header("Location", location)
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Reply {
        if let Reply::Respond { headers, .. } = &mut self {
            headers.push((name.into(), value.into()));
        }
        self
    }
}

type Handler = Arc<dyn Fn(&Request) -> Reply + Send + Sync>;

/// A running server; stops when dropped.
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    refusing: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds 127.0.0.1 on a free port and serves `handler` until dropped.
    pub fn start(handler: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> std::io::Result<Server> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let refusing = Arc::new(AtomicBool::new(false));
        let handler: Handler = Arc::new(handler);
        let (s, r) = (stop.clone(), refusing.clone());
        let thread = std::thread::spawn(move || accept_loop(listener, addr, handler, s, r));
        Ok(Server { addr, stop, refusing, thread: Some(thread) })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// While set, the port is closed: connections are refused, as when the peer is down.
    pub fn refuse_connections(&self, on: bool) {
        self.refusing.store(on, Ordering::SeqCst);
        // Give the accept loop time to close or reopen the port before the caller goes on.
        std::thread::sleep(Duration::from_millis(30));
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    handler: Handler,
    stop: Arc<AtomicBool>,
    refusing: Arc<AtomicBool>,
) {
    let mut listener = Some(listener);
    if let Some(l) = &listener {
        let _ = l.set_nonblocking(true);
    }
    let live: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
    while !stop.load(Ordering::SeqCst) {
        if refusing.load(Ordering::SeqCst) {
            listener = None;
        } else if listener.is_none() {
            // Rebind the same port (std sets SO_REUSEADDR on Unix).
            listener = TcpListener::bind(addr).ok();
            if let Some(l) = &listener {
                let _ = l.set_nonblocking(true);
            }
        }
        match listener.as_ref().map(|l| l.accept()) {
            Some(Ok((stream, _))) => {
                let h = handler.clone();
                let t = std::thread::spawn(move || {
                    let _ = serve(stream, &h);
                });
                let mut live = live.lock().unwrap_or_else(|e| e.into_inner());
                live.retain(|t| !t.is_finished());
                live.push(t);
            }
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

fn serve(stream: TcpStream, handler: &Handler) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(());
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let path = parts.next().unwrap_or_default().to_owned();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    let len = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    let request = Request { method, path, headers, body };
    let mut stream = stream;
    match handler(&request) {
        Reply::Respond { status, headers, body } => {
            let mut head = format!(
                "HTTP/1.1 {status} {}\r\nContent-Length: {}\r\nConnection: close\r\n",
                reason(status),
                body.len()
            );
            for (k, v) in headers {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            stream.write_all(head.as_bytes())?;
            stream.write_all(&body)?;
            stream.flush()?;
        }
        Reply::Drop => {}
        Reply::Stall(d) => std::thread::sleep(d),
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    Ok(())
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}
