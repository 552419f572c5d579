//! The systemd notification protocol (`sd_notify(3)`): `READY=1` once the queue is open, `WATCHDOG=1` from the
//! main loop's turns, a one-line `STATUS=`, and `STOPPING=1` at shutdown. Each is a datagram to the Unix socket
//! that `$NOTIFY_SOCKET` names (a path, or `@name` for an abstract socket); without it every call does nothing.
//!
//! Hand-written rather than taken from a crate: std has the datagram socket and abstract addresses, so the protocol
//! is a few safe lines with no `libc`, and the part that needs thought (when to ping, how long the loop may sleep,
//! when `STATUS=` may change) is ours either way. Every method takes the time from its caller.

use std::ffi::OsStr;
use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

/// `STATUS=` is sent at most this often, and only when its text changed.
pub const STATUS_EVERY: Duration = Duration::from_secs(5);

/// The longest `STATUS=` line, in characters: `systemctl status` shows it on one line.
const STATUS_MAX: usize = 240;

/// The service manager's end of the protocol, or nothing when the process was not started with `NOTIFY_SOCKET`.
#[derive(Debug)]
pub struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
    /// Half of `WATCHDOG_USEC`: the longest time between two pings, as `sd_watchdog_enabled(3)` advises.
    ping_every: Option<Duration>,
    /// When the next ping is due; `None` before the first.
    next_ping: Option<Instant>,
    /// The `STATUS=` text last sent, and when the next may be.
    status: String,
    next_status: Option<Instant>,
    stopping: bool,
    /// A send failed once: said in the log once, not at every ping.
    warned: bool,
}

impl Notifier {
    /// A notifier that sends nothing: for runs that are not a service (tests, `demo`).
    pub fn disabled() -> Notifier {
        Notifier {
            socket: None,
            ping_every: None,
            next_ping: None,
            status: String::new(),
            next_status: None,
            stopping: false,
            warned: false,
        }
    }

    /// From the environment systemd sets for a `Type=notify` service: `NOTIFY_SOCKET`, and for `WatchdogSec=`
    /// `WATCHDOG_USEC` and `WATCHDOG_PID`.
    pub fn from_env() -> Notifier {
        let var = std::env::var_os;
        Notifier::from_vars(
            var("NOTIFY_SOCKET").as_deref(),
            var("WATCHDOG_USEC").as_deref(),
            var("WATCHDOG_PID").as_deref(),
            std::process::id(),
        )
    }

    /// [`Notifier::from_env`] with the variables as parameters. The watchdog is on only with a socket, a
    /// `WATCHDOG_USEC` above zero, and a `WATCHDOG_PID` that is absent or `pid` (it may be meant for a parent).
    /// A socket name that is neither an absolute path nor `@name` is ignored, as `sd_notify(3)` does.
    pub fn from_vars(socket: Option<&OsStr>, usec: Option<&OsStr>, watchdog_pid: Option<&OsStr>, pid: u32) -> Notifier {
        let mut n = Notifier::disabled();
        let Some(name) = socket.filter(|s| !s.is_empty()) else { return n };
        let addr = match name.as_bytes() {
            [b'@', abstract_name @ ..] => SocketAddr::from_abstract_name(abstract_name),
            [b'/', ..] => SocketAddr::from_pathname(name),
            _ => {
                log::warn!(
                    "NOTIFY_SOCKET={name:?} is neither an absolute path nor @name; not telling systemd anything"
                );
                return n;
            }
        };
        // A manager that does not read (its queue full) holds a send up to a second, then the message is dropped:
        // the loop may slow down, but never stops for it.
        let opened = addr.and_then(|addr| {
            let socket = UnixDatagram::unbound()?;
            socket.set_write_timeout(Some(Duration::from_secs(1)))?;
            Ok((socket, addr))
        });
        match opened {
            Ok(s) => n.socket = Some(s),
            Err(e) => {
                log::warn!("cannot use NOTIFY_SOCKET={name:?} ({e}); not telling systemd anything");
                return n;
            }
        }
        let ours = watchdog_pid.is_none_or(|p| p.to_str().and_then(|p| p.parse::<u32>().ok()) == Some(pid));
        let usec = usec.and_then(|u| u.to_str()?.parse::<u64>().ok()).filter(|&u| u > 0);
        n.ping_every = usec.filter(|_| ours).map(|u| Duration::from_micros(u) / 2);
        n
    }

    /// Whether a service manager listens.
    pub fn is_active(&self) -> bool {
        self.socket.is_some()
    }

    /// How often the watchdog must be pinged, when it is on.
    pub fn ping_every(&self) -> Option<Duration> {
        self.ping_every
    }

    /// Start-up is over: the instance lock is held and the queue is open.
    pub fn ready(&mut self) {
        self.send("READY=1");
    }

    /// The process is stopping; sent once, however often it is called.
    pub fn stopping(&mut self) {
        if !std::mem::replace(&mut self.stopping, true) {
            self.send("STOPPING=1");
        }
    }

    /// A turn of the loop: pings the watchdog when a ping is due.
    pub fn on_turn(&mut self, now: Instant) {
        let Some(every) = self.ping_every else { return };
        if self.next_ping.is_none_or(|due| now >= due) {
            self.send("WATCHDOG=1");
            self.next_ping = Some(now + every);
        }
    }

    /// `wake`, or earlier if the watchdog is due before it: the loop must turn at least that often.
    pub fn wake_by(&self, wake: Instant) -> Instant {
        match self.next_ping {
            Some(due) if self.ping_every.is_some() => wake.min(due),
            _ => wake,
        }
    }

    /// Whether a new `STATUS=` may be sent now (the caller then gathers the line and calls [`Notifier::status`]).
    pub fn status_due(&self, now: Instant) -> bool {
        self.is_active() && self.next_status.is_none_or(|due| now >= due)
    }

    /// Sends `STATUS=line` if it differs from the last one. Control characters become spaces, and a long line is
    /// cut, since the protocol's assignments are one per line.
    pub fn status(&mut self, now: Instant, line: &str) {
        self.next_status = Some(now + STATUS_EVERY);
        let line = crate::http::printable(line, STATUS_MAX);
        if line != self.status {
            self.send(&format!("STATUS={line}"));
            self.status = line;
        }
    }

    fn send(&mut self, message: &str) {
        let Some((socket, addr)) = &self.socket else { return };
        if let Err(e) = socket.send_to_addr(message.as_bytes(), addr)
            && !std::mem::replace(&mut self.warned, true)
        {
            log::warn!("telling systemd {message:?} failed: {e}; the watchdog may restart the service");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt as _;

    use super::*;

    /// A socket in a temp dir playing systemd, and a notifier pointed at it.
    fn listening(usec: Option<&str>, pid: Option<&str>) -> (tempfile::TempDir, UnixDatagram, Notifier) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let os = |s: &str| OsString::from(s);
        let n = Notifier::from_vars(Some(path.as_os_str()), usec.map(os).as_deref(), pid.map(os).as_deref(), 42);
        (dir, listener, n)
    }

    /// Every datagram waiting on `listener`.
    fn received(listener: &UnixDatagram) -> Vec<String> {
        let mut buf = [0u8; 1024];
        let mut out = Vec::new();
        while let Ok(n) = listener.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    }

    #[test]
    fn ready_status_and_stopping_reach_a_path_socket() {
        let (_dir, listener, mut n) = listening(None, None);
        assert!(n.is_active() && n.ping_every().is_none());
        let t0 = Instant::now();
        n.ready();
        assert!(n.status_due(t0));
        n.status(t0, "3 records queued\nsecond line");
        n.stopping();
        n.stopping();
        assert_eq!(received(&listener), ["READY=1", "STATUS=3 records queued second line", "STOPPING=1"]);
    }

    #[test]
    fn an_abstract_socket_is_named_with_an_at_sign() {
        let name = format!("mimecast-forwarder-test-{}", std::process::id());
        let listener = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        listener.set_nonblocking(true).unwrap();
        let mut n = Notifier::from_vars(Some(OsStr::new(&format!("@{name}"))), None, None, 1);
        n.ready();
        assert_eq!(received(&listener), ["READY=1"]);
    }

    #[test]
    fn nothing_is_sent_without_a_usable_socket() {
        for socket in [None, Some(""), Some("relative/path")] {
            let mut n = Notifier::from_vars(socket.map(OsStr::new), Some(OsStr::new("1000000")), None, 1);
            assert!(!n.is_active() && n.ping_every().is_none(), "{socket:?}");
            let t0 = Instant::now();
            assert!(!n.status_due(t0));
            n.on_turn(t0);
            assert_eq!(n.wake_by(t0 + Duration::from_secs(600)), t0 + Duration::from_secs(600));
        }
        // A socket that nobody listens on: the sends fail, quietly after the first warning, and nothing panics.
        let mut n = Notifier::from_vars(Some(OsStr::new("/nonexistent/notify")), None, None, 1);
        n.ready();
        n.ready();
        // Bytes that are not UTF-8 are a valid name too.
        let odd = OsString::from_vec(b"/nonexistent/\xff".to_vec());
        assert!(Notifier::from_vars(Some(&odd), None, None, 1).is_active());
    }

    #[test]
    fn the_watchdog_is_ours_only_for_our_pid_and_a_positive_usec() {
        let check = |usec: Option<&str>, pid: Option<&str>, expected: Option<Duration>| {
            let (_dir, _listener, n) = listening(usec, pid);
            assert_eq!(n.ping_every(), expected, "{usec:?} {pid:?}");
        };
        check(Some("60000000"), None, Some(Duration::from_secs(30)));
        check(Some("60000000"), Some("42"), Some(Duration::from_secs(30)));
        check(Some("60000000"), Some("43"), None);
        check(Some("60000000"), Some("x"), None);
        check(Some("0"), None, None);
        check(Some("-5"), None, None);
        check(Some("soon"), None, None);
        check(None, Some("42"), None);
    }

    #[test]
    fn pings_are_due_every_half_interval_and_bound_the_loops_sleep() {
        let (_dir, listener, mut n) = listening(Some("2000000"), None);
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let far = t0 + s(600);
        n.on_turn(t0);
        assert_eq!(received(&listener), ["WATCHDOG=1"]);
        assert_eq!(n.wake_by(far), t0 + s(1));
        assert_eq!(n.wake_by(t0 + Duration::from_millis(300)), t0 + Duration::from_millis(300));
        // Busy turns in between send nothing.
        n.on_turn(t0 + Duration::from_millis(999));
        assert_eq!(received(&listener), Vec::<String>::new());
        n.on_turn(t0 + s(1));
        assert_eq!(received(&listener), ["WATCHDOG=1"]);
        assert_eq!(n.wake_by(far), t0 + s(2));
    }

    #[test]
    fn status_is_sent_when_it_changes_and_at_most_every_few_seconds() {
        let (_dir, listener, mut n) = listening(None, None);
        let t0 = Instant::now();
        n.status(t0, "a");
        assert!(!n.status_due(t0 + STATUS_EVERY - Duration::from_millis(1)));
        assert!(n.status_due(t0 + STATUS_EVERY));
        n.status(t0 + STATUS_EVERY, "a");
        n.status(t0 + 2 * STATUS_EVERY, "b");
        let long = "x".repeat(1000);
        n.status(t0 + 3 * STATUS_EVERY, &long);
        let got = received(&listener);
        assert_eq!(got[..2], ["STATUS=a", "STATUS=b"]);
        assert_eq!(got[2], format!("STATUS={}", "x".repeat(STATUS_MAX)));
        assert_eq!(got.len(), 3);
    }
}
