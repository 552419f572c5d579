//! What an intake answer means for the batch that was sent. Pure: the whole policy is this one function.

use std::time::Duration;

/// What came back from one send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Status {
        code: u16,
        retry_after: Option<Duration>,
    },
    /// No HTTP answer: refused or dropped connection, timeout, truncated response.
    NoAnswer,
}

/// What to do with the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Accepted: delete the batch in one transaction.
    Delete,
    /// Resend the two halves separately (413, or 400 to isolate the bad log).
    Split,
    /// A single log Datadog refuses as is: keep it in the dead-letter table, never loop on it.
    DeadLetter,
    /// The key is refused (401/403) or the URL is wrong: keep everything, say so loudly, retry slowly.
    Hold,
    /// Transient: retry with backoff, not sooner than `Retry-After` if given.
    Retry(Option<Duration>),
}

pub fn disposition(answer: Answer, batch_len: usize) -> Disposition {
    let code = match answer {
        Answer::NoAnswer => return Disposition::Retry(None),
        Answer::Status { code, retry_after } => match code {
            408 | 429 | 500..=599 => return Disposition::Retry(retry_after),
            _ => code,
        },
    };
    match code {
        200..=299 => Disposition::Delete,
        400 | 413 if batch_len > 1 => Disposition::Split,
        400 | 413 => Disposition::DeadLetter,
        // 401/403, and anything else (a redirect, 404) that says the key or the URL needs an operator.
        _ => Disposition::Hold,
    }
}

/// `Retry-After` in seconds (the HTTP-date form is rare at intakes and is treated as absent).
pub fn retry_after(value: Option<&str>) -> Option<Duration> {
    value?.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Disposition::*;

    fn status(code: u16) -> Answer {
        Answer::Status { code, retry_after: None }
    }

    #[test]
    fn every_status_has_a_disposition() {
        let check = |a: Answer, n: usize, want: Disposition| assert_eq!(disposition(a, n), want, "{a:?} x{n}");
        check(status(202), 10, Delete);
        check(status(200), 1, Delete);
        check(status(400), 10, Split);
        check(status(400), 1, DeadLetter);
        check(status(413), 2, Split);
        check(status(413), 1, DeadLetter);
        check(status(401), 10, Hold);
        check(status(403), 10, Hold);
        check(status(404), 10, Hold);
        check(status(301), 10, Hold);
        check(status(408), 10, Retry(None));
        check(status(500), 10, Retry(None));
        check(status(503), 10, Retry(None));
        check(
            Answer::Status { code: 429, retry_after: Some(Duration::from_secs(7)) },
            10,
            Retry(Some(Duration::from_secs(7))),
        );
        check(Answer::NoAnswer, 10, Retry(None));
        assert_eq!(retry_after(Some(" 12 ")), Some(Duration::from_secs(12)));
        assert_eq!(retry_after(Some("Wed, 21 Oct 2015 07:28:00 GMT")), None);
    }
}
