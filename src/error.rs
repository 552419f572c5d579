//! What the hand-written error enums share: [`Cause`], a wrapped error that keeps the chain while the enums stay
//! cloneable and comparable, and [`describe`], the one line an error and its causes are reported as.

use std::error::Error;
use std::sync::Arc;

/// The error behind one of ours, reachable through `source()`. Shared rather than owned so that the enums that
/// carry one can still be cloned (a page outcome is kept and logged) and compared (tests compare outcomes); two
/// causes are equal when they say the same.
#[derive(Clone)]
pub struct Cause(Arc<dyn Error + Send + Sync + 'static>);

impl Cause {
    pub fn new(error: impl Error + Send + Sync + 'static) -> Cause {
        Cause(Arc::new(error))
    }

    /// The wrapped error, for `source()`.
    pub fn get(&self) -> &(dyn Error + 'static) {
        &*self.0
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::fmt::Debug for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl PartialEq for Cause {
    fn eq(&self, other: &Cause) -> bool {
        self.to_string() == other.to_string()
    }
}

impl Eq for Cause {}

/// An error and its causes on one line, each said once: `outer: cause: its cause`.
///
/// Our messages often quote the error they wrap (`reading ca_file …: No such file or directory`) and return it as
/// `source()` as well, so that code can inspect it. anyhow's `{:#}` would then print the quoted text twice; this
/// leaves out a cause whose text the line already holds.
pub fn describe(error: &(dyn Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        next = cause.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrapping(&'static str, Option<Cause>);

    impl std::fmt::Display for Wrapping {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl Error for Wrapping {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_ref().map(Cause::get)
        }
    }

    #[test]
    fn each_cause_is_said_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let quoting = Wrapping("reading ca_file /x: no such file", Some(Cause::new(io)));
        let outer = Wrapping("setting up HTTP", Some(Cause::new(quoting)));
        assert_eq!(describe(&outer), "setting up HTTP: reading ca_file /x: no such file");
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let terse = Wrapping("reading ca_file /x", Some(Cause::new(io)));
        assert_eq!(describe(&terse), "reading ca_file /x: no such file");
        let anyhow = anyhow::Error::new(Wrapping("locked", None)).context("opening queue");
        assert_eq!(describe(anyhow.as_ref()), "opening queue: locked");
        assert_eq!(format!("{anyhow:#}"), "opening queue: locked");
    }

    #[test]
    fn causes_compare_by_what_they_say() {
        let a = Cause::new(std::io::Error::other("x"));
        assert_eq!(a.clone(), Cause::new(std::io::Error::other("x")));
        assert_ne!(a, Cause::new(std::io::Error::other("y")));
        assert_eq!(a.get().to_string(), "x");
    }
}
