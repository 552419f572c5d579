//! SIGTERM, SIGINT and SIGHUP as futures the main loop awaits like any other event, through smol's
//! `async-signal`: its handler only writes the signal's number to a socket that the executor watches.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use async_signal::{Signal, Signals};
use smol::stream::StreamExt as _;

/// Resolves on the first SIGTERM or SIGINT. The handlers are installed when this is called, not when the future
/// is first polled, so a signal in between is not lost.
pub fn shutdown() -> io::Result<impl Future<Output = ()>> {
    let signals = Signals::new([Signal::Term, Signal::Int])?;
    Ok(async move {
        match (&signals).next().await {
            Some(Ok(_)) => log::info!("signal received: stopping"),
            // The socket behind the handler broke, which does not happen in practice. Stopping now would be a
            // stop nobody asked for: go on, and let the service manager's SIGKILL end the process if it must.
            Some(Err(e)) => {
                log::error!("SIGTERM and SIGINT can no longer be received ({e}); running on");
                std::future::pending::<()>().await;
            }
            None => std::future::pending().await,
        }
    })
}

/// SIGHUP, the request to read the config again (`systemctl reload`).
#[derive(Debug)]
pub struct Hangups {
    signals: Signals,
    /// Receiving failed once: it is not tried again, and not logged again.
    broken: AtomicBool,
}

impl Hangups {
    /// Installs the handler: from now on SIGHUP no longer ends the process.
    pub fn new() -> io::Result<Hangups> {
        Ok(Hangups { signals: Signals::new([Signal::Hup])?, broken: AtomicBool::new(false) })
    }

    /// Resolves on the next SIGHUP. Several that arrived since the last call count as one: one reload reads the
    /// file as it is now. Cancel-safe: dropped before it resolves, it takes no signal away from the next call.
    pub async fn next(&self) {
        if self.broken.load(Ordering::Relaxed) {
            return std::future::pending().await;
        }
        match (&self.signals).next().await {
            Some(Ok(_)) => {
                // Whatever else is already waiting is part of this reload; none of this awaits anything.
                while let Some(Some(Ok(_))) = smol::future::poll_once((&self.signals).next()).await {}
            }
            Some(Err(e)) => {
                log::error!("SIGHUP can no longer be received ({e}); restart the service to apply a new config");
                self.broken.store(true, Ordering::Relaxed);
                std::future::pending::<()>().await;
            }
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use smol::future::FutureExt as _;

    use super::*;

    fn raise(signal: rustix::process::Signal) {
        rustix::process::kill_process(rustix::process::getpid(), signal).expect("signalling this process");
    }

    /// Whether `f` resolves within `limit`.
    fn resolves(f: impl Future<Output = ()>, limit: Duration) -> bool {
        smol::block_on(
            async {
                f.await;
                true
            }
            .or(async {
                smol::Timer::after(limit).await;
                false
            }),
        )
    }

    /// Long enough for a signal that was sent, under any load: only a failing test waits this long.
    const SENT: Duration = Duration::from_secs(20);
    /// For a signal that was not sent: a wrong wake-up would come at once.
    const NOT_SENT: Duration = Duration::from_millis(200);

    // One test for every signal: the handlers belong to the whole test process.
    #[test]
    fn signals_wake_their_futures_and_hangups_coalesce() {
        let hangups = Hangups::new().unwrap();
        assert!(!resolves(hangups.next(), NOT_SENT), "no SIGHUP yet");
        raise(rustix::process::Signal::HUP);
        assert!(resolves(hangups.next(), SENT), "a SIGHUP wakes it");
        assert!(!resolves(hangups.next(), NOT_SENT), "once");

        // A signal sent to the process is handled on any of its threads, maybe after `kill` returned (and two
        // pending at once are one). A second listener, registered later, tells when the handler has run: it
        // writes to the listeners in the order they were registered, so once this one has the SIGHUP, `hangups`
        // has it too.
        let observer = Signals::new([Signal::Hup]).unwrap();
        let observed = || resolves(async { assert!(matches!((&observer).next().await, Some(Ok(Signal::Hup)))) }, SENT);
        for _ in 0..2 {
            raise(rustix::process::Signal::HUP);
            assert!(observed(), "the SIGHUP was handled");
        }
        assert!(resolves(hangups.next(), SENT), "two SIGHUPs waiting wake it");
        assert!(!resolves(hangups.next(), NOT_SENT), "and count as one reload");

        let stop = shutdown().unwrap();
        raise(rustix::process::Signal::TERM);
        assert!(resolves(stop, SENT), "SIGTERM stops");
        let stop = shutdown().unwrap();
        raise(rustix::process::Signal::INT);
        assert!(resolves(stop, SENT), "SIGINT stops");
    }
}
