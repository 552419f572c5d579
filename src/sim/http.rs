//! A minimal HTTP/1.1 server for the simulators: one thread per connection, `Connection: close`, and the
//! faults real networks have (dropped connections, stalls, refused connections).
//!
//! It acknowledges what tests wait for, so that no test has to sleep and hope: a refused or reopened port is
//! in effect when [`Server::refuse_connections`] returns, [`Server::settle`] returns once every connection
//! that reached the port has been answered, and a [`Gate`] holds requests until the test lets them go.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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

/// The longest a held request waits for [`Gate::release`]: a test that fails before releasing its gate must not
/// leave the connection's thread waiting for ever.
const HOLD_LIMIT: Duration = Duration::from_secs(120);

/// How long [`Server::refuse_connections`] waits for the accept loop to close or reopen the port.
const PORT_LIMIT: Duration = Duration::from_secs(10);

/// Requests held until the test releases them: a stalled peer whose stall ends when the test says so, not
/// after a guessed time. [`Gate::held`] says how many are waiting.
#[derive(Default)]
pub struct Gate {
    state: Mutex<GateState>,
    released: Condvar,
}

#[derive(Default)]
struct GateState {
    held: usize,
    /// Bumped by each release: a request waits until it changes.
    releases: u64,
}

impl Gate {
    /// Holds the calling request until the next [`Gate::release`] (or [`HOLD_LIMIT`]).
    pub fn hold(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.held += 1;
        let (ticket, deadline) = (st.releases, Instant::now() + HOLD_LIMIT);
        while st.releases == ticket {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else { break };
            st = self.released.wait_timeout(st, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        st.held -= 1;
    }

    /// Requests waiting in [`Gate::hold`] now.
    pub fn held(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).held
    }

    /// Lets every held request go on.
    pub fn release(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).releases += 1;
        self.released.notify_all();
    }
}

/// What the accept loop has done, for [`Server::settle`] and [`Server::refuse_connections`].
#[derive(Default)]
struct Progress {
    /// Connections accepted, and connections whose request was read and answered (or that closed early).
    accepted: AtomicU64,
    finished: AtomicU64,
    /// Times the accept loop found no connection waiting (or the port closed): after such a sweep, every
    /// connection made before it began has been accepted.
    sweeps: AtomicU64,
    /// The port as the accept loop last left it: closed (refusing) or open.
    closed: AtomicBool,
}

/// A running server; stops when dropped.
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    refusing: Arc<AtomicBool>,
    progress: Arc<Progress>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds 127.0.0.1 on a free port and serves `handler` until dropped.
    pub fn start(handler: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> std::io::Result<Server> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let refusing = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Progress::default());
        let handler: Handler = Arc::new(handler);
        let (s, r, p) = (stop.clone(), refusing.clone(), progress.clone());
        let thread = std::thread::spawn(move || accept_loop(listener, addr, handler, s, r, p));
        Ok(Server { addr, stop, refusing, progress, thread: Some(thread) })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// While set, the port is closed: connections are refused, as when the peer is down. Returns once the
    /// accept loop has closed or reopened the port (it gives up waiting after [`PORT_LIMIT`]).
    pub fn refuse_connections(&self, on: bool) {
        self.refusing.store(on, Ordering::SeqCst);
        let deadline = Instant::now() + PORT_LIMIT;
        while self.progress.closed.load(Ordering::SeqCst) != on && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits until every connection that reached the port before this call has been read and answered, held
    /// and slow answers included; at most `limit`. Says whether it got there. With the client gone (a killed
    /// agent), nothing it sent is still on its way after this.
    pub fn settle(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let p = &self.progress;
        // The sweep that ends a backlog check begun after this call is at least the second one from now.
        let sweep = p.sweeps.load(Ordering::SeqCst) + 2;
        while Instant::now() < deadline {
            let swept = p.sweeps.load(Ordering::SeqCst) >= sweep;
            if swept && p.finished.load(Ordering::SeqCst) == p.accepted.load(Ordering::SeqCst) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
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
    progress: Arc<Progress>,
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
        progress.closed.store(listener.is_none(), Ordering::SeqCst);
        match listener.as_ref().map(|l| l.accept()) {
            Some(Ok((stream, _))) => {
                progress.accepted.fetch_add(1, Ordering::SeqCst);
                let (h, done) = (handler.clone(), Finished(progress.clone()));
                let t = std::thread::spawn(move || {
                    let _ = serve(stream, &h);
                    drop(done);
                });
                let mut live = live.lock().unwrap_or_else(|e| e.into_inner());
                live.retain(|t| !t.is_finished());
                live.push(t);
            }
            Some(Err(e)) if e.kind() != std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(2)),
            // Nothing waiting to be accepted, or the port is closed: a sweep.
            _ => {
                progress.sweeps.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

/// Counts a connection as finished when its thread ends, however it ends.
struct Finished(Arc<Progress>);

impl Drop for Finished {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::SeqCst);
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
